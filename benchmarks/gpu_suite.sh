#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU node or a deployment target:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# 1. kernel correctness on the hardware (benchmarks/gpu_checks.py), 2. kernel benchmarks
# (benchmarks/kernels.py), 3. the TensorRT build/refit/plugin tests where TensorRT is installed.
# Results: OUT_DIR/{gpu.txt,gpu_checks.*,kernels.*,tensorrt.txt}. Exit status 1 if any step failed.
set -u
OUT=${1:-${OUT:-out/gpu}}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
mkdir -p "$OUT"
status=0
step() { echo "== $*"; "$@" || status=1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step $PY -m benchmarks.gpu_checks --out "$OUT"
step $PY -m benchmarks.kernels --out "$OUT"
if $PY -c "import tensorrt" 2>/dev/null; then
    step $PY -m pytest -q tests/export/test_tensorrt.py 2>&1 | tee "$OUT/tensorrt.txt"
else
    echo "skipped: tensorrt not installed" | tee "$OUT/tensorrt.txt"
fi
exit $status
