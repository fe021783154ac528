#!/usr/bin/env bash
# The GPU path in one command: install what hisf/ + data_shards/ need from .whl/ (no network), run the CUDA
# tests, time our training step against MaPLe's formulation (eager, compile, reduce-overhead) and the data
# reader, and write OUT_DIR/summary.md beside the JSON rows, inside 8 minutes on one H100.
#
#   bash scripts/gpu_check.sh OUT_DIR               # on a machine whose python3 has a CUDA torch
#   bash scripts/gpu_check.sh OUT_DIR --cpu-smoke   # the same steps on a CPU, tiny settings (CI runs this)
#
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels: bash scripts/fetch_gpu_wheels.sh (docs/gpu_check.md).
# OUT_DIR ends with at most 8 files: summary.md, gpu_check.log, steps.tsv, pytest.xml, data_throughput.json
# and train_step_{eager,default,reduce-overhead}.json. Each sub-run has a time limit (seconds, overridable:
# LIMIT_TESTS, LIMIT_EAGER, LIMIT_COMPILE, LIMIT_DATA); one that runs out is reported, not fatal.
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh OUT_DIR [--cpu-smoke]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
SMOKE=0
for arg in "$@"; do
  case $arg in --cpu-smoke) SMOKE=1 ;; *) usage ;; esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$ROOT" || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG=$OUT/gpu_check.log
rm -f "$OUT"/summary.md "$OUT"/steps.tsv "$OUT"/pytest.xml "$OUT"/train_step_*.json "$OUT"/data_throughput.json
: >"$LOG"
: >"$OUT/steps.tsv"
say() { echo "$*" | tee -a "$LOG"; }

# --- 1. Python packages: what is missing is installed from .whl/ into a folder of its own, nothing else ---
# module -> distribution; the GPU image has torch, numpy, pillow, pyarrow, pyyaml, regex, tqdm, torchvision,
# timm, huggingface_hub, safetensors and pytest, and lacks the first five.
MISSING=$("$PY" - <<'PYEOF'
import importlib.util
need = {"open_clip": "open_clip_torch", "webdataset": "webdataset", "ftfy": "ftfy", "wcwidth": "wcwidth",
        "braceexpand": "braceexpand", "torch": "torch", "torchvision": "torchvision", "numpy": "numpy",
        "PIL": "pillow", "pyarrow": "pyarrow", "yaml": "pyyaml", "regex": "regex", "tqdm": "tqdm",
        "huggingface_hub": "huggingface_hub", "safetensors": "safetensors", "timm": "timm", "pytest": "pytest"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
) || { say "error: $PY does not run"; exit 2; }
if [ -n "$MISSING" ]; then
  SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/hisf-gpu-site}
  say "installing from .whl/ into $SITE: $MISSING"
  if [ ! -d .whl ]; then
    say "error: missing Python packages ($MISSING) and no .whl/ folder: run 'bash scripts/fetch_gpu_wheels.sh' where PyPI is reachable and bring .whl/ along"
    exit 2
  fi
  # shellcheck disable=SC2086
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      --find-links .whl $MISSING >>"$LOG" 2>&1; then
    say "error: could not install $MISSING from .whl/ (see $LOG); torch itself must already be installed"
    exit 2
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
fi

# --- 2. The device ---
if [ "$SMOKE" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # a smoke run is a CPU run, also on a GPU machine
fi
"$PY" -c "import torch, open_clip, webdataset, pyarrow, yaml, hisf.engine, data_shards; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || { say "error: the hisf/data_shards imports fail (see above)"; exit 2; }
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$SMOKE" = 0 ] && [ "$CUDA" != 1 ]; then
  say "error: torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?); on a CPU run with --cpu-smoke"
  exit 2
fi

# step NAME LIMIT CMD...: run with a time limit, log, record "name rc seconds limit" in steps.tsv.
FAILED=0
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  say "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  if [ "$name" = tests ] && [ "$SMOKE" = 1 ] && [ $rc = 5 ] && grep -q "deselected" "$LOG"; then
    rc=0  # no CUDA: every gpu test deselected, none run (pytest's "no tests ran")
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit" >>"$OUT/steps.tsv"
  say "   $name: exit $rc after $((SECONDS - t0))s"
  [ $rc = 0 ] || FAILED=1
}

# --- 3. CUDA tests (tests/gpu imports no Ray/MLflow/Optuna; deselected without CUDA) ---
step tests "${LIMIT_TESTS:-160}" "$PY" -m pytest tests/gpu -m gpu -q -rfE -p no:cacheprovider --junitxml "$OUT/pytest.xml"

# --- 4. Training step: ours against MaPLe's formulation, then the data reader ---
BENCH=("$PY" benchmarks/train_step.py)
if [ "$SMOKE" = 1 ]; then
  EAGER=(--tiny --device cpu --shapes 2x5 --steps 1 --warmup 1)
  COMPILED=(--tiny --device cpu --methods maple --shapes 2x5 --steps 1 --warmup 1 --no-loss-check)
  DATA=(--images 24 --size 32 --source-side 64 --workers 0 --train-batch 4)
  # Compiling even the tiny model takes minutes on a CPU: the smoke run checks these sub-runs' plumbing
  # with torch.compile switched off (tests/hisf/engine/test_engine_compile.py compiles on the CPU).
  NOCOMPILE=(env TORCH_COMPILE_DISABLE=1)
else
  # The two target shapes first: a sub-run stopped by its limit keeps the rows it finished.
  EAGER=(--shapes 4x50 32x500 4x500 4x1000 32x50 32x1000 --steps 20 --warmup 5)
  # A cold inductor compile of ViT-B/16's forward and backward takes tens of seconds per method and shape:
  # the compiled sub-runs time maple (the comparison with MaPLe's formulation) at the two target shapes.
  COMPILED=(--methods maple --shapes 4x50 32x500 --steps 20 --warmup 5 --no-loss-check)
  DATA=(--images 300 --size 224 --jobs 8 --workers 4)
  NOCOMPILE=()
fi
step train_step_eager "${LIMIT_EAGER:-100}" "${BENCH[@]}" "${EAGER[@]}" --json "$OUT/train_step_eager.json"
for mode in default reduce-overhead; do
  step "train_step_$mode" "${LIMIT_COMPILE:-90}" "${NOCOMPILE[@]}" "${BENCH[@]}" "${COMPILED[@]}" --compile "$mode" \
    --json "$OUT/train_step_$mode.json"
done
step data_throughput "${LIMIT_DATA:-30}" "$PY" benchmarks/data_throughput.py "${DATA[@]}" --json "$OUT/data_throughput.json"

# --- 5. The summary ---
"$PY" benchmarks/gpu_summary.py "$OUT" >>"$LOG" 2>&1 || { say "error: the summary failed (see $LOG)"; exit 1; }
say "summary: $OUT/summary.md"
exit $FAILED
