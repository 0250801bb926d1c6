#!/usr/bin/env bash
# Create .venv and install distributed_me with its pinned stack. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "distributed_me needs Python >= 3.11, found " + sys.version' 
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.dme-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing distributed_me and its stack into .venv (a few minutes the first time)..."
  for args in "-U pip" "-e .[test]"; do
    # shellcheck disable=SC2086
    if ! .venv/bin/python -m pip install -q $args > .venv/install.log 2>&1; then
      grep -v "is ignored" .venv/install.log | tail -40
      echo "pip install $args failed (full log: .venv/install.log)" >&2
      exit 1
    fi
  done
  echo "$want" > "$stamp"
fi
# pip must not have swapped torch for another build
.venv/bin/python - <<'PY'
import sys, torch, torchvision
if not torch.__version__.startswith("2.14.1") or not torchvision.__version__.startswith("0.29.1"):
    sys.exit(f"unexpected torch {torch.__version__} / torchvision {torchvision.__version__}: expected 2.14.1 / 0.29.1")
import distributed_me  # noqa: F401
PY
# a headless browser for the tests that render pages (the API's /docs); a Debian package, installed where we may
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium (headless browser for the page tests)..."
    (apt-get install -y -q chromium > .venv/apt.log 2>&1 || { apt-get update -q > /dev/null 2>&1 &&
      apt-get install -y -q chromium > .venv/apt.log 2>&1; }) || echo "could not install chromium (see .venv/apt.log)" >&2
  else
    echo "chromium not found: install it (e.g. sudo apt-get install chromium) for the page tests" >&2
  fi
fi
