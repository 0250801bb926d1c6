#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (no download; a few minutes on a laptop CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
.venv/bin/dme sweep sweeps/quickstart.yaml --fresh "$@"
echo
echo "Browse the runs: .venv/bin/dme ui   (MLflow UI on 127.0.0.1)"
