#!/usr/bin/env bash
# Download into .whl/ the wheels a GPU machine lacks for hisf/ + data_shards/ (it has a CUDA torch but no
# network): CPython 3.12, manylinux x86_64, no dependencies resolved (each one is named). Run it where PyPI
# is reachable; scripts/gpu_check.sh then installs from .whl/ whatever is missing. About 2.5 MB.
#
#   bash scripts/fetch_gpu_wheels.sh                 # the five the GPU image lacks
#   bash scripts/fetch_gpu_wheels.sh pyarrow==21.0.0 # ... plus any other NAME==VERSION a machine lacks
#
# The GPU machine must already have: torch (CUDA build) with its torchvision, numpy, pillow, pyarrow, pyyaml,
# regex, tqdm, timm, huggingface_hub, safetensors, pytest (the GPU image here has all of them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl \
  open_clip_torch==3.3.0 webdataset==1.0.2 ftfy==6.3.1 wcwidth==0.9.4 braceexpand==0.1.7 "$@"
du -sh .whl
