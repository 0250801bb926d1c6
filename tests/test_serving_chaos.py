"""The victim API under faults and abuse, on a real Serve app on 127.0.0.1: every test bounded in count and time.

Each fault ends with the ledger's invariant checked from the outside: images answered (200s seen by clients) =
images charged (the key's ``used``) = images logged (the query log), nothing held (``used + remaining = budget``),
and a good client still served. Figures (requests sent, answered, charged, logged, the good client's p99 latency)
are printed, for the closing note; ``pytest -s`` shows them.
"""

import os
import select
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import free_port, serve_env, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BODY_TIMEOUT_S = 8.0  # long enough that the slow requests are surely in flight when the next one comes
PER_KEY = 4
#: the ingress trusts a key it saw authorized this long; short, so that every good client re-checks its key with the
#: accounting replica several times during each abuse below (a flood of wrong keys, a killed accounting replica)
AUTH_CACHE_S = 0.5
DECLARED: set[int] = set()  # the statuses the OpenAPI spec declares for predict: every answer below must be one


def _spec(log_dir: str) -> dict:
    return {
        "query_log": log_dir, "max_request_images": 4096, "max_request_mb": 8.0, "body_timeout_s": BODY_TIMEOUT_S,
        "max_concurrent_per_key": PER_KEY, "auth_cache_s": AUTH_CACHE_S,
        "victims": [{"name": "digits", "source": "embedded", "num_replicas": 2, "num_cpus": 0.25,
                     "max_batch_size": 256, "batch_wait_timeout_s": 0.002}],
        "clients": [{"key": f"key-{name}", "budget": budget} for name, budget in
                    (("good", None), ("acct-kill", 10**6), ("acct-kill-2", 10**6), ("disconnect", 20_480 + 1_000),
                     ("slow", None), ("restart", 500))],
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from distributed_me.serving.runtime import deploy, init_ray, shutdown

    with serve_env(tmp_path_factory.getbasetemp()):
        port = free_port()
        spec = _spec("querylog/chaos")  # relative: under $DME_HOME, wherever the server starts
        init_ray(num_cpus=2)
        deploy(spec, port=port, app_name="chaos")
        responses = httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()["paths"]["/v1/victims/{name}/predict"]
        DECLARED.update([200, *(int(c) for c in responses["post"]["responses"])])
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "spec": spec,
               "log": str(Path(os.environ["DME_HOME"]) / "querylog" / "chaos")}
        shutdown()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 16, 16), dtype=np.float32)


def _npy(x: np.ndarray) -> bytes:
    from distributed_me.wire import encode_npy

    return encode_npy(x)


def _post(client: httpx.Client, key: str | None, body: bytes, ctype: str = "application/x-npy", **kw) -> httpx.Response:
    headers = {"Content-Type": ctype, **({"X-API-Key": key} if key else {})}
    r = client.post("/v1/victims/digits/predict", content=body, headers=headers, **kw)
    assert r.status_code in DECLARED, (r.status_code, r.text[:300])  # the spec lists every status the API answers
    return r


def _usage(url: str, key: str) -> dict:
    return httpx.get(f"{url}/v1/victims/digits/usage", headers={"X-API-Key": key}, timeout=30).json()


def _logged(service, key: str) -> int:
    from distributed_me.serving.ledger import key_fingerprint, ledger_secret, read_query_log
    from distributed_me.serving.runtime import flush_query_log

    flush_query_log("chaos")
    log = read_query_log(service["log"]).to_pandas()
    mine = log[log["key"] == key_fingerprint(key, ledger_secret(service["log"]))]
    assert mine["request_id"].is_unique
    return int(mine["count"].sum())


def _health(service) -> dict:
    return httpx.get(f"{service['url']}/v1/health", timeout=30).json()


def _answered(sockets: list[socket.socket]) -> list[str] | None:
    """The status lines of those of ``sockets`` the server has already answered, or None if none was."""
    ready = select.select(sockets, [], [], 0)[0]
    return [_status_line(s) for s in ready] or None


def _settled(service) -> bool:
    """No batch between charge and answer on the ingress, and no refund waiting to be delivered."""
    h = _health(service)
    return h["answering"] == 0 and h["pending_refunds"] == 0


class GoodClient:
    """A well-behaved client in a thread, timing every request until stopped (bounded by ``limit_s``)."""

    def __init__(self, url: str, limit_s: float = 120):
        self.url, self.limit_s, self.latencies, self.codes = url, limit_s, [], []
        self.errors: list[tuple[int, str]] = []  # (status, body) of every answer but a 200: what a failure shows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body, deadline = _npy(_images(16, seed=99)), time.monotonic() + self.limit_s
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self._stop.is_set() and time.monotonic() < deadline:
                t0 = time.monotonic()
                r = _post(c, "key-good", body)
                self.codes.append(r.status_code)
                if r.status_code != 200:
                    self.errors.append((r.status_code, r.text[:200]))
                self.latencies.append(time.monotonic() - t0)

    def __enter__(self) -> "GoodClient":
        self._thread.start()
        wait_for(lambda: len(self.codes) >= 3, 60, "the good client's first answers")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(90)

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies, 99) * 1000)


def test_accounting_replica_killed_under_load_gives_nothing_away(service):
    """Two kills of the accounting replica while 8 clients (two keys, each at its concurrency limit) query: no 500,
    and for each key the images answered = charged = logged once the refunds of the interrupted charges settle."""
    import ray

    keys, per_request, kills = ("key-acct-kill", "key-acct-kill-2"), 4, 2
    answered = {k: [] for k in keys}
    refused: list[int] = []
    stop = threading.Event()

    def client(i: int) -> None:
        key = keys[i % 2]
        with httpx.Client(base_url=service["url"], timeout=120) as c:
            j = 0
            while not stop.is_set() and j < 600:  # bounded however the kills go
                r = _post(c, key, _npy(_images(per_request, seed=1000 * i + j)))
                (answered[key] if r.status_code == 200 else refused).append(r.status_code)
                j += 1

    def total() -> int:
        return sum(len(v) for v in answered.values())

    def accountant():
        return [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "Accountant#" in a["name"] and a["namespace"].startswith("serve")]

    with GoodClient(service["url"]) as good, ThreadPoolExecutor(2 * PER_KEY) as ex:
        futures = [ex.submit(client, i) for i in range(2 * PER_KEY)]
        for _ in range(kills):
            wait_for(lambda: total() >= 40, 60, "load to build up")
            (old,) = wait_for(accountant, 60, "a running accounting replica")
            ray.kill(ray.get_actor(old["name"], namespace=old["namespace"]), no_restart=True)
            target = total() + 40
            wait_for(lambda t=target: total() >= t, 120, "answers again after the accounting replica's death")
        stop.set()
        for f in futures:
            f.result(timeout=120)
    assert set(refused) <= {503}, refused  # never a 500: "nothing charged, retry"
    wait_for(lambda: _settled(service), 90, "refunds to settle")
    for key in keys:
        usage = _usage(service["url"], key)
        assert usage["used"] == per_request * len(answered[key]) == _logged(service, key), key
        assert usage["used"] + usage["remaining"] == usage["budget"]
    assert set(good.codes) <= {200, 503}
    print(f"\naccounting killed {kills}x: sent {total() + len(refused)} requests, answered {total()}, refused "
          f"{len(refused)} (503); per key charged = logged = answered ({sum(len(v) for v in answered.values()) * 4} "
          f"images); good client {good.codes.count(200)} answered, {good.codes.count(503)} × 503, p99 "
          f"{good.p99_ms:.0f} ms")


def test_a_client_that_hangs_up_mid_request_locks_no_budget(service):
    """Five 4,096-image requests abandoned after 0.3 s: each ends charged (its answer was computed) or refunded
    (it was not), never held; the rest of the budget stays usable."""
    key, budget = "key-disconnect", 20_480 + 1_000
    big = _npy(_images(4096, seed=5))
    with GoodClient(service["url"]) as good:
        for _ in range(5):
            with httpx.Client(base_url=service["url"], timeout=0.3) as c, pytest.raises(httpx.TimeoutException):
                _post(c, key, big)
    wait_for(lambda: _settled(service), 120, "the abandoned requests to end (answered and charged, or refunded)")
    usage, logged = _usage(service["url"], key), _logged(service, key)
    assert usage["used"] == logged and usage["remaining"] == budget - logged
    # a 4,096-image forward outlasts the 0.3 s client: the ones cancelled before their answer existed were refunded
    assert logged < 5 * 4096
    with httpx.Client(base_url=service["url"], timeout=60) as c:  # exactly what is left can be spent, no more
        left = usage["remaining"]
        while left:
            n = min(left, 4096)
            assert _post(c, key, _npy(_images(n, seed=left))).status_code == 200
            left -= n
        assert _post(c, key, _npy(_images(1, seed=7))).status_code == 429
    assert set(good.codes) == {200}, good.errors[:5]
    print(f"\ndisconnects: 5 abandoned, charged {logged} images (answers computed), refunded "
          f"{5 * 4096 - logged}; good client p99 {good.p99_ms:.0f} ms over {len(good.codes)} requests")


def _raw(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head + body)
    return s


def _status_line(s: socket.socket) -> str:
    line = s.recv(4096).split(b"\r\n", 1)[0].decode()
    assert int(line.split()[1]) in DECLARED, line
    return line


def _send_until_answered(port: int, head: bytes, chunk: bytes, max_bytes: int, chunked: bool) -> tuple[str, int]:
    """Stream a body 1 MiB at a time until the server answers (or closes), up to ``max_bytes``: (status line, bytes of
    body sent before the answer). A server that reads the whole body before answering shows ``max_bytes``."""
    s = _raw(port, head)
    sent = 0
    try:
        while sent < max_bytes:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            except OSError:  # answered and closed while we were still sending
                break
            sent += len(chunk)
        return _status_line(s), sent
    finally:
        s.close()


def test_requests_without_a_key_are_refused_before_their_body(service):
    """300 sockets that send headers and a sliver of a 1 MB body, without a key, each get their 401 at once, while a
    good client keeps being served; 200 more with 200 wrong keys get 401 (or 503 beyond the key-check limit); a 60 MB
    body without a key is refused without being read."""
    head = (b"POST /v1/victims/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
            b"Content-Length: 1000000\r\n\r\n")
    with GoodClient(service["url"]) as good:
        sockets = [_raw(service["port"], head, b"\x93NUMPY") for _ in range(300)]
        try:
            codes = [_status_line(s) for s in sockets]  # the rest of each body never comes
        finally:
            for s in sockets:
                s.close()
        wrong = (b"POST /v1/victims/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                 b"X-API-Key: wrong-key-%d\r\nContent-Length: 1000000\r\n\r\n")
        sockets = [_raw(service["port"], wrong % i, b"\x93NUMPY") for i in range(200)]
        try:
            wrong_codes = {_status_line(s) for s in sockets}
        finally:
            for s in sockets:
                s.close()
        big_head = (b"POST /v1/victims/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % (60 * 2**20))
        refused, sent = _send_until_answered(service["port"], big_head, b" " * 2**20, 60 * 2**20, chunked=False)
    assert codes == ["HTTP/1.1 401 Unauthorized"] * 300
    assert wrong_codes <= {"HTTP/1.1 401 Unauthorized", "HTTP/1.1 503 Service Unavailable"}, wrong_codes
    assert refused == "HTTP/1.1 401 Unauthorized" and sent < 60 * 2**20, (refused, sent)
    assert set(good.codes) == {200}, good.errors[:5]
    print(f"\n300 keyless slow bodies: all 401 before their body; 200 wrong keys: {sorted(wrong_codes)}; "
          f"60 MB keyless body: {refused} after {sent / 2**20:.0f} MB; good client p99 {good.p99_ms:.0f} ms over "
          f"{len(good.codes)} requests")


def test_slow_and_oversized_bodies_with_a_key_are_bounded(service):
    """With a valid key: a body that stalls gets 408 after the deadline; a chunked upload past the size limit gets
    413 before it is buffered whole; a key holding PER_KEY slow requests gets 429 for more, another key does not."""
    head = (b"POST /v1/victims/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
            b"X-API-Key: key-slow\r\nContent-Length: 500000\r\n\r\n")
    with GoodClient(service["url"]) as good:
        # quiet first: key checks left from an earlier flood would refuse the slow requests (503) before their body
        wait_for(lambda: _health(service)["checking_keys"] == 0, 30, "no key check in flight")
        slow = [_raw(service["port"], head, b"\x93NUMPY") for _ in range(PER_KEY)]
        try:
            # the next request must come while all PER_KEY bodies are still arriving, before their deadline
            reading = wait_for(lambda: _health(service)["reading_bodies"] >= PER_KEY or _answered(slow),
                               BODY_TIMEOUT_S, "the slow requests to reach the ingress")
            assert reading is True, f"slow requests answered before their body arrived: {reading}"
            with httpx.Client(base_url=service["url"], timeout=60) as c:
                # reading_bodies counts the good client's body too: a 200 means a slow request was still at its key
                # check, so ask again (key-slow is unmetered) while the slow bodies are surely still arriving
                until = time.monotonic() + BODY_TIMEOUT_S / 2
                crowded = _post(c, "key-slow", _npy(_images(2)))
                while crowded.status_code == 200 and time.monotonic() < until:
                    crowded = _post(c, "key-slow", _npy(_images(2)))
            assert crowded.status_code == 429, (crowded.status_code, crowded.text[:300], _health(service))
            assert "too many concurrent requests" in crowded.json()["detail"]
            codes = [_status_line(s) for s in slow]
        finally:
            for s in slow:
                s.close()
        chunked_head = (b"POST /v1/victims/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                        b"X-API-Key: key-good\r\nTransfer-Encoding: chunked\r\n\r\n")
        big, sent = _send_until_answered(service["port"], chunked_head, b"\0" * 2**20, 200 * 2**20, chunked=True)
    assert codes == ["HTTP/1.1 408 Request Timeout"] * PER_KEY
    assert big == "HTTP/1.1 413 Request Entity Too Large" and sent < 200 * 2**20, (big, sent)
    assert set(good.codes) == {200}, good.errors[:5]
    print(f"\nslow bodies with a key: {PER_KEY} × 408 after {BODY_TIMEOUT_S:g} s, the next 429; 200 MiB chunked "
          f"upload: {big} after {sent / 2**20:.0f} MiB; good client p99 {good.p99_ms:.0f} ms")


HOSTILE = {
    "deep-json": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "long-int": (b'{"images": [[' + b"9" * 5000 + b"]]}", "application/json"),
    "float-overflow": (b'{"images": [[' + b"9" * 400 + b"]]}", "application/json"),
    "npy-trailing": (None, "application/x-npy"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("key", ["key-good", None])
def test_hostile_bodies_get_a_4xx_with_or_without_a_key(service, case, key):
    body, ctype = HOSTILE[case]
    if body is None:
        body = _npy(_images(1)) + b"garbage"
    with httpx.Client(base_url=service["url"], timeout=60) as c:
        r = _post(c, key, body, ctype)
        assert (r.status_code == 401) if key is None else (400 <= r.status_code < 500), (r.status_code, r.text[:300])
        assert r.json()["detail"] and "Traceback" not in r.text
        assert _post(c, "key-good", _npy(_images(2))).status_code == 200


def test_docs_page_loads_nothing_from_elsewhere(service):
    page = httpx.get(f"{service['url']}/docs").text
    assert "openapi.json" in page and "<script src" not in page and "cdn" not in page.lower()


def test_docs_page_renders_every_route_in_a_browser_without_internet(service):
    """Headless Chromium with every host but 127.0.0.1 unresolvable: the page still lists each route and status."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed: scripts/setup.sh installs it (apt-get install chromium)")
    out = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                          "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--dump-dom",
                          f"{service['url']}/docs"], capture_output=True, text=True, timeout=180)
    dom = out.stdout
    assert 'data-path="/v1/victims/{name}/predict"' in dom, (out.returncode, dom[-2000:], out.stderr[-2000:])
    assert '<div id="routes"><div class="route"' in dom  # the spec loaded and replaced the "Loading…" line
    assert "nothing was charged, retry" in dom and "X-API-Key" in dom


def test_restart_from_another_directory_keeps_every_budget(service, tmp_path, monkeypatch):
    from ray import serve

    from distributed_me.serving.runtime import deploy

    with httpx.Client(base_url=service["url"], timeout=60) as c:
        assert _post(c, "key-restart", _npy(_images(300, seed=8))).status_code == 200
    serve.delete("chaos")
    monkeypatch.chdir(tmp_path)  # the same relative spec, started from elsewhere
    deploy(service["spec"], port=service["port"], app_name="chaos")
    usage = _usage(service["url"], "key-restart")
    assert (usage["used"], usage["remaining"]) == (300, 200)
    with httpx.Client(base_url=service["url"], timeout=60) as c:
        assert _post(c, "key-restart", _npy(_images(201, seed=9))).status_code == 429


def _fuzz_bodies():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=8))
    docs = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.sampled_from(["images", "dtype", "x"]),
                                                                         inner, max_size=3)), max_leaves=40)

    @st.composite
    def arrays(draw):
        shape = tuple(draw(st.lists(st.integers(0, 17), min_size=0, max_size=5)))
        dtype = draw(st.sampled_from(["uint8", "float32", "float64", "int64", "bool", "complex64", "float16"]))
        arr = np.random.default_rng(draw(st.integers(0, 2**16))).random(shape).astype(dtype)
        return _npy(arr) if dtype in ("uint8", "float32") else _raw_npy(arr)

    return st.one_of(st.binary(max_size=3000), docs.map(lambda d: __import__("json").dumps(d).encode()), arrays(),
                     arrays().map(lambda b: b + b"x"), st.binary(max_size=64).map(lambda b: b"\x93NUMPY" + b))


def _raw_npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_schema_fuzz_never_5xx_and_every_status_is_in_the_spec(service):
    """Bounded, deterministic fuzzing of the API from its own OpenAPI spec's routes: random bodies (bytes, JSON
    trees with huge numbers, .npy arrays of any shape and dtype, truncated and trailing-garbage .npy), content types,
    keys and victim names. Every answer is a JSON non-5xx whose status the spec declares for that route."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    spec = httpx.get(f"{service['url']}/openapi.json").json()["paths"]
    declared = {path: {m: {int(c) for c in op["responses"]} for m, op in ops.items()} for path, ops in spec.items()}
    client = httpx.Client(base_url=service["url"], timeout=60)
    seen: list[tuple[str, int]] = []

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=_fuzz_bodies(),
           ctype=st.sampled_from(["application/x-npy"] * 3 + ["application/json"] * 2 + [
               "application/octet-stream", "application/json; charset=utf-8", "text/plain", "", "x/y;;;"]),
           key=st.sampled_from([None, "wrong-key-0000", ""] + ["key-good"] * 4),  # mostly past the key check
           name=st.sampled_from(["digits", "nope", "digits%2F..", "a" * 300]))
    def one(body, ctype, key, name):
        headers = {k: v for k, v in (("Content-Type", ctype), ("X-API-Key", key)) if v is not None}
        for method, path, route in (("POST", f"/v1/victims/{name}/predict", "/v1/victims/{name}/predict"),
                                    ("GET", f"/v1/victims/{name}", "/v1/victims/{name}"),
                                    ("GET", f"/v1/victims/{name}/usage", "/v1/victims/{name}/usage")):
            r = client.request(method, path, content=body if method == "POST" else None, headers=headers)
            seen.append((route, r.status_code))
            assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
            if r.status_code != 404 or name == "digits":  # an unknown path segment may miss the route entirely
                assert r.status_code in declared[route][method.lower()], (route, r.status_code, r.text[:200])
            assert r.headers["content-type"].startswith("application/json")

    try:
        one()
    finally:
        client.close()
    codes = {c for _, c in seen}
    assert {200, 400, 401, 404, 415, 422} <= codes, codes  # the fuzz reached past the key check into the codec
    print(f"\nschema fuzz: {len(seen)} requests, statuses {sorted(codes)}, no 5xx")
