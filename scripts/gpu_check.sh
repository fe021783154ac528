#!/usr/bin/env bash
# The GPU path in one command: install what hisf/ + data_shards/ need from .whl/ (no network), time our training
# step against MaPLe's formulation (eager, then the compiled modes the targets need), run the CUDA tests and the
# data reader, and print OUT_DIR/summary.md at the end: within 5 minutes on one H200 (docs/gpu_check.md).
#
#   bash scripts/gpu_check.sh OUT_DIR               # on a machine whose python has a CUDA torch
#   bash scripts/gpu_check.sh --cpu-smoke OUT_DIR   # the same steps on a CPU, tiny settings (CI runs this)
#
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels: bash scripts/fetch_gpu_wheels.sh (docs/gpu_check.md).
# OUT_DIR ends with 7 files (a device session returns at most 8): summary.md, gpu_check.log, steps.tsv,
# tests.jsonl, train_step.jsonl, fusion.jsonl and data_throughput.json. The JSONL files grow one line per finished test or
# row, so a sub-run stopped by its time limit keeps what it measured and leaves no temporary file.
#
# Time: each sub-run has a nominal limit (seconds; LIMIT_<NAME> overrides it) and also gets whatever earlier
# sub-runs left unused, so the sub-runs together never take longer than the sum of the nominal limits
# (GPU: 380 s). The train-step sub-runs are told their limit (--budget) and skip the rows that would not fit,
# the target shapes excepted. One that runs out of time is reported, not fatal.
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh [--cpu-smoke] OUT_DIR" >&2; exit 2; }
OUT=""
SMOKE=0
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || usage
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$ROOT" || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG=$OUT/gpu_check.log
# What this script writes, and what its earlier versions wrote (train_step_*.json, *.tmp, pytest.xml): nothing else.
rm -f "$OUT"/summary.md "$OUT"/steps.tsv "$OUT"/tests.jsonl "$OUT"/train_step.jsonl "$OUT"/fusion.jsonl \
  "$OUT"/data_throughput.json \
  "$OUT"/pytest.xml "$OUT"/train_step_*.json "$OUT"/train_step_*.tmp
: >"$LOG"
: >"$OUT/steps.tsv"
say() { echo "$*" | tee -a "$LOG"; }
T_SETUP=$SECONDS

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
  if ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      --find-links .whl $MISSING >>"$LOG" 2>&1; then
    say "error: could not install $MISSING from .whl/ (see $LOG); torch itself must already be installed"
    exit 2
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
fi

# --- 2. The device (one interpreter: the imports the sub-runs need, and whether CUDA is usable) ---
if [ "$SMOKE" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # a smoke run is a CPU run, also on a GPU machine
fi
PROBE=$(timeout 90 "$PY" -c "
import torch, open_clip, webdataset, pyarrow, yaml, hisf.engine, data_shards
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(),
      'device', torch.cuda.get_device_name(0) if cuda else 'cpu', 'count', torch.cuda.device_count() if cuda else 0)
print(int(cuda))" 2>&1)
RC=$?
echo "$PROBE" | sed '$d' | tee -a "$LOG"
[ $RC = 0 ] || { echo "$PROBE" | tail -1 | tee -a "$LOG"; say "error: the hisf/data_shards imports fail (see above)"; exit 2; }
CUDA=$(echo "$PROBE" | tail -1)
if [ "$SMOKE" = 0 ] && [ "$CUDA" != 1 ]; then
  say "error: torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?); on a CPU run with --cpu-smoke"
  exit 2
fi
printf 'setup\t0\t%s\t0\n' $((SECONDS - T_SETUP)) >>"$OUT/steps.tsv"

# step NAME NOMINAL CMD...: run CMD under a time limit of NOMINAL seconds plus the time earlier sub-runs left
# unused; "@BUDGET@" in CMD becomes that limit less a margin for the interpreter's exit. Logs the output and
# records "name rc seconds limit" in steps.tsv.
FAILED=0
NOMINAL_SO_FAR=0
T_STEPS=$SECONDS
step() {
  local name=$1 nominal=$2 t0=$SECONDS rc limit banked var arg
  shift 2
  var="LIMIT_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  nominal=${!var:-$nominal}
  banked=$((NOMINAL_SO_FAR - (SECONDS - T_STEPS)))
  limit=$((nominal + (banked > 0 ? banked : 0)))
  NOMINAL_SO_FAR=$((NOMINAL_SO_FAR + nominal))
  local cmd=()
  for arg in "$@"; do cmd+=("${arg//@BUDGET@/$((limit > 20 ? limit - 8 : limit * 2 / 3))}"); done
  say "== $name (limit ${limit}s): ${cmd[*]}"
  timeout -k 10 "$limit" "${cmd[@]}" >>"$LOG" 2>&1
  rc=$?
  if [ "$name" = tests ] && [ $rc = 5 ] && grep -q '"selected": 0' "$OUT/tests.jsonl" 2>/dev/null; then
    rc=0  # no CUDA: every gpu test deselected, none run (pytest's "no tests ran")
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit" >>"$OUT/steps.tsv"
  say "   $name: exit $rc after $((SECONDS - t0))s"
  [ $rc = 0 ] || FAILED=1
}

# --- 3. Sub-runs, most important first ---
BENCH=("$PY" benchmarks/train_step.py --jsonl "$OUT/train_step.jsonl" --budget @BUDGET@)
REUSE=(--reference-from "$OUT/train_step.jsonl")
if [ "$SMOKE" = 1 ]; then
  # The GPU's dtype paths on a CPU: backbone stored in fp16 with autocast + GradScaler, MaPLe's fp16 storage.
  TINY=(--tiny --device cpu --steps 1 --warmup 1 --precision fp16 --reference-precision fp16)
  EAGER=("${TINY[@]}" --shapes 4x50 2x5)
  RO=("${TINY[@]}" --methods maple --shapes 4x50 2x5 --targets 4x50 --no-loss-check "${REUSE[@]}")
  DEFAULT=("${TINY[@]}" --methods maple --shapes 2x5 4x50 --targets 2x5 --no-loss-check "${REUSE[@]}")
  DATA=(--images 24 --size 32 --source-side 64 --workers 0 --train-batch 4)
  # Compiling even the tiny model takes minutes on a CPU: the smoke run checks these sub-runs' plumbing
  # with torch.compile switched off (tests/hisf/engine/test_compile.py compiles on the CPU).
  NOCOMPILE=(env TORCH_COMPILE_DISABLE=1)
  # Trial fusion's dtype paths (fp16 autocast + each member's GradScaler, fp16 storage) on the tiny model.
  FUSED=(--device cpu --methods maple hisf --shapes 4x50 --ks 1 8 --steps 1 --warmup 1 --precision fp16 --storage fp16)
  FUSED_COMPILED=(--device cpu --methods maple --shapes 4x50 --ks 8 --steps 1 --warmup 1 --precision fp16 --storage fp16)
  N_EAGER=300 N_RO=120 N_DEFAULT=120 N_FUSED=120 N_FUSED_COMPILED=60 N_TESTS=120 N_DATA=120
else
  # Every method at the two target shapes, then the other shapes while the limit lasts.
  EAGER=(--shapes 4x50 32x500 4x500 4x1000 32x50 32x1000 --steps 20 --warmup 5)
  # One cold inductor compile of ViT-B/16 per target: CUDA graphs at 4x50 (launch-bound: the >= 10x target),
  # the default mode at 32x500; the other shape of each mode only if the limit leaves room for a second compile.
  RO=(--methods maple --shapes 4x50 32x500 --targets 4x50 --steps 20 --warmup 5 --no-loss-check "${REUSE[@]}")
  DEFAULT=(--methods maple --shapes 32x500 4x50 --targets 32x500 --steps 20 --warmup 5 --no-loss-check "${REUSE[@]}")
  DATA=(--images 300 --size 224 --jobs 8 --workers 4)
  NOCOMPILE=()
  # Trial fusion (docs/fusion.md): K = 1, 8, 16 members of ViT-B/16 at batch 4 / 50 classes, fused against the same
  # K trials one after another, eager; then K = 8 compiled (reduce-overhead), against train_step's K = 1 rows.
  FUSED=(--backbone ViT-B-16 --methods maple hisf hicropl --shapes 4x50 --ks 1 8 16 --steps 10 --warmup 3
         --precision fp16 --storage fp16)
  FUSED_COMPILED=(--backbone ViT-B-16 --methods maple --shapes 4x50 --ks 8 --steps 10 --warmup 3 --precision fp16
                  --storage fp16)
  # Nominal seconds, 380 in all; 10-15 s of setup and the summary keep the call within 6.5 minutes.
  N_EAGER=70 N_RO=70 N_DEFAULT=40 N_FUSED=50 N_FUSED_COMPILED=30 N_TESTS=100 N_DATA=20
fi
step train_step_eager "$N_EAGER" "${BENCH[@]}" "${EAGER[@]}"
step train_step_reduce-overhead "$N_RO" "${NOCOMPILE[@]}" "${BENCH[@]}" "${RO[@]}" --compile reduce-overhead
step train_step_default "$N_DEFAULT" "${NOCOMPILE[@]}" "${BENCH[@]}" "${DEFAULT[@]}" --compile default
FUSION=("$PY" benchmarks/fusion.py --jsonl "$OUT/fusion.jsonl" --budget @BUDGET@)
step fusion_eager "$N_FUSED" "${FUSION[@]}" "${FUSED[@]}"
step fusion_compiled "$N_FUSED_COMPILED" "${NOCOMPILE[@]}" "${FUSION[@]}" "${FUSED_COMPILED[@]}" --compile reduce-overhead
# CUDA tests (tests/gpu imports no Ray/MLflow/Optuna; deselected without CUDA); outcomes in tests.jsonl as they come.
step tests "$N_TESTS" env HISF_GPU_TESTS_JSONL="$OUT/tests.jsonl" \
  "$PY" -m pytest tests/gpu -m gpu -q -rfE -p no:cacheprovider -p tests.gpu.results_plugin
step data_throughput "$N_DATA" "$PY" benchmarks/data_throughput.py "${DATA[@]}" --json "$OUT/data_throughput.json"

# --- 4. The summary, also on stdout (a device session returns the output's tail) ---
if ! "$PY" benchmarks/gpu_summary.py "$OUT" >>"$LOG" 2>&1; then
  say "error: the summary failed (see $LOG)"
  exit 1
fi
say "total: $SECONDS s; summary: $OUT/summary.md"
echo
cat "$OUT/summary.md"
exit $FAILED
