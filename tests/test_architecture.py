"""The architecture holds, read from the import statements themselves (every one, function-local imports included).

- The core (everything outside ``serving/``, ``sweep/``, ``pools/``, ``bench/`` and ``cli.py``) imports no Ray and
  none of those packages: Ray lives in the thin adapters.
- No import circles between the package's modules.
- The sweep, CLI and bench code name no concrete query strategy: strategies enter through the registry and specs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "distributed_me"
ADAPTERS = ("distributed_me.serving", "distributed_me.sweep", "distributed_me.pools", "distributed_me.bench",
            "distributed_me.cli")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, absolute, with its line; ``from X import y`` counts ``X.y`` when that is a
    module of the package (so ``from . import swifttheft`` names the submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            for a in node.names:
                sub = f"{target}.{a.name}"
                if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                        (PKG.parent / Path(*sub.split("."))).is_dir():
                    out.append((sub, node.lineno))
    return out


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def is_core(mod: str) -> bool:
    return not any(mod == a or mod.startswith(a + ".") for a in ADAPTERS)


def test_imports_are_read_from_every_statement():
    """The reader sees relative, aliased and function-local imports (a guard on the guard)."""
    found = dict(imports_of(PKG / "sweep" / "runner.py"))
    assert "distributed_me.pools.features" in found  # a function-local relative import
    assert "distributed_me.extraction" in found  # a top-level relative import
    assert "ray" in found  # a function-local absolute import


def test_core_imports_no_ray_and_no_adapter():
    bad = []
    for mod, path in modules().items():
        if not is_core(mod):
            continue
        for target, line in imports_of(path):
            if target == "ray" or target.startswith("ray.") or not is_core(target):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "the core must not import Ray or the adapters:\n" + "\n".join(bad)


def test_no_import_circles():
    mods = modules()
    graph = {m: {t for t, _ in imports_of(p) if t in mods and t != m} for m, p in mods.items()}
    # a package's __init__ re-exporting its submodules is not a circle of its own: drop package -> own child edges
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def _strategy_modules_and_names() -> tuple[set[str], set[str]]:
    from distributed_me.attacks import ATTACKS

    classes = [ATTACKS.get(n) for n in ATTACKS.names()]
    return {c.__module__ for c in classes}, set(ATTACKS.names())


@pytest.mark.parametrize("place", ["sweep", "cli.py", "bench"])
def test_adapters_name_no_concrete_strategy(place):
    """No strategy module imported, and no strategy name written, in sweep/, cli.py or bench/ — except as the value
    of a spec's ``strategy`` key (a benchmark's own sweep spec)."""
    strategy_modules, names = _strategy_modules_and_names()
    root = PKG / place
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    bad = []
    for path in files:
        for target, line in imports_of(path):
            if target in strategy_modules:
                bad.append(f"{path.name}:{line} imports {target}")
        tree = ast.parse(path.read_text())
        allowed = {id(v) for node in ast.walk(tree) if isinstance(node, ast.Dict)
                   for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "strategy"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in allowed:
                bad.append(f"{path.name}:{node.lineno} names strategy {node.value!r}")
    assert not bad, "\n".join(bad)


def test_core_runs_without_ray_installed_modules_loaded():
    """Importing the whole core loads no Ray module (the runtime view of the static check above)."""
    core = sorted(m for m in modules() if is_core(m) and m != "distributed_me")
    code = ";".join(f"import {m}" for m in core)
    code += ";import sys;bad=[m for m in sys.modules if m == 'ray' or m.startswith('ray.')];print(bad);"
    code += "sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"ray imported by the core: {out.stdout} {out.stderr[-2000:]}"
