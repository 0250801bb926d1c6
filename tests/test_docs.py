"""``docs/`` is generated from the code by ``scripts/gen_docs.py``: the checked-in pages must be exactly what a fresh
run writes, so they cannot drift from the registries, the spec schemas and the docstrings they are made of."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATOR = ROOT / "scripts" / "gen_docs.py"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """The pages as the generator writes them now, in a process of their own: this one's registries may hold names
    that tests' plugins registered, which are not the package's."""
    out = tmp_path_factory.mktemp("docs")
    run = subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_checked_in_docs_are_what_the_generator_writes(fresh):
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(p.name for p in fresh.glob("*.md"))
    stale = [p.name for p in fresh.glob("*.md") if (DOCS / p.name).read_text() != p.read_text()]
    assert not stale, f"docs/{', docs/'.join(stale)} out of date: run `python scripts/gen_docs.py` and commit docs/"


def test_one_page_per_concept(fresh):
    assert {p.stem for p in fresh.glob("*.md")} == {"index", "victims-and-api", "attacks", "defenses", "sweeps",
                                                    "cost", "mlflow", "cluster"}


def _package_names(registry) -> list[str]:
    """The package's own entries (a test's plugin may have added others to this process's registry)."""
    return [n for n in registry.names() if registry.get(n).__module__.startswith("distributed_me.")]


def test_every_registered_attack_and_defense_has_a_section(fresh):
    from distributed_me.attacks import ATTACKS
    from distributed_me.defenses import POLICIES

    attacks, defenses = (fresh / "attacks.md").read_text(), (fresh / "defenses.md").read_text()
    assert len(_package_names(ATTACKS)) >= 6 and len(_package_names(POLICIES)) >= 7
    assert [n for n in _package_names(ATTACKS) if f"### `{n}`\n" not in attacks] == []
    assert [n for n in _package_names(POLICIES) if f"### `{n}`\n" not in defenses] == []
    for name in _package_names(ATTACKS):  # with its options, in its own section
        section = attacks.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0]
        assert [f for f in ATTACKS.get(name).model_fields if f"| `{f}` |" not in section] == [], name


def test_every_spec_field_is_documented(fresh):
    from distributed_me.extraction import AttackSpec
    from distributed_me.serving.spec import ServeSpec
    from distributed_me.sweep.spec import SweepSpec

    for page, model in (("sweeps", SweepSpec), ("victims-and-api", ServeSpec), ("attacks", AttackSpec)):
        text = (fresh / f"{page}.md").read_text()
        section = text.split(f"### {model.__name__}\n", 1)[1].split("\n### ", 1)[0]
        missing = [f for f in model.model_fields if f"| `{f}` |" not in section]
        assert not missing, f"{page}.md: {model.__name__} lacks {missing}"


def test_check_mode_says_when_docs_are_stale(tmp_path, fresh):
    for page in fresh.glob("*.md"):
        (tmp_path / page.name).write_text(page.read_text())
    ok = subprocess.run([sys.executable, str(GENERATOR), "--check", "--out", str(tmp_path)], capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (tmp_path / "attacks.md").write_text("hand-edited\n")
    stale = subprocess.run([sys.executable, str(GENERATOR), "--check", "--out", str(tmp_path)], capture_output=True,
                           text=True, timeout=300)
    assert stale.returncode == 1 and "attacks.md" in stale.stdout
