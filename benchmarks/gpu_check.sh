#!/usr/bin/env bash
# GPU check of issue 18 (backends with one dispatch), in one go, for a session that has a CUDA machine:
#
#   bash benchmarks/gpu_check.sh                  # ~8-10 minutes on an H100/H200 (FlexAttention compiles)
#   INSTALL_EXTRAS=1 bash benchmarks/gpu_check.sh # first pip-installs the optional backends (natten, fla-core)
#
# 1. `attnkit backends`: what is installed and usable on this machine;
# 2. `pytest tests/test_cuda.py`: every family and every installed backend against the references on the GPU;
# 3. benchmarks/bench_backends.py: the issue's targets (bf16), forward and forward + backward:
#    sliding window 16K within 1.2x of FlexAttention, 2-D neighborhood within 1.1x of NATTEN, causal linear
#    attention within 1.2x of fla;
# 4. with BENCH_CLI=1, `attnkit bench --device cuda --engines ...`: the same mechanisms through each backend beside
#    SDPA, FlexAttention, NATTEN and fla peers, as a report (tests/test_cuda.py already runs it once, small).
# Everything lands in $OUT (default gpu-check/); the exit code is pytest's.
# Without a usable CUDA device it says so in one line and exits 2, writing nothing (no $OUT folder).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1 \
    || ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no usable CUDA GPU here (nvidia-smi or torch.cuda.is_available() says none); nothing run" >&2
  exit 2
fi
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
TORCH=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "${INSTALL_EXTRAS:-0}" = "1" ]; then
  # torch stays pinned; flash-attn compiles from source for a long time, so it is left to FLASH=1.
  pip install "natten" "fla-core" "torch==$TORCH" 2>&1 | tail -2
  if [ "${FLASH:-0}" = "1" ]; then pip install flash-attn --no-build-isolation "torch==$TORCH" 2>&1 | tail -2; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m attnkit.cli backends | tee "$OUT/backends.txt"

timeout 420 python -m pytest -q -p no:cacheprovider --durations=15 tests/test_cuda.py 2>&1 | tail -60 \
  | tee "$OUT/test_cuda.txt"
rc=${PIPESTATUS[0]}

timeout 240 python benchmarks/bench_backends.py --device cuda --json "$OUT/backends_forward.json" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/backends_forward.txt"
timeout 240 python benchmarks/bench_backends.py --device cuda --backward --json "$OUT/backends_backward.json" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/backends_backward.txt"
if [ "${BENCH_CLI:-0}" = "1" ]; then
  timeout 240 python -m attnkit.cli bench --device cuda --dtype bfloat16 \
    --mechanisms sliding_window,neighborhood_2d,linear_elu --engines flex,tiled,natten,fla,flash,attnkit \
    --seq-lens 16384 --out "$OUT/bench" --no-progress --no-plots --time-budget 200 2>&1 | tail -30 | tee "$OUT/bench.txt"
fi
echo "gpu_check: tests/test_cuda.py exit code $rc; results in $OUT/"
exit "$rc"
