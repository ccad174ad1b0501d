#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU node or a deployment target:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# 0. the Wan 14B-width denoiser step vs diffusers in bf16, --deterministic's cost included (bench_denoiser),
# 1. kernel correctness on the hardware (benchmarks/gpu_checks.py: prologue, attention on each backend, the
# denoiser on triton/sdpa/auto vs the reference path), 2. kernel benchmarks (benchmarks/kernels.py: prologue
# + Triton kernel, prologue + SDPA, RoPE-in-PyTorch + SDPA/flash_attn, bare SDPA), 3. the compile figures
# (kernels.compile_check), 4. the MMDiT's triple stream vs diffusers' HunyuanVideo, one step, parity first
# (benchmarks/bench_mmdit.py), 5. the 8-bit attention (--attention-precision int8) against the 16-bit kernel, SDPA
# and the sageattention package at Wan 1.3B/14B shapes, each output checked against float32 (benchmarks/kernels.py
# --precision int8), 6. the TensorRT build/refit/plugin tests where TensorRT is installed (the FP8 engine's too),
# 7. FP8 weights against bf16 per step at the Wan 1.3B/14B widths (bench_denoiser --features fp8-*).
# Results: OUT_DIR/{gpu.txt,denoiser_14b/*,gpu_checks.*,kernels.*,compile_check.*,mmdit_cpu.*,kernels_int8.*,tensorrt.txt,
# denoiser_fp8/*}.
# Exit status 1 if any step failed (each failure is named in the log).
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
    --warmup 3 --features context_cache ref_weights deterministic step_cache_threshold --out "$OUT/denoiser_14b"
step $PY -m benchmarks.kernels --out "$OUT"
# the static figures of the kernels as launched, next to the measured ones
# (sm_89: the 8-bit attention's FP8 P.V on mma.sync)
step $PY -m kernels.compile_check --arch 90 89 80 --json "$OUT/compile_check.json" --markdown "$OUT/compile_check.md"
step $PY -m benchmarks.bench_mmdit --config cpu --device cuda --repeats 20 --warmup 3 --out "$OUT"
# after the rows above, which the 16-bit numbers depend on: the 8-bit attention (fails on an output error above
# benchmarks.kernels.INT8_ERROR_LIMIT against float32)
step $PY -m benchmarks.kernels --precision int8 --out "$OUT"
if $PY -c "import tensorrt" 2>/dev/null; then
    tensorrt_tests() { $PY -m pytest -q tests/export/test_tensorrt.py \
        tests/export/test_fp8_export.py::test_fp8_engine_matches_the_pytorch_fp8_model 2>&1 | tee "$OUT/tensorrt.txt"; }
    step tensorrt_tests
else
    echo "skipped: tensorrt not installed" | tee "$OUT/tensorrt.txt"
fi
# last: FP8 weights (--quantize, engine.runtime.fp8) against bf16 per step at the Wan 1.3B and 14B widths (2 layers each,
# extrapolated to full depth): the engine in bf16, FP8 weight-only and FP8 GEMMs (torch._scaled_mm, row-wise scales),
# each parity-checked against the bf16 engine first; about 3 minutes on an H100
step $PY -m benchmarks.bench_denoiser --config wan-1.3b wan-14b --tokens 8190 --refs 0 --dtype bfloat16 --device cuda \
    --repeats 10 --warmup 3 --features fp8-weight-only fp8-gemm --out "$OUT/denoiser_fp8"
exit $status
