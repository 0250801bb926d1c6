"""The serving side of the detectors (no Ray): per-key state that survives restarts exactly, bounded in memory and on
disk, and a key's status as the strongest action of the rules that flagged it."""

from __future__ import annotations

import numpy as np
import pytest

from distributed_me.defenses.detectors import parse_detector
from distributed_me.serving.watch import Rule, Watch

PRADA = "prada:min_distances=20:min_class_distances=2:check_every=1:max_kept=40"
OOD = "ood-rate:threshold=0.5:min_queries=20:window=200"


def _rules() -> list[Rule]:
    return [Rule(parse_detector(PRADA), "block"), Rule(parse_detector(OOD), "degrade")]


def _stream(seed: int, n_requests: int, ood_share: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Requests of 1-6 images (1x4x4) with probabilities over 3 classes; ``ood_share`` of them low-confidence."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_requests):
        n = int(rng.integers(1, 7))
        images = rng.random((n, 1, 4, 4), dtype=np.float32)
        probs = np.full((n, 3), 0.02, np.float32)
        probs[np.arange(n), rng.integers(0, 3, n)] = 0.96
        low = rng.random(n) < ood_share
        probs[low] = np.float32(1 / 3)
        out.append((images, probs))
    return out


def _verdicts(watch: Watch, key: str) -> list[tuple]:
    return [(v.flagged, v.queries_seen, v.flagged_at, round(v.score, 9) if v.score == v.score else "nan")
            for v in watch.verdicts("v", key)]


@pytest.mark.parametrize("restart_every", [1, 3, 11])
def test_a_restarted_watch_reaches_exactly_the_state_of_one_that_never_stopped(tmp_path, restart_every):
    stream = _stream(0, 40, ood_share=0.3)
    steady = Watch(tmp_path / "steady", {"v": _rules()}, snapshot_every=7)
    folder = tmp_path / "restarted"
    watch = Watch(folder, {"v": _rules()}, snapshot_every=7)
    for i, (x, p) in enumerate(stream):
        a = steady.observe("v", "hmac:k", x, p)
        if i % restart_every == 0:  # a new process: nothing in memory, only what is on disk
            watch = Watch(folder, {"v": _rules()}, snapshot_every=7)
        b = watch.observe("v", "hmac:k", x, p)
        assert a == b, i
        assert _verdicts(watch, "hmac:k") == _verdicts(steady, "hmac:k"), i
    assert steady.status("v", "hmac:k").status != "ok"  # the stream did trip a rule: the comparison saw flags


def test_a_crash_between_two_snapshots_of_a_key_replays_each_state_from_its_own(tmp_path):
    stream = _stream(1, 30, ood_share=0.3)
    steady = Watch(tmp_path / "steady", {"v": _rules()}, snapshot_every=1000)
    watch = Watch(tmp_path / "w", {"v": _rules()}, snapshot_every=1000)
    for x, p in stream[:20]:
        steady.observe("v", "hmac:k", x, p)
        watch.observe("v", "hmac:k", x, p)
    slot = watch._slot("v", "hmac:k")
    slot.snapshot()
    for x, p in stream[20:25]:
        steady.observe("v", "hmac:k", x, p)
        watch.observe("v", "hmac:k", x, p)
    # the crash: the first state's new snapshot is written, the second's is not, the journal is not trimmed
    from distributed_me.serving.watch import _atomic_write, _npz_bytes

    state0 = np.frombuffer(slot.states[0].to_bytes(), np.uint8)
    _atomic_write(slot._snapshot_path(0), _npz_bytes(state=state0, seq=np.array(slot.seq, np.int64)))
    reborn = Watch(tmp_path / "w", {"v": _rules()}, snapshot_every=1000)
    assert _verdicts(reborn, "hmac:k") == _verdicts(steady, "hmac:k")
    for x, p in stream[25:]:
        assert reborn.observe("v", "hmac:k", x, p) == steady.observe("v", "hmac:k", x, p)
    assert _verdicts(reborn, "hmac:k") == _verdicts(steady, "hmac:k")


def test_keys_in_memory_and_journal_entries_on_disk_stay_bounded(tmp_path):
    watch = Watch(tmp_path, {"v": _rules()}, snapshot_every=5, max_keys_in_memory=2)
    steady = Watch(tmp_path / "steady", {"v": _rules()}, snapshot_every=5)
    streams = {f"hmac:{k}": _stream(10 + k, 12, ood_share=0.5) for k in range(5)}
    for i in range(12):
        for key, stream in streams.items():
            watch.observe("v", key, *stream[i])
            steady.observe("v", key, *stream[i])
            assert len(watch._slots) <= 2
    for key in streams:
        assert _verdicts(watch, key) == _verdicts(steady, key), key
        journal = [p for p in (tmp_path / "v" / key.replace(":", "_") / "journal").glob("*.npz")]
        assert len(journal) < 5


def test_status_is_the_strongest_action_of_the_rules_that_flagged(tmp_path):
    flag = Rule(parse_detector("ood-rate:threshold=0.5:min_queries=10:expected_rate=0.05"), "flag")
    block = Rule(parse_detector("ood-rate:threshold=0.85:min_queries=10:expected_rate=0.05"), "block")
    watch = Watch(tmp_path, {"v": [block, flag]})  # the strongest wins, whatever the order
    x = np.zeros((30, 1, 2, 2), np.float32)
    middling = np.tile(np.array([[0.4, 0.35, 0.25]], np.float32), (30, 1))  # OOD for threshold 0.5, not for 0.85
    assert watch.status("v", "hmac:a").status == "ok"
    assert watch.observe("v", "hmac:a", x, middling).status == "flag"
    flat = np.full((30, 3), 1 / 3, np.float32)[:, :3]
    flat[:, 0] = 0.05
    flat[:, 1:] = 0.475
    assert watch.observe("v", "hmac:a", x, flat).status == "flag"  # 1 - 0.475 = 0.525: under 0.85
    hopeless = np.full((30, 10), 0.1, np.float32)
    assert watch.observe("v", "hmac:b", np.zeros((30, 1, 2, 2), np.float32), hopeless).status == "block"
    assert "ood-rate" in watch.status("v", "hmac:b").reason
    assert watch.status("v", "hmac:a").status == "flag"  # keys are separate
    assert not watch.watches("other") and watch.status("other", "hmac:a").status == "ok"


def test_a_request_that_cannot_be_folded_in_is_refused_before_it_reaches_the_journal(tmp_path):
    watch = Watch(tmp_path, {"v": _rules()})
    with pytest.raises(ValueError):
        watch.observe("v", "hmac:k", np.zeros((3, 1, 4, 4), np.float32), np.zeros((2, 3), np.float32))
    assert not list(tmp_path.rglob("journal/*.npz"))
    Watch(tmp_path, {"v": _rules()}).observe("v", "hmac:k", *_stream(3, 1)[0])  # the key still works


@pytest.mark.parametrize("rule, words", [
    ({"detector": "pradaa"}, ["'pradaa'", "valid detector names: ood-rate, prada"]),
    ({"detector": "prada:delta=2"}, ["field 'delta' = 2", "less than or equal to 1"]),
    ({"detector": "prada", "action": "kill"}, ["'kill'", "'flag', 'degrade' or 'block'"]),
])
def test_a_bad_detector_rule_is_refused_with_the_field_the_value_and_the_choices(rule, words):
    from distributed_me.errors import DmeError
    from distributed_me.serving.spec import parse_serve_spec

    with pytest.raises(DmeError) as e:
        parse_serve_spec({"victims": [{"name": "v", "detectors": [rule]}]})
    assert "victims.0.detectors.0." in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
