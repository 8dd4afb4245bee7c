#!/usr/bin/env bash
# Every GPU check of kvstore in one run (~8 minutes on one H200): the CUDA tests and
# the GPU benchmarks, with logs and JSON lines written to $OUT.
#
#   bash bench/gpu_check.sh             # on the GPU machine (or on a CPU: every step skips)
#   bash bench/gpu_check.sh --dry-run   # print the steps and check what they need; run nothing
#
# Steps: pytest -m gpu; the Triton kernels natively (kvq decode, sparse, chunk copy);
# bench_codec_gpu.py; bench_gpu_io.py; bench_sparse_gpu.py.
#
# Needs, beside the repository (bench/README.md, "GPU check", says how to make them):
#   .whl/                      wheels of what the GPU image lacks (kvikio-cu13 and the
#                              daemon's own dependencies), installed into /tmp/site
#   .gpu_data/smollm2_kv.npy   SmolLM2's KV of a 1024-token prefix (the model's wheel is
#                              too big to carry); without it the codec bench is skipped
#
# Files in $OUT (default bench/out/gpu_check): env.txt, pytest.log, codec_gpu.log,
# gpu_io.log, sparse_gpu.log, results.jsonl (every JSON line), summary.txt.
set -u -o pipefail

cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-bench/out/gpu_check}"
mkdir -p "$OUT"
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}  # every step ends by then (the device call allows 600)
KV_FILE=.gpu_data/smollm2_kv.npy
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

HAS_GPU=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && HAS_GPU=1
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ $HAS_GPU = 0 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi

note() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME CAP_S LOG CMD...: run CMD with a timeout of CAP_S, cut to what is left of
# the budget; its output goes to LOG (appended) and its JSON lines to results.jsonl.
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET_S - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ $DRY = 1 ]; then
    note "would run [$name] (timeout ${cap}s): $*"
    return 0
  fi
  if [ "$limit" -le 5 ]; then
    note "[$name] skipped: the ${BUDGET_S}s budget is spent"
    return 0
  fi
  local start=$SECONDS
  echo "== [$name] $*" >>"$OUT/$log"
  PYTHONUNBUFFERED=1 timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  grep -h '^{' "$OUT/$log" >"$OUT/.json_$name" 2>/dev/null || true
  note "[$name] rc=$rc in $((SECONDS - start))s (limit ${limit}s)$([ $rc = 124 ] && echo ' TIMED OUT')"
}

# -- prerequisites ------------------------------------------------------------------
note "gpu_check: $(date -u +%FT%TZ) gpu=$HAS_GPU dry=$DRY python=$PY"
if [ -d .whl ]; then
  note "wheels: $(ls .whl | tr '\n' ' ')"
else
  note "wheels: none in .whl/ (kvikio tests and the daemon's imports need them on the GPU image)"
fi
[ -f "$KV_FILE" ] && note "SmolLM2 KV: $KV_FILE" || note "SmolLM2 KV: missing ($KV_FILE)"

if [ $HAS_GPU = 1 ] && [ $DRY = 0 ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >"$OUT/env.txt" 2>&1 || note "wheel install failed"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # kvstore.kernels lives in kernels/: an (editable) install maps it into the package.
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$OUT/env.txt" \
    2>&1 || note "editable install of kvstore failed"
  $PY -c "import kvstore.kernels" 2>/dev/null || ln -sfn ../kernels kvstore/kernels
  { nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name()); print('triton', triton.__version__)";
    $PY -c "import cupy, kvikio, kvikio.defaults; print('cupy', cupy.__version__, 'kvikio',
kvikio.__version__, 'compat', kvikio.defaults.compat_mode())"; } >>"$OUT/env.txt" 2>&1
fi

# -- the checks ------------------------------------------------------------------------
run_step pytest_gpu 100 pytest.log $PY -m pytest -q -p no:cacheprovider -m gpu \
  --continue-on-collection-errors tests/
run_step pytest_kernels 100 pytest.log $PY -m pytest -q -p no:cacheprovider \
  tests/codec/test_kernel.py tests/sparse/test_kernels.py tests/sparse/test_chunk_copy.py
if [ -f "$KV_FILE" ] || [ $DRY = 1 ]; then
  run_step codec_gpu 80 codec_gpu.log $PY bench/bench_codec_gpu.py --kv-file "$KV_FILE" \
    --levels near-lossless,balanced,aggressive --batches 1,8,64 --repeat 3
else
  note "[codec_gpu] skipped: $KV_FILE is missing"
fi
run_step gpu_io 90 gpu_io.log $PY bench/bench_gpu_io.py --mb 1000 --disk-mb 1000 --repeat 3
run_step sparse_gpu 110 sparse_gpu.log $PY bench/bench_sparse_gpu.py \
  --contexts 32768,65536,131072 --repeat 3

if [ $DRY = 0 ]; then
  cat "$OUT"/.json_* >"$OUT/results.jsonl" 2>/dev/null || true
  rm -f "$OUT"/.json_*
  note "results: $(wc -l <"$OUT/results.jsonl") JSON lines in $OUT/results.jsonl; ${SECONDS}s in all"
fi
