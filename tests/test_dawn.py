"""DAWN (Szyller et al., ACM MM 2021): the keyed selection per client and its rate, the wrong label, the answer and
its record, the binomial p-value of `dme verify`, and `dme verify`'s error line. End to end (extracted vs
independent models): ``test_dawn_verify.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distributed_me.defenses import PolicyChain
from distributed_me.defenses.dawn import (
    Dawn,
    FolderSink,
    binomial_pvalue,
    build_dawn_kit,
    dawn_marks,
    load_watermarks,
)
from distributed_me.defenses.kits import DefenseKit

SECRET = bytes(range(32))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 4, 4), dtype=np.float32)


def test_selection_is_deterministic_per_client_at_the_configured_rate():
    x = _images(20_000)
    top = np.zeros(len(x), np.int64)
    sel_a, wrong_a = dawn_marks(SECRET, "client-a", x, top, 10, rate=0.05)
    again, wrong_again = dawn_marks(SECRET, "client-a", x, top, 10, rate=0.05)
    sel_b, _ = dawn_marks(SECRET, "client-b", x, top, 10, rate=0.05)
    other_key, _ = dawn_marks(bytes(32), "client-a", x, top, 10, rate=0.05)
    assert np.array_equal(sel_a, again) and np.array_equal(wrong_a, wrong_again)
    sigma = math.sqrt(0.05 * 0.95 / len(x))
    for s in (sel_a, sel_b, other_key):
        assert abs(s.mean() - 0.05) < 4 * sigma, s.mean()
    # another client (or another secret) gets another watermark set: overlap as of independent 5 % draws
    assert (sel_a & sel_b).mean() < 0.05 * 0.05 + 4 * sigma and (sel_a & other_key).mean() < 0.0025 + 4 * sigma


def test_the_wrong_label_is_never_the_top_class_and_uniform_over_the_others():
    x = _images(9_000, seed=1)
    top = np.random.default_rng(2).integers(0, 10, len(x))
    _, wrong = dawn_marks(SECRET, "c", x, top, 10, rate=1.0)
    assert not (wrong == top).any()
    offsets = np.bincount((wrong - top) % 10, minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() > 0.8 * 1000 and offsets[1:].max() < 1.2 * 1000


def _kit(tmp_path) -> DefenseKit:
    (tmp_path / "kit").mkdir(parents=True)
    meta = build_dawn_kit(None, tmp_path / "kit")  # the builder reads nothing of its inputs
    return DefenseKit("dawn", tmp_path / "kit", meta)


def test_the_policy_swaps_top_and_wrong_class_and_records_exactly_the_marked_rows(tmp_path):
    kit = _kit(tmp_path)
    secret = (tmp_path / "kit" / "secret.bin").read_bytes()
    assert len(secret) == 32 and secret != _kit(tmp_path / "again").blob("secret.bin")
    chain = PolicyChain([Dawn(rate=0.2)]).bind({"dawn": kit}).bind_sink(FolderSink(tmp_path / "wm"))
    x = _images(500, seed=3)
    probs = np.random.default_rng(4).dirichlet(np.ones(10), len(x)).astype(np.float32)
    answer = chain(probs, queries=x, stream="key-fp")
    sel, wrong = dawn_marks(secret, "key-fp", x, probs.argmax(1), 10, rate=0.2)
    assert 60 < sel.sum() < 140
    np.testing.assert_array_equal(answer.scores[~sel], probs[~sel])
    rows = np.flatnonzero(sel)
    assert np.array_equal(answer.labels[rows], wrong[rows])
    np.testing.assert_array_equal(answer.scores[rows, wrong[rows]], probs[rows, probs[rows].argmax(1)])
    np.testing.assert_array_equal(np.sort(answer.scores, 1), np.sort(probs, 1))  # a permutation of each row
    again = chain(probs, queries=x, stream="key-fp")  # a repeated query: the same answer, recorded once
    np.testing.assert_array_equal(again.scores, answer.scores)
    sets = load_watermarks(tmp_path / "wm")
    assert list(sets) == ["key-fp"]
    images, labels = sets["key-fp"]
    np.testing.assert_array_equal(images, x[rows])
    np.testing.assert_array_equal(labels, wrong[rows])


def test_binomial_pvalue_is_the_upper_tail_at_one_over_k_minus_one():
    p0 = 1 / 9
    by_hand = sum(math.comb(10, k) * p0**k * (1 - p0) ** (10 - k) for k in range(5, 11))
    assert binomial_pvalue(5, 10, 10) == pytest.approx(by_hand, rel=1e-12)
    assert binomial_pvalue(0, 10, 10) == 1.0 and binomial_pvalue(0, 0, 10) == 1.0
    assert binomial_pvalue(40, 100, 10) < 1e-9


def test_dme_verify_without_records_says_where_they_come_from(capsys, tmp_path):
    from distributed_me.cli import main

    code = main(["verify", "suspect.pt", "--evidence", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no DAWN watermark records under" in err, err
    assert "output_policy 'dawn'" in err
