"""The Ray-free parts of the victim API: the serve spec, the ledger (keys, budgets, query log) and the wire codec."""

import asyncio
import hashlib
import io
import json
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import wait_for

from distributed_me.errors import DmeError
from distributed_me.serving.ledger import JOURNAL, SECRET, Ledger, key_fingerprint, ledger_secret, read_query_log
from distributed_me.serving.spec import Client, load_serve_config, parse_serve_spec
from distributed_me.wire import WireError, decode_body, encode_npy, input_hash, validate_images

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ spec
@pytest.mark.parametrize("config", ["local.yaml", "gpu-cluster.yaml"])
def test_shipped_configs_validate(config):
    spec, http = load_serve_config(ROOT / "deployments" / config)
    assert spec.victims and http["port"] == 8000


@pytest.mark.parametrize("args,needle", [
    ({"victims": [{"name": "v", "output_policy": "nope"}]}, "valid output policy names"),
    ({"victims": [{"name": "v", "max_batch_size": 0}]}, "'victims.0.max_batch_size' = 0"),
    ({"victims": [{"name": "bad name!"}]}, "'victims.0.name'"),
    ({"victims": [{"name": "v"}, {"name": "v"}]}, "repeated: v"),
    ({"victims": [{"name": "v", "num_replicas": 2, "autoscaling": {}}]}, "not both"),
    ({"victims": [{"name": "v", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]}, "must not exceed"),
    ({"victims": [{"name": "v"}], "clients": [{"key": "long-enough", "victims": ["w"]}]}, "unknown victims ['w']"),
    ({"victims": [{"name": "v"}], "clients": [{"key": "short"}]}, "'clients.0.key'"),
    ({"victims": []}, "'victims'"),
    ({"victims": [{"name": "v", "colour": "red"}]}, "'victims.0.colour'"),
])
def test_bad_spec_names_field_and_value(args, needle):
    with pytest.raises(DmeError) as e:
        parse_serve_spec(args)
    assert needle in str(e.value)


def test_missing_config_file_says_where_an_example_is(tmp_path):
    with pytest.raises(DmeError, match="deployments/local.yaml"):
        load_serve_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ ledger
def _ledger(tmp_path, flush_rows=1000, budget=10, **kw):
    clients = [Client(key="key-aaaaaaa", budget=budget), Client(key="key-bbbbbbb", budget=None, victims=["v1"])]
    return Ledger(clients, ["v1", "v2"], tmp_path / "log", flush_rows, **kw)


def _charge(led, n, rid=None, key="key-aaaaaaa", victim="v1", digest="h"):
    return led.charge(key, victim, n, digest, rid or uuid.uuid4().hex)


def test_ledger_status_codes(tmp_path):
    led = _ledger(tmp_path)
    assert _charge(led, 1, key=None).status == 401
    assert _charge(led, 1, key="wrong-key-123").status == 401
    assert _charge(led, 1, victim="v9").status == 404
    assert _charge(led, 1, key="key-bbbbbbb", victim="v2").status == 403
    d = _charge(led, 11)
    assert d.status == 429 and "11 images requested but only 10 of 10 remain" in d.detail
    assert led.usage("key-aaaaaaa", "v1")["used"] == 0 and read_query_log(tmp_path / "log").num_rows == 0


def test_charge_first_refund_on_failure_idempotent_both_ways(tmp_path):
    led = _ledger(tmp_path)
    assert _charge(led, 6, "a", digest="h1").ok and _charge(led, 4, "b", digest="h2").ok
    assert _charge(led, 1).status == 429  # charged up front: the budget is spent before either is answered
    assert _charge(led, 6, "a").ok  # a retried charge (its reply was lost) is not counted twice
    assert led.refund("b") is True  # "b" was never answered
    assert led.refund("b") is False  # nothing to give back twice
    u = led.usage("key-aaaaaaa", "v1")
    assert (u["used"], u["remaining"], u["budget"]) == (6, 4, 10)
    assert led.usage("key-aaaaaaa", "v2")["used"] == 0  # budgets are per victim
    table = read_query_log(tmp_path / "log")  # answered requests only: the refunded charge is gone
    assert table["request_id"].to_pylist() == ["a"] and table["count"].to_pylist() == [6]
    assert table["key"].to_pylist() == [led.fingerprint("key-aaaaaaa")]
    assert "key-aaaaaaa" not in (tmp_path / "log" / JOURNAL).read_text()  # the secret never reaches the log


def test_a_refund_that_overtakes_its_charge_wins(tmp_path):
    """The ingress gave up on a charge call (accounting died, client left) and refunded it; if the slow charge lands
    after that, it is refused, not counted."""
    led = _ledger(tmp_path)
    assert led.refund("late") is False
    d = _charge(led, 3, "late")
    assert d.status == 409 and led.usage("key-aaaaaaa", "v1")["used"] == 0
    assert read_query_log(tmp_path / "log").num_rows == 0


def test_concurrent_charges_never_over_grant(tmp_path):
    led = _ledger(tmp_path, budget=100)
    granted, refunded = [], []

    def worker(i):
        for j in range(50):
            rid = f"{i}-{j}"
            if _charge(led, 3, rid).ok:
                if j % 5 == 0 and led.refund(rid):  # every fifth answer "failed"
                    refunded.append(3)
                else:
                    granted.append(3)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 99 and led.usage("key-aaaaaaa", "v1")["used"] == 99 and refunded
    assert read_query_log(tmp_path / "log")["count"].to_numpy().sum() == 99


def test_usage_and_refunds_survive_a_restart_and_logs_compact_to_parquet(tmp_path):
    led = _ledger(tmp_path, flush_rows=3)
    for n in (1, 2, 3, 4):
        assert _charge(led, n, f"r{n}", digest=f"h{n}").ok
    parts = sorted((tmp_path / "log").glob("part-*.parquet"))
    assert len(parts) == 1 and pq.read_table(parts[0]).num_rows == 3  # the 4th row waits in the journal
    # a crash: no close(), a torn last journal line; the new ledger rebuilds usage from the log
    with open(tmp_path / "log" / JOURNAL, "a") as f:
        f.write('{"request_id": "torn", "key"')
    again = _ledger(tmp_path, flush_rows=3)
    assert again.usage("key-aaaaaaa", "v1")["used"] == 10
    assert _charge(again, 1).status == 429
    # the charge made just before the crash (already compacted into a part) can still be refunded after it
    assert again.refund("r2") is True and again.usage("key-aaaaaaa", "v1")["used"] == 8
    third = _ledger(tmp_path, flush_rows=3)
    assert third.usage("key-aaaaaaa", "v1")["used"] == 8 and third.refund("r2") is False
    assert read_query_log(tmp_path / "log")["input_hash"].to_pylist() == ["h1", "h3", "h4"]


def test_refund_window_is_bounded(tmp_path):
    led = _ledger(tmp_path, refund_window_s=0.05)
    assert _charge(led, 2, "old").ok
    wait_for(lambda: _charge(led, 0, uuid.uuid4().hex).ok and "old" not in led._charges, 5, "the window to pass")
    assert led.refund("old") is False and led.usage("key-aaaaaaa", "v1")["used"] == 2


def test_key_fingerprints_are_keyed_hashes_with_a_private_secret(tmp_path):
    """A guessed key cannot be confirmed against the log without the folder's secret, which only the owner reads."""
    led = _ledger(tmp_path)
    assert _charge(led, 1).ok
    logged = read_query_log(tmp_path / "log")["key"].to_pylist()[0]
    assert logged == key_fingerprint("key-aaaaaaa", ledger_secret(tmp_path / "log")) and logged.startswith("hmac:")
    assert hashlib.sha256(b"key-aaaaaaa").hexdigest()[:16] not in logged
    assert logged != key_fingerprint("key-aaaaaaa", ledger_secret(tmp_path / "other"))
    assert (tmp_path / "log" / SECRET).stat().st_mode & 0o777 == 0o600


def test_logs_from_before_keyed_hashes_still_count(tmp_path):
    """Rows written with the old unsalted fingerprint keep counting against a configured key after the upgrade."""
    folder = tmp_path / "log"
    folder.mkdir()
    old = "sha256:" + hashlib.sha256(b"key-aaaaaaa").hexdigest()[:16]
    row = {"request_id": "x", "key": old, "victim": "v1", "time": 1_700_000_000_000_000, "count": 7, "input_hash": "h"}
    (folder / JOURNAL).write_text(json.dumps(row) + "\n")
    assert _ledger(tmp_path).usage("key-aaaaaaa", "v1")["used"] == 7


def test_query_log_lives_under_dme_home_unless_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("DME_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert parse_serve_spec({"victims": [{"name": "v"}], "query_log": "querylog/x"}).query_log_path() == \
        tmp_path / "home" / "querylog" / "x"
    assert parse_serve_spec({"victims": [{"name": "v"}], "query_log": "/srv/log"}).query_log_path() == Path("/srv/log")
    shipped, _ = load_serve_config(ROOT / "deployments" / "local.yaml")
    assert shipped.query_log_path().is_relative_to(tmp_path / "home")


# ------------------------------------------------------------------ codec
def test_npy_and_json_bodies_decode_to_the_same_batch():
    x = np.random.default_rng(0).random((2, 1, 4, 4), dtype=np.float32)
    a = decode_body(encode_npy(x), "application/x-npy")
    b = decode_body(json.dumps({"images": x.tolist()}).encode(), "application/json; charset=utf-8")
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, x)
    u8 = (x * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    c = decode_body(json.dumps({"images": u8.tolist(), "dtype": "uint8"}).encode(), "application/json")
    assert c.dtype == np.uint8
    assert input_hash(validate_images(c, (1, 4, 4), 10)) == input_hash(validate_images(u8, (1, 4, 4), 10))


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("body,ctype,status", [
    (b"", "application/x-npy", 400),
    (b"not an array", "application/x-npy", 400),
    (_pickled_npy(), "application/x-npy", 400),
    (b"{not json", "application/json", 400),
    (b'{"pixels": []}', "application/json", 422),
    (b'{"images": [[1, 2], [3]]}', "application/json", 422),
    (b'{"images": [], "dtype": "int64"}', "application/json", 422),
    (b'{"images": [[[[300]]]], "dtype": "uint8"}', "application/json", 422),
    (b"x", "text/plain", 415),
])
def test_malformed_bodies_get_their_status(body, ctype, status):
    with pytest.raises(WireError) as e:
        decode_body(body, ctype)
    assert e.value.status == status and e.value.detail


@pytest.mark.parametrize("arr,status,needle", [
    (np.zeros((0, 1, 4, 4), np.float32), 422, "empty"),
    (np.full((1, 1, 4, 4), np.nan, np.float32), 422, "NaN"),
    (np.full((1, 1, 4, 4), np.inf, np.float32), 422, "NaN or infinite"),
    (np.zeros((1, 3, 4, 4), np.float32), 422, "takes (N, 1, 4, 4)"),
    (np.full((1, 1, 4, 4), 2.0, np.float32), 422, "[0, 1]"),
    (np.zeros((11, 1, 4, 4), np.float32), 413, "limit is 10"),
])
def test_invalid_batches_get_their_status(arr, status, needle):
    with pytest.raises(WireError) as e:
        validate_images(arr, (1, 4, 4), max_images=10)
    assert e.value.status == status and needle in e.value.detail


def test_keys_added_at_run_time_survive_a_restart_with_their_usage(tmp_path):
    """A sweep registers one key per trial at run time. After the accounting replica restarts (a new Ledger on the
    same folder, with none of those keys in its configuration), such a key still works and its budget still counts
    what was answered before; the secret itself is written nowhere."""
    from distributed_me.serving.ledger import CLIENTS, Ledger
    from distributed_me.serving.spec import Client

    first = Ledger([], ["v1"], tmp_path / "log")
    first.add_client(Client(key="trial-key-secret-1", budget=10, victims=["v1"]))
    assert first.charge("trial-key-secret-1", "v1", 6, "h", "r1").ok
    first.close()

    again = Ledger([], ["v1"], tmp_path / "log")
    assert again.usage("trial-key-secret-1", "v1") == {"status": 200, "victim": "v1", "used": 6, "budget": 10,
                                                       "remaining": 4}
    assert again.charge("trial-key-secret-1", "v1", 5, "h", "r2").status == 429
    assert again.charge("trial-key-secret-1", "v1", 4, "h", "r3").ok
    assert again.authorize("another-key-000", "v1").status == 401
    written = b"".join(p.read_bytes() for p in (tmp_path / "log").iterdir() if p.is_file())
    assert b"trial-key-secret-1" not in written
    assert again.fingerprint("trial-key-secret-1") in (tmp_path / "log" / CLIENTS).read_text()


@pytest.mark.parametrize("body,ctype,status", [
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400),  # RecursionError in json.loads
    (b'{"images": [[' + b"9" * 5000 + b"]]}", "application/json", 400),  # beyond Python's int digit limit
    (b'{"images": [[' + b"9" * 400 + b"]]}", "application/json", 422),  # OverflowError converting to float
    (encode_npy(np.zeros((1, 1, 4, 4), np.float32)) + b"trailing", "application/x-npy", 400),
])
def test_hostile_bodies_are_4xx_not_500(body, ctype, status):
    with pytest.raises(WireError) as e:
        decode_body(body, ctype)
    assert e.value.status == status and e.value.detail


def test_oversized_npy_header_is_refused():
    arr = np.zeros((1, 1, 4, 4), np.float32)
    header = repr({"descr": "<f4", "fortran_order": False, "shape": (1, 1, 4, 4)}).encode()
    header += b" " * (8192 - (12 + len(header)) % 64) + b"\n"  # valid v2 padding, 8 KiB of it
    body = b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header + arr.tobytes()
    with pytest.raises(WireError, match="large"):
        decode_body(body, "application/x-npy")


# ------------------------------------------------------------------ gate's key check
class _Accounting:
    """The accounting replica as the gate reaches it (``authorize.remote(...)`` → awaitable), over a real ledger. Key
    checks wait until ``open`` is set (an accounting replica slowed by a flood), or fail while ``down`` (restarting)."""

    def __init__(self, ledger: Ledger):
        self.ledger, self.open, self.down = ledger, asyncio.Event(), False
        self.authorize = SimpleNamespace(remote=self._authorize)

    async def _authorize(self, key: str | None, victim: str) -> tuple[int, str, str]:
        if self.down:
            raise ConnectionError("accounting replica restarting")
        await self.open.wait()
        d = self.ledger.authorize(key, victim)
        return d.status, d.detail, d.fingerprint


def test_a_flood_of_wrong_keys_refuses_strangers_not_a_good_key_whose_trust_expired(tmp_path):
    """With every check slot taken by wrong keys, a key this ingress saw authorized is still checked (its trust
    expires at once here), a never-seen key gets 503; a re-check that fails forgets the key; a dead accounting
    replica gives a 503 that says retry, not an exception (a 500)."""
    from distributed_me.serving.gate import Gate
    from distributed_me.serving.spec import ServeSpec

    spec = ServeSpec(victims=[{"name": "v1"}, {"name": "v2"}], auth_cache_s=0, max_pending_key_checks=4,
                     clients=[{"key": "key-aaaaaaa"}, {"key": "key-bbbbbbb"}])
    accounting = _Accounting(Ledger(spec.clients, ["v1", "v2"], tmp_path / "log"))
    gate = Gate(spec, accounting)

    async def check(key: str, victim: str = "v1") -> tuple[int, str, str]:
        return await asyncio.wait_for(gate.authorize(key, victim), 5)  # a check let through to a closed door hangs

    async def turns() -> None:  # let every started check reach the accounting (each goes through wait_for's task)
        for _ in range(10):
            await asyncio.sleep(0)

    async def main() -> None:
        accounting.open.set()
        assert (await check("key-aaaaaaa"))[0] == 200
        accounting.open.clear()
        flood = [asyncio.create_task(check(f"wrong-key-{i}")) for i in range(4)]
        await turns()
        assert gate.checking == 4
        assert await check("wrong-key-4") == (503, "too many key checks in flight: retry", "")
        assert (await check("key-bbbbbbb"))[0] == 503  # good, but never seen here: a stranger
        good = asyncio.create_task(check("key-aaaaaaa"))
        await turns()
        assert not good.done()  # waiting for its check, not refused with the flood
        accounting.open.set()
        assert (await good)[0] == 200
        assert [(await t)[0] for t in flood] == [401] * 4 and gate.checking == 0
        # revoked for v1 (now v2 only): the re-check refuses it and the key is a stranger again
        accounting.ledger.add_client(Client(key="key-aaaaaaa", victims=["v2"]))
        assert (await check("key-aaaaaaa"))[0] == 403
        accounting.open.clear()
        flood = [asyncio.create_task(check(f"wrong-key-{i}")) for i in range(4)]
        await turns()
        assert (await check("key-aaaaaaa"))[0] == 503
        accounting.open.set()
        await asyncio.gather(*flood)
        accounting.down = True
        status, detail, _ = await check("key-bbbbbbb")
        assert status == 503 and "accounting unavailable (ConnectionError)" in detail and "retry" in detail
        assert gate.checking == 0

    asyncio.run(main())
