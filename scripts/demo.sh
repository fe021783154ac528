#!/usr/bin/env bash
# Install hisf-bench into .venv and run the demo sweep (search + final) on embedded defaults:
# local Ray, a local MLflow store, local Optuna storage, demo data made on the spot, a tiny CLIP.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e .
.venv/bin/hisf-bench run experiments/demo.yaml "$@"
# Tables, figures and Optuna study reports from what the run tracked; prints where they are.
exec .venv/bin/hisf-bench report experiments/demo.yaml
