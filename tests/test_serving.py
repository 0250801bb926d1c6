"""The victim API on a real Ray cluster and Ray Serve, every socket on 127.0.0.1.

One application for the module: ``digits`` (2 replicas, probabilities), ``digits-label`` (label only) and
``digits-auto`` (autoscaling 1..2). Load in these tests is bounded in request count and time.
"""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import free_port, jba_like, serve_env, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

BUDGET_KEY, BUDGET = "key-budget-50", 50
#: strategies that make their own queries, run through HTTP against a key whose budget is exactly theirs
SYNTHETIC, SYNTHETIC_BUDGET = ("jba", "adversarial-pgd", "dfme"), 41


def _spec(log_dir: str) -> dict:
    small = {"num_cpus": 0.25, "max_batch_size": 128, "batch_wait_timeout_s": 0.002}
    return {
        "query_log": log_dir,
        "max_request_images": 512,
        "max_request_mb": 1.0,
        "victims": [
            {"name": "digits", "source": "embedded", "num_replicas": 2, **small},
            {"name": "digits-label", "source": "embedded", "output_policy": "label", **small},
            {"name": "digits-auto", "source": "embedded", **small, "max_ongoing_requests": 4,
             "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                             "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
                             "look_back_period_s": 1}},
        ],
        "clients": [
            {"key": "key-unlimited", "budget": None},
            {"key": BUDGET_KEY, "budget": BUDGET, "victims": ["digits"]},
            {"key": "key-kill-test", "budget": None, "victims": ["digits"]},
            {"key": "key-kill-handle", "budget": None, "victims": ["digits"]},
            {"key": "key-label-only", "budget": 100000, "victims": ["digits-label"]},
            {"key": "key-exhaust-1", "budget": 3},
            {"key": "key-query-log", "budget": None, "victims": ["digits-label"]},
            *({"key": f"key-synthetic-{name}", "budget": SYNTHETIC_BUDGET, "victims": ["digits"]}
              for name in SYNTHETIC),
        ],
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from distributed_me.serving.runtime import deploy, init_ray, shutdown

    base = tmp_path_factory.getbasetemp()
    with serve_env(base):
        port = free_port()
        log_dir = str(base / "querylog")
        init_ray(num_cpus=2)
        deploy(_spec(log_dir), port=port)
        yield {"url": f"http://127.0.0.1:{port}", "log": log_dir}
        shutdown()


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service["url"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def victim(service):
    from distributed_me.victims import load_victim

    return load_victim(None)


def _npy(x: np.ndarray) -> bytes:
    from distributed_me.wire import encode_npy

    return encode_npy(x)


def _predict(http, victim, body, key="key-unlimited", ctype="application/x-npy", **kw):
    headers = {"Content-Type": ctype, **({"X-API-Key": key} if key else {})}
    return http.post(f"/v1/victims/{victim}/predict", content=body, headers=headers, **kw)


def _fp(service, key: str) -> str:
    """The key's fingerprint as the service's ledger writes it (a keyed hash under its log folder's secret)."""
    from distributed_me.serving.ledger import key_fingerprint, ledger_secret

    return key_fingerprint(key, ledger_secret(service["log"]))


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 16, 16), dtype=np.float32)


def test_listing_is_public_metadata_only(http):
    r = http.get("/v1/victims")
    assert r.status_code == 200
    listing = r.json()
    assert [v["name"] for v in listing] == ["digits", "digits-auto", "digits-label"]
    d = listing[0]
    assert d["input_shape"] == [1, 16, 16] and d["class_names"] == [str(i) for i in range(10)]
    assert {v["name"]: v["returns"] for v in listing}["digits-label"] == "label"
    text = r.text.lower()
    assert "weights" not in text and "/tmp" not in text and "source" not in text and "bundle" not in text
    paths = http.get("/openapi.json").json()["paths"]
    assert "/v1/victims/{name}/predict" in paths and "/v1/victims/{name}/usage" in paths


def test_http_handle_and_in_process_give_identical_answers_and_fidelity(service, victim):
    from distributed_me.data import load_pool
    from distributed_me.extraction import AttackSpec, run_extraction
    from distributed_me.http_oracle import HttpOracle
    from distributed_me.oracle import LocalOracle
    from distributed_me.runner import evaluator_for
    from distributed_me.serving.clients import HandleOracle

    oracles = {
        "in-process": lambda: LocalOracle(victim, "probabilities"),
        "http": lambda: HttpOracle(f"{service['url']}/v1/victims/digits", "key-unlimited"),
        "handle": lambda: HandleOracle("digits", "key-unlimited"),
    }
    x = _images(37, seed=3)
    answers = {k: make().query(x) for k, make in oracles.items()}
    for k in ("http", "handle"):
        np.testing.assert_array_equal(answers[k].scores, answers["in-process"].scores)
        np.testing.assert_array_equal(answers[k].labels, answers["in-process"].labels)

    pool, evaluator = load_pool("photos", n=2000), evaluator_for(victim)
    spec = AttackSpec(budget=150, arch="tiny_cnn", epochs=2, seed=5, adv_eval_samples=40)
    results = {k: run_extraction(make(), pool, spec, evaluator) for k, make in oracles.items()}
    scores = {k: (r.fidelity, r.accuracy, r.adversarial_fidelity, r.queries_used) for k, r in results.items()}
    assert scores["http"] == scores["in-process"] == scores["handle"], scores


def test_label_only_policy_is_applied_inside_the_service(http, victim):
    r = _predict(http, "digits-label", _npy(_images(5)), key="key-label-only")
    assert r.status_code == 200
    body = r.json()
    assert body["kind"] == "label" and "probabilities" not in body
    assert body["labels"] == victim.predict_labels(__import__("torch").from_numpy(_images(5))).tolist()


def test_budget_across_two_replicas_answers_exactly_n(service, http):
    from distributed_me.serving.ledger import read_query_log
    from distributed_me.serving.runtime import flush_query_log

    def one(i):
        return _predict(http, "digits", _npy(_images(5, seed=i)), key=BUDGET_KEY).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(one, range(24)))
    assert codes.count(200) == BUDGET // 5 and codes.count(429) == 24 - BUDGET // 5, codes
    usage = http.get("/v1/victims/digits/usage", headers={"X-API-Key": BUDGET_KEY}).json()
    assert (usage["used"], usage["remaining"]) == (BUDGET, 0)
    r = _predict(http, "digits", _npy(_images(1)), key=BUDGET_KEY)
    assert r.status_code == 429 and "budget exhausted" in r.json()["detail"]
    flush_query_log()
    log = read_query_log(service["log"]).to_pandas()
    mine = log[log["key"] == _fp(service, BUDGET_KEY)]
    assert mine["count"].sum() == BUDGET and mine["request_id"].is_unique


def _bad_requests():
    big = np.zeros((513, 1, 16, 16), np.float32)
    return [
        ("no key", dict(victim="digits", body=_npy(_images(2)), key=None), 401, "X-API-Key"),
        ("unknown key", dict(victim="digits", body=_npy(_images(2)), key="who-are-you"), 401, "unknown API key"),
        ("forbidden victim", dict(victim="digits-label", body=_npy(_images(2)), key=BUDGET_KEY), 403, "may not"),
        ("unknown victim", dict(victim="nope", body=_npy(_images(2))), 404, "no victim named 'nope'"),
        ("budget", dict(victim="digits", body=_npy(_images(4)), key="key-exhaust-1"), 429, "budget exhausted"),
        ("too many images", dict(victim="digits", body=_npy(big)), 413, "limit is 512"),
        ("too many bytes", dict(victim="digits", body=b"\0" * (2**20 + 10)), 413, "exceeds"),
        ("not npy", dict(victim="digits", body=b"garbage"), 400, "not a numpy"),
        ("bad json", dict(victim="digits", body=b"{", ctype="application/json"), 400, "not valid JSON"),
        ("json shape", dict(victim="digits", body=b'{"images": [1, [2]]}', ctype="application/json"), 422, "nested"),
        ("content type", dict(victim="digits", body=b"x", ctype="text/plain"), 415, "application/x-npy"),
        ("nan", dict(victim="digits", body=_npy(np.full((2, 1, 16, 16), np.nan, np.float32))), 422, "NaN"),
        ("inf", dict(victim="digits", body=_npy(np.full((2, 1, 16, 16), np.inf, np.float32))), 422, "infinite"),
        ("empty batch", dict(victim="digits", body=_npy(np.zeros((0, 1, 16, 16), np.float32))), 422, "empty"),
        ("channels", dict(victim="digits", body=_npy(np.zeros((2, 3, 16, 16), np.float32))), 422, "(N, 1, 16, 16)"),
        ("range", dict(victim="digits", body=_npy(np.full((2, 1, 16, 16), 7, np.float32))), 422, "[0, 1]"),
        ("bad input, no key", dict(victim="digits", body=b"garbage", key=None), 401, "X-API-Key"),
    ]


@pytest.mark.parametrize("case,kwargs,status,needle", _bad_requests(), ids=[c[0] for c in _bad_requests()])
def test_bad_requests_get_a_json_4xx_and_service_keeps_serving(http, case, kwargs, status, needle):
    r = _predict(http, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    ok = _predict(http, "digits", _npy(_images(3)))
    assert ok.status_code == 200 and len(ok.json()["labels"]) == 3


def test_json_requests_work_too(http):
    x = _images(2)
    r = _predict(http, "digits", json.dumps({"images": x.tolist()}).encode(), ctype="application/json")
    a = _predict(http, "digits", _npy(x))
    assert r.status_code == 200 and r.json() == a.json()


def _serve_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications["dme"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _wait(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)
    return time.monotonic() - t0


def test_replica_killed_under_load_loses_and_double_counts_nothing(service, http):
    import ray

    from distributed_me.serving.ledger import read_query_log
    from distributed_me.serving.runtime import flush_query_log

    key, n_requests, per_request = "key-kill-test", 160, 512
    answered, refused = [], []

    def client(i):
        # batches large enough that a forward pass is under way on the replica when it is killed
        r = _predict(http, "digits", _npy(_images(per_request, seed=i)), key=key)
        (answered if r.status_code == 200 else refused).append((i, r.status_code))

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "victim-digits#" in a["name"]]
    assert len(replicas) == 2
    with ThreadPoolExecutor(8) as ex:  # enough load that both replicas are always busy
        futures = [ex.submit(client, i) for i in range(n_requests)]
        _wait(lambda: len(answered) >= 30, 60, "load to build up")
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        for f in futures:
            f.result(timeout=120)
    # requests the dead replica held are refused with 503 (and charged nothing, below); at least one must have been:
    # otherwise the release path never ran and this test would prove nothing
    assert refused and {code for _, code in refused} == {503}, refused
    assert len(answered) + len(refused) == n_requests and len(answered) > 30
    _wait(lambda: _serve_replicas("victim-digits") == 2, 120, "the killed replica to be replaced")
    # charged up front, refunded when the replica died: the refunds settle right after the 503s
    _wait(lambda: http.get("/v1/victims/digits/usage", headers={"X-API-Key": key}).json()["used"]
          == per_request * len(answered), 60, "the refunds of the refused requests")
    usage = http.get("/v1/victims/digits/usage", headers={"X-API-Key": key}).json()
    flush_query_log()
    log = read_query_log(service["log"]).to_pandas()
    mine = log[log["key"] == _fp(service, key)]
    assert usage["used"] == per_request * len(answered) == mine["count"].sum()
    assert mine["request_id"].is_unique and len(mine) == len(answered)
    print(f"\nvictim replica killed: sent {n_requests} requests of {per_request} images, answered {len(answered)}, "
          f"refused {len(refused)} (503); charged = logged = {usage['used']} images")


def test_handle_path_is_one_hop_and_a_killed_replica_leaves_no_charge_without_an_answer(service, http, caplog):
    """In-cluster clients call the victim's own deployment (one hop), whose gate charges in parallel with the local
    forward. A replica killed under load takes its gate with it: the client, which chose each request's id, refunds
    the lost attempt and retries on the surviving replica. Every query ends answered, and images answered = charged
    = logged."""
    import ray

    from distributed_me.serving.clients import HandleOracle
    from distributed_me.serving.ledger import read_query_log, read_refunds
    from distributed_me.serving.runtime import flush_query_log

    key, n_queries, per_query = "key-kill-handle", 48, 512
    _wait(lambda: _serve_replicas("victim-digits") == 2, 120, "two replicas of digits")
    refunds_before = read_refunds(service["log"])
    answered: list[int] = []
    oracles = [HandleOracle("digits", key) for _ in range(6)]

    def client(i):
        answer = oracles[i % len(oracles)].query(_images(per_query, seed=10_000 + i))
        assert len(answer.labels) == per_query
        answered.append(i)

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "victim-digits#" in a["name"]]
    with ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(client, i) for i in range(n_queries)]
        _wait(lambda: len(answered) >= 8, 60, "load to build up")
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        for f in futures:
            f.result(timeout=180)  # every query answered, the lost attempts retried
    lost_attempts = sum("the replica failed the request" in r.getMessage() for r in caplog.records)
    assert lost_attempts, "no attempt was lost with the replica: the refund path never ran; this test proves nothing"
    lost = read_refunds(service["log"]) - refunds_before
    usage = http.get("/v1/victims/digits/usage", headers={"X-API-Key": key}).json()
    flush_query_log()
    log = read_query_log(service["log"]).to_pandas()
    mine = log[log["key"] == _fp(service, key)]
    assert len(answered) == n_queries
    assert usage["used"] == per_query * n_queries == mine["count"].sum()
    assert mine["request_id"].is_unique and len(mine) == n_queries and not set(mine["request_id"]) & lost
    print(f"\nvictim replica killed under handle load: {n_queries} queries of {per_query} images all answered, "
          f"{lost_attempts} attempts lost with the replica, {len(lost)} refunds sent by the client; "
          f"charged = logged = {usage['used']} images")


def test_autoscaling_up_under_load_and_back_down(http):
    assert _serve_replicas("victim-digits-auto") == 1
    stop = threading.Event()
    deadline = time.monotonic() + 90  # the load stops by itself

    def load(i):
        n = 0
        while not stop.is_set() and time.monotonic() < deadline:
            _predict(http, "digits-auto", _npy(_images(64, seed=i * 1000 + n)))
            n += 1

    with ThreadPoolExecutor(6) as ex:
        for i in range(6):
            ex.submit(load, i)
        try:
            up = _wait(lambda: _serve_replicas("victim-digits-auto") == 2, 80, "scale-up to 2 replicas")
        finally:
            stop.set()
    down = _wait(lambda: _serve_replicas("victim-digits-auto") == 1, 90, "scale-down to 1 replica")
    print(f"autoscaling: 1→2 replicas after {up:.1f}s of load, back to 1 after {down:.1f}s idle")


def test_dme_attack_through_http(service, http, capsys):
    from distributed_me.cli import main

    before = http.get("/v1/victims/digits/usage", headers={"X-API-Key": "key-unlimited"}).json()["used"]
    code = main(["attack", "--victim-url", f"{service['url']}/v1/victims/digits", "--api-key", "key-unlimited",
                 "--budget", "120", "--epochs", "1", "--arch", "tiny_cnn", "--adv-samples", "20", "--json",
                 "--no-mlflow"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["queries_used"] == 120
    after = http.get("/v1/victims/digits/usage", headers={"X-API-Key": "key-unlimited"}).json()["used"]
    assert after - before == 120


def test_dme_attack_wrong_key_is_one_clear_error(service, capsys):
    from distributed_me.cli import main

    code = main(["attack", "--victim-url", f"{service['url']}/v1/victims/digits", "--api-key", "bad-key-123",
                 "--budget", "10", "--no-mlflow"])
    assert code == 2 and "HTTP 401" in capsys.readouterr().err


def test_waiting_for_an_app_ends_at_once_when_its_background_deployment_failed(service):
    """A sweep deploys its app while Tune starts the trials; trials wait for it. A deployment that failed is said at
    once, with its cause, on any node (Ray's KV store), and an app that never comes is a clear timeout."""
    import ray.experimental.internal_kv as kv

    from distributed_me.errors import DmeError
    from distributed_me.serving.runtime import _failure_key, wait_until_ready

    wait_until_ready("dme", timeout=30)  # the fixture's running app
    kv._internal_kv_put(_failure_key("broken-app"), b"BundleError: victim bundle /x is corrupt")
    # the failure, not the 1-hour timeout's message: the waiter read the published failure instead of waiting it out
    with pytest.raises(DmeError, match="'broken-app' failed to deploy: BundleError: victim bundle /x is corrupt"):
        wait_until_ready("broken-app", timeout=3600)
    with pytest.raises(DmeError, match="'never-deployed' was not running after 1 s"):
        wait_until_ready("never-deployed", timeout=1)


def test_query_log_rows_are_exactly_the_requests_answered(service, http):
    """Each answered request is one log row: the hash of the images actually sent (whatever their encoding), the
    victim that answered, a time inside the request's window, the image count, and a key fingerprint, never the key."""
    import pandas as pd

    from distributed_me.oracle import validate_batch
    from distributed_me.serving.ledger import read_query_log
    from distributed_me.serving.runtime import flush_query_log
    from distributed_me.wire import input_hash

    key = "key-query-log"  # this test's own key: its rows are exactly the requests below
    batches = [_images(n, seed=900 + n) for n in (1, 7, 33)]
    uint8 = (np.random.default_rng(5).random((5, 16, 16, 1)) * 255).astype(np.uint8)  # NHWC pixels, same canon
    t0 = pd.Timestamp.now(tz="UTC")
    for b in [*batches, uint8]:
        assert _predict(http, "digits-label", _npy(b), key=key).status_code == 200
    t1 = pd.Timestamp.now(tz="UTC")
    flush_query_log()
    log = read_query_log(service["log"]).to_pandas()
    mine = log[log["key"] == _fp(service, key)].sort_values("time")
    expected = [input_hash(validate_batch(b, (1, 16, 16))) for b in [*batches, uint8]]
    assert list(mine["input_hash"]) == expected
    assert list(mine["count"]) == [1, 7, 33, 5] and set(mine["victim"]) == {"digits-label"}
    assert ((mine["time"] >= t0 - pd.Timedelta(seconds=1)) & (mine["time"] <= t1 + pd.Timedelta(seconds=1))).all()
    assert key not in log["key"].tolist() and _fp(service, key) != key


def test_concurrent_batched_answers_go_back_to_their_own_client(service, victim):
    """8 clients at once, each sending distinct batches of 1–300 images (Serve merges them into shared forward passes
    and splits the result): every client gets back exactly the in-process answer to its own images."""
    from distributed_me.http_oracle import HttpOracle
    from distributed_me.oracle import LocalOracle

    local = LocalOracle(victim, "probabilities")
    sizes = [[1, 300, 17], [64, 5, 129], [2, 255, 3], [128, 1, 77], [300, 33, 9], [11, 200, 4], [96, 96, 1],
             [7, 150, 42]]

    def client(i: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        oracle = HttpOracle(f"{service['url']}/v1/victims/digits", "key-unlimited")
        out = []
        for j, n in enumerate(sizes[i]):
            x = _images(n, seed=1000 + 10 * i + j)
            a = oracle.query(x)
            out.append((x, a.scores, a.labels))
        oracle.close()
        return out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    for i, rows in enumerate(results):
        for x, scores, labels in rows:
            expected = local.query(x)
            assert scores.shape == expected.scores.shape, (i, scores.shape)
            # not bitwise: a forward pass over a merged batch differs from one over the client's own batch in the last
            # float bits (seen 7e-8: CPU kernels block by batch size); another client's rows would differ by ~0.1-1
            np.testing.assert_allclose(scores, expected.scores, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(labels, expected.labels)


POLICIES_THROUGH_SERVE = {"topk": "topk:3", "round": "round:2", "quantize": "quantize:5", "noise": "noise:0.05",
                          "rsig": "reverse_sigmoid", "dp": "dp:beta=5", "chain": "round:2,topk:1",
                          # the model-carrying defenses, each with its kit (built below)
                          "mad": "mad", "mad-argmax": "mad-argmax:eps=0.8", "am": "am", "cip": "cip,topk:3",
                          # ModelGuard-S's codebook is state: one replica, the same requests in the same order
                          "modelguard-w": "modelguard-w", "modelguard-s": "modelguard-s:eps=0.5",
                          # DAWN at a rate that marks some of the 46 images; its records checked below
                          "dawn": "dawn:rate=0.3"}


def _as_a_replica(fn, *args):
    """Call ``fn`` with the intra-op thread count of a ``num_cpus < 1`` replica (one thread): float32 sums taken in
    another order differ in the last bit (measured 9e-9 on a top-k score with 2 threads here vs 1 in the replica)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(saved)


def test_every_output_policy_answers_through_serve_as_in_process(service, victim):
    """Each policy deployed as a real victim behind HTTP: every answer equals the same policy applied in process to
    the same queries. ``noise`` (on two replicas) too, given the deployment's seed and the key: its draws are keyed per
    key and image, so a repeated request gets the same answer on either replica, and another key another answer."""
    from ray import serve

    from distributed_me.defenses import find_kit, train_kit
    from distributed_me.http_oracle import HttpOracle
    from distributed_me.oracle import LocalOracle
    from distributed_me.serving.ledger import key_fingerprint, ledger_secret
    from distributed_me.serving.runtime import deploy

    for kit in ("mad", "am", "cip", "dawn"):  # in the home the replicas read (the service's); AM's model 1 epoch
        if find_kit(victim, kit) is None:
            train_kit(victim, kit, epochs=1, track=False)
    seed, keys = 7, ("key-policies", "key-policies-2")
    folder = Path(service["log"]).parent / "querylog-policies"
    spec = {"query_log": str(folder),
            "victims": [{"name": n, "source": "embedded", "output_policy": p, "policy_seed": seed, "num_cpus": 0.05,
                         "num_replicas": 2 if n == "noise" else 1} for n, p in POLICIES_THROUGH_SERVE.items()],
            "clients": [{"key": k, "budget": None} for k in keys]}
    port = int(service["url"].rsplit(":", 1)[1])
    deploy(spec, app_name="policies", route_prefix="/p", port=port)
    try:
        for name, policy in POLICIES_THROUGH_SERVE.items():
            remote = HttpOracle(f"{service['url']}/p/v1/victims/{name}", keys[0])
            local = LocalOracle(victim, policy, seed=seed, stream=key_fingerprint(keys[0], ledger_secret(folder)))
            assert remote.info.returns == local.info.returns, name
            for j, n in enumerate((5, 40, 1)):
                x = _images(n, seed=2000 + j)
                a, b = remote.query(x), _as_a_replica(local.query, x)
                assert a.kind == b.kind and np.array_equal(a.labels, b.labels), (name, j)
                if b.scores is not None:
                    np.testing.assert_array_equal(a.scores, b.scores, err_msg=f"{name} request {j}")
                if b.topk is not None:
                    np.testing.assert_array_equal(np.sort(a.topk, axis=1), np.sort(b.topk, axis=1))
            remote.close()
        x = _images(40, seed=2000 + 1)

        def noisy(key: str):
            oracle = HttpOracle(f"{service['url']}/p/v1/victims/noise", key)
            try:
                return oracle.query(x)
            finally:
                oracle.close()

        with ThreadPoolExecutor(6) as pool:  # concurrent repeats, spread over both replicas and merged batches
            repeats = list(pool.map(noisy, [keys[0]] * 6))
        for r in repeats:  # the same noise (to the last float bits a merged batch may move, as above)
            np.testing.assert_allclose(r.scores, repeats[0].scores, rtol=0, atol=1e-6)
        other = noisy(keys[1])
        twin = LocalOracle(victim, "noise:0.05", seed=seed, stream=key_fingerprint(keys[1], ledger_secret(folder)))
        np.testing.assert_array_equal(other.scores, _as_a_replica(twin.query, x).scores)
        assert not np.isclose(other.scores, repeats[0].scores, atol=1e-4).all(axis=1).any()
        # DAWN's evidence, by the query log: the key's marked images and their wrong labels, those the in-process
        # twin marked too (its records went to its own folder)
        from distributed_me.defenses.dawn import load_watermarks

        served = load_watermarks(folder / "watermarks" / "dawn")
        twin = load_watermarks(Path(os.environ["DME_HOME"]) / "watermarks" / "victim")
        fp = key_fingerprint(keys[0], ledger_secret(folder))
        assert list(served) == [fp] and len(served[fp][1]) > 0

        def marked(sets):  # image bytes -> wrong label (records of one request may share a millisecond: no order)
            return {i.tobytes(): int(lab) for i, lab in zip(*sets[fp], strict=True)}

        assert marked(served) == marked(twin)
    finally:
        serve.delete("policies")


def test_a_key_added_at_run_time_survives_the_accounting_replica(service, http):
    """Sweep trials register their keys at run time. When the single accounting replica dies and Serve replaces it,
    such a key still works, and its budget still counts the images answered before the restart."""
    import ray
    from ray import serve

    key = "key-runtime-restart"
    serve.get_deployment_handle("Accountant", "dme").add_client.remote(
        {"key": key, "budget": 50, "victims": ["digits"]}).result()
    assert _predict(http, "digits", _npy(_images(30, seed=77)), key=key).status_code == 200
    (acc,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Accountant#" in a["name"]]
    ray.kill(ray.get_actor(acc["name"], namespace=acc["namespace"]), no_restart=True)

    def replaced():  # a new accounting replica, running, that answers usage at all (any key's status)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Accountant#" in a["name"]]
        if not names or names == [acc["name"]] or _serve_replicas("Accountant") != 1:
            return None
        r = http.get("/v1/victims/digits/usage", headers={"X-API-Key": "key-unlimited"})
        return r if r.status_code == 200 else None

    wait_for(replaced, 120, "the accounting replica to be replaced", every=0.25)
    r = http.get("/v1/victims/digits/usage", headers={"X-API-Key": key})
    assert r.status_code == 200, r.text  # the run-time key is known to the new replica
    usage = r.json()
    assert usage["used"] == 30 and usage["remaining"] == 20
    assert _predict(http, "digits", _npy(_images(21, seed=78)), key=key).status_code == 429
    assert _predict(http, "digits", _npy(_images(20, seed=79)), key=key).status_code == 200


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_queries_pass_the_same_api_budget_and_query_log(service, name):
    """Queries a strategy makes (Jacobian augmentation, adversarial examples, a generator's images) go through HTTP
    like any other: the key's budget is exactly the strategy's (41, which no batch size of theirs divides), so the
    server would refuse one image more; the attack ends cleanly on the last paid answer; the server charged exactly
    what the client counted; and the query log holds, request by request, the hash of exactly the images sent."""
    import pandas as pd

    from distributed_me.attacks import ATTACKS, GENERATED, QueryStrategy, Timer, Workbench
    from distributed_me.data import load_pool
    from distributed_me.http_oracle import HttpOracle
    from distributed_me.models import create_model
    from distributed_me.oracle import RecordingOracle, validate_batch
    from distributed_me.serving.ledger import read_query_log
    from distributed_me.serving.runtime import flush_query_log
    from distributed_me.train import TrainConfig
    from distributed_me.wire import input_hash

    key = f"key-synthetic-{name}"
    oracle = RecordingOracle(HttpOracle(f"{service['url']}/v1/victims/digits", key))
    strategy = QueryStrategy.create(name, ATTACKS.get(name).smoke_options)
    bench = Workbench(lambda: create_model("tiny_cnn", 10, in_chans=1, img_size=16), TrainConfig(epochs=1),
                      (1, 16, 16), Timer(), seed=0, query_batch_size=16)
    out = strategy.extract(oracle, load_pool("photos", n=300), SYNTHETIC_BUDGET, bench)
    assert oracle.queries_used == len(out.queried) == SYNTHETIC_BUDGET
    assert (out.queried == GENERATED).any()
    http = httpx.get(f"{service['url']}/v1/victims/digits/usage", headers={"X-API-Key": key}, timeout=30).json()
    assert http["used"] == SYNTHETIC_BUDGET and http["remaining"] == 0
    flush_query_log()
    log = read_query_log(service["log"]).to_pandas()
    mine = log[log["key"] == _fp(service, key)].sort_values("time")
    assert list(mine["input_hash"]) == [input_hash(validate_batch(b, (1, 16, 16))) for b in oracle.sent]
    assert mine["count"].sum() == SYNTHETIC_BUDGET and set(mine["victim"]) == {"digits"}
    assert (mine["time"] <= pd.Timestamp.now(tz="UTC")).all()


def test_detectors_block_a_synthetic_stream_spare_benign_keys_and_survive_their_replica(service, victim):
    """PRADA on a hosted victim with action ``block``: benign keys sending the victim's own test images in random
    order are never flagged; a JBA-like key is refused (403, nothing charged) once PRADA flags it, and stays refused
    after the detector replica is killed and replaced, while the benign keys go on being answered."""
    import ray
    from ray import serve

    from distributed_me.serving.ledger import key_fingerprint, ledger_secret
    from distributed_me.serving.runtime import deploy
    from distributed_me.victims import victim_test_split

    folder = Path(service["log"]).parent / "querylog-watched"
    keys = ("key-benign-1", "key-benign-2", "key-synthetic")
    spec = {"query_log": str(folder), "detector_snapshot_every": 7,
            "victims": [{"name": "watched", "source": "embedded", "num_cpus": 0.1,
                         "detectors": [{"detector": "prada", "action": "block"}]}],
            "clients": [{"key": k, "budget": None} for k in keys]}
    port = int(service["url"].rsplit(":", 1)[1])
    deploy(spec, app_name="watched", route_prefix="/w", port=port)
    url = f"{service['url']}/w/v1/victims/watched"
    try:
        test_images = victim_test_split(victim)[0].numpy()
        with httpx.Client(timeout=60) as c:
            def send(key: str, x: np.ndarray) -> httpx.Response:
                return c.post(f"{url}/predict", content=_npy(x),
                              headers={"Content-Type": "application/x-npy", "X-API-Key": key})

            benign = {k: np.random.default_rng(i).permutation(len(test_images))[:300] for i, k in enumerate(keys[:2])}
            for k, order in benign.items():
                for i in range(0, len(order), 20):
                    assert send(k, test_images[order[i:i + 20]]).status_code == 200, k
            sent, blocked_after = 0, None
            for batch in jba_like(test_images[:10], rounds=7):
                r = send(keys[2], batch)
                if r.status_code == 403:
                    blocked_after = sent
                    assert "PRADA" in r.json()["detail"] or "prada" in r.json()["detail"], r.text
                    break
                assert r.status_code == 200, r.text
                sent += len(batch)
            assert blocked_after is not None, f"PRADA never flagged the synthetic key over {sent} queries"
            usage = c.get(f"{url}/usage", headers={"X-API-Key": keys[2]}).json()
            assert usage["used"] == blocked_after  # the refused request was not charged

            (old,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "watched#Watchman#" in a["name"]]
            ray.kill(ray.get_actor(old["name"], namespace=old["namespace"]), no_restart=True)

            def replaced():
                names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if "watched#Watchman#" in a["name"]]
                if not names or names == [old["name"]]:
                    return None
                r = send(keys[0], test_images[:5])
                return r if r.status_code == 200 else None

            wait_for(replaced, 120, "the detector replica to be replaced", every=0.25)
            r = send(keys[2], test_images[:3])
            assert r.status_code == 403 and "blocked" in r.json()["detail"], r.text
            for k in keys[:2]:
                assert send(k, test_images[300:320]).status_code == 200
        watchman = serve.get_deployment_handle("Watchman", "watched")  # the detector's own view of the benign keys
        secret = ledger_secret(folder)
        for k in keys[:2]:
            (v,) = watchman.verdicts.remote("watched", key_fingerprint(k, secret)).result()
            assert not v["flagged"] and v["queries_seen"] == 300 + 5 * (k == keys[0]) + 20, v
    finally:
        serve.delete("watched")
