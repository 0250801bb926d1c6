"""The Ray-free parts of the victim API: the serve spec, the ledger (keys, budgets, query log) and the wire codec."""

import io
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distributed_me.errors import DmeError
from distributed_me.serving.ledger import JOURNAL, Ledger, key_fingerprint, read_query_log
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
def _ledger(tmp_path, flush_rows=1000, budget=10):
    clients = [Client(key="key-aaaaaaa", budget=budget), Client(key="key-bbbbbbb", budget=None, victims=["v1"])]
    return Ledger(clients, ["v1", "v2"], tmp_path / "log", flush_rows)


def test_ledger_status_codes(tmp_path):
    led = _ledger(tmp_path)
    assert led.reserve(None, "v1", 1).status == 401
    assert led.reserve("wrong-key-123", "v1", 1).status == 401
    assert led.reserve("key-aaaaaaa", "v9", 1).status == 404
    assert led.reserve("key-bbbbbbb", "v2", 1).status == 403
    d = led.reserve("key-aaaaaaa", "v1", 11)
    assert d.status == 429 and "11 images requested but only 10 of 10 remain" in d.detail
    assert led.usage("key-aaaaaaa", "v1")["used"] == 0


def test_reserve_commit_release(tmp_path):
    led = _ledger(tmp_path)
    a = led.reserve("key-aaaaaaa", "v1", 6)
    b = led.reserve("key-aaaaaaa", "v1", 4)
    assert a.ok and b.ok
    assert led.reserve("key-aaaaaaa", "v1", 1).status == 429  # in-flight reservations hold the budget
    led.release(b.reservation)
    led.commit(a.reservation, "h1")
    led.commit(a.reservation, "h1")  # a second commit of the same request is ignored
    u = led.usage("key-aaaaaaa", "v1")
    assert (u["used"], u["remaining"], u["budget"]) == (6, 4, 10)
    assert led.usage("key-aaaaaaa", "v2")["used"] == 0  # budgets are per victim
    table = read_query_log(tmp_path / "log")
    assert table.num_rows == 1 and table["count"].to_pylist() == [6]
    assert table["key"].to_pylist() == [key_fingerprint("key-aaaaaaa")]
    assert "key-aaaaaaa" not in (tmp_path / "log" / JOURNAL).read_text()  # the secret never reaches the log


def test_concurrent_reservations_never_over_grant(tmp_path):
    led = _ledger(tmp_path, budget=100)
    granted = []

    def worker():
        for _ in range(50):
            d = led.reserve("key-aaaaaaa", "v1", 3)
            if d.ok:
                led.commit(d.reservation, "h")
                granted.append(3)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 99 and led.usage("key-aaaaaaa", "v1")["used"] == 99
    assert read_query_log(tmp_path / "log")["count"].to_numpy().sum() == 99


def test_usage_survives_a_restart_and_logs_compact_to_parquet(tmp_path):
    led = _ledger(tmp_path, flush_rows=3)
    for n in (1, 2, 3, 4):
        led.commit(led.reserve("key-aaaaaaa", "v1", n).reservation, f"h{n}")
    parts = sorted((tmp_path / "log").glob("part-*.parquet"))
    assert len(parts) == 1 and pq.read_table(parts[0]).num_rows == 3  # the 4th row waits in the journal
    # a crash: no close(), a torn last journal line; the new ledger rebuilds usage from the log
    with open(tmp_path / "log" / JOURNAL, "a") as f:
        f.write('{"request_id": "torn", "key"')
    again = _ledger(tmp_path, flush_rows=3)
    assert again.usage("key-aaaaaaa", "v1")["used"] == 10
    assert again.reserve("key-aaaaaaa", "v1", 1).status == 429
    assert read_query_log(tmp_path / "log")["input_hash"].to_pylist() == ["h1", "h2", "h3", "h4"]


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
    from distributed_me.serving.ledger import CLIENTS, Ledger, key_fingerprint
    from distributed_me.serving.spec import Client

    first = Ledger([], ["v1"], tmp_path / "log")
    first.add_client(Client(key="trial-key-secret-1", budget=10, victims=["v1"]))
    first.commit(first.reserve("trial-key-secret-1", "v1", 6).reservation, "h")
    first.close()

    again = Ledger([], ["v1"], tmp_path / "log")
    assert again.usage("trial-key-secret-1", "v1") == {"status": 200, "victim": "v1", "used": 6, "budget": 10,
                                                       "remaining": 4}
    assert again.reserve("trial-key-secret-1", "v1", 5).status == 429
    assert again.reserve("trial-key-secret-1", "v1", 4).ok
    assert again.authorize("another-key-000", "v1").status == 401
    written = b"".join(p.read_bytes() for p in (tmp_path / "log").iterdir() if p.is_file())
    assert b"trial-key-secret-1" not in written
    assert key_fingerprint("trial-key-secret-1") in (tmp_path / "log" / CLIENTS).read_text()
