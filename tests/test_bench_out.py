"""Where ``dme bench NAME --out`` writes: a folder gets ``NAME.json`` (and the bench's plots), a ``.json`` path is the
result file itself, its plots beside it (``--out x.json`` once made a folder named ``x.json``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from distributed_me.bench import BENCHES, load_benches, run_bench


@pytest.fixture
def toy_bench(monkeypatch):
    """A bench that writes a plot into ``args.out``, as the real ones do; registered for this test only."""
    load_benches()  # the real ones first: registered into the copy below, they would be gone after this test
    monkeypatch.setattr(BENCHES, "_entries", dict(BENCHES._entries))

    @BENCHES.register("toy")
    def toy(args: argparse.Namespace) -> dict:
        (Path(args.out) / "toy.png").write_bytes(b"png")
        return {"value": 1.5}

    return toy


@pytest.mark.parametrize("out, result, plot", [
    ("results", "results/toy.json", "results/toy.png"),
    ("deep/er/mine.json", "deep/er/mine.json", "deep/er/toy.png"),
])
def test_out_is_a_folder_or_the_result_file(toy_bench, tmp_path, out, result, plot):
    got = run_bench("toy", argparse.Namespace(out=str(tmp_path / out)))
    assert got["value"] == 1.5
    written = json.loads((tmp_path / result).read_text())
    assert written["value"] == 1.5 and written["meta"]["wall_seconds"] >= 0
    assert (tmp_path / plot).read_bytes() == b"png"
    assert not (tmp_path / result).is_dir()
