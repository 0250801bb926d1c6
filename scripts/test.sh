#!/usr/bin/env bash
# Set up, then run the test suite (offline; Ray/Serve/MLflow sockets on 127.0.0.1 only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONHASHSEED=0
exec .venv/bin/python -m pytest --durations=25 "$@"
