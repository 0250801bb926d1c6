"""The architecture holds: the core library imports no Ray."""

import subprocess
import sys

CORE = ["data", "models", "victims", "defenses", "attacks", "train", "metrics", "oracle", "extraction", "runner",
        "answer", "tracking", "cli"]


def test_core_modules_do_not_import_ray():
    code = ";".join(f"import distributed_me.{m}" for m in CORE)
    code += ";import sys;bad=[m for m in sys.modules if m == 'ray' or m.startswith('ray.')];print(bad);"
    code += "sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"ray imported by the core: {out.stdout} {out.stderr[-2000:]}"
