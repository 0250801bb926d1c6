#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (no download; about 3 minutes on 2 laptop CPU cores once
# installed), then rank its attacks in the leaderboard.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
.venv/bin/dme sweep sweeps/quickstart.yaml --fresh "$@"
echo
.venv/bin/dme leaderboard --out leaderboard
echo
echo "Browse the runs: .venv/bin/dme ui   (MLflow UI on 127.0.0.1: experiment dme-quickstart, parent run -> report/)"
