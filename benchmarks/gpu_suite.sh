#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU node or a deployment target:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# 0. the Wan 14B-width denoiser step vs diffusers in bf16, --deterministic's cost included (bench_denoiser),
# 1. kernel correctness on the hardware (benchmarks/gpu_checks.py: prologue, attention on each backend, the
# denoiser on triton/sdpa/auto vs the reference path), 2. kernel benchmarks (benchmarks/kernels.py: prologue
# + Triton kernel, prologue + SDPA, RoPE-in-PyTorch + SDPA/flash_attn, bare SDPA), 3. the compile figures
# (kernels.compile_check), 4. the MMDiT's triple stream vs diffusers' HunyuanVideo, one step, parity first
# (benchmarks/bench_mmdit.py), 5. the TensorRT build/refit/plugin tests where TensorRT is installed.
# Results: OUT_DIR/{gpu.txt,denoiser_14b/*,gpu_checks.*,kernels.*,compile_check.*,mmdit_cpu.*,tensorrt.txt}. Exit status 1 if any step
# failed (each failure is named in the log).
set -u -o pipefail  # a step piped into tee fails with its own status, not tee's
OUT=${1:-${OUT:-out/gpu}}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
mkdir -p "$OUT"
status=0
step() { echo "== $*"; "$@" || { echo "== FAILED ($?): $*"; status=1; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step $PY -m benchmarks.gpu_checks --out "$OUT"
# the Wan 14B-width step (2 layers of the real widths) against diffusers in bf16, with the engine's feature rows:
# context cache off, merged reference weights, step cache, and --deterministic (batch-invariant Triton matmul and
# attention: what it costs per step against the default)
step $PY -m benchmarks.bench_denoiser --config wan-14b --refs 0 3 --dtype bfloat16 --device cuda --repeats 10 \
    --warmup 3 --out "$OUT/denoiser_14b"
step $PY -m benchmarks.kernels --out "$OUT"
# the static figures of the kernels as launched, next to the measured ones
step $PY -m kernels.compile_check --arch 90 80 --json "$OUT/compile_check.json" --markdown "$OUT/compile_check.md"
step $PY -m benchmarks.bench_mmdit --config cpu --device cuda --repeats 20 --warmup 3 --out "$OUT"
if $PY -c "import tensorrt" 2>/dev/null; then
    tensorrt_tests() { $PY -m pytest -q tests/export/test_tensorrt.py 2>&1 | tee "$OUT/tensorrt.txt"; }
    step tensorrt_tests
else
    echo "skipped: tensorrt not installed" | tee "$OUT/tensorrt.txt"
fi
exit $status
