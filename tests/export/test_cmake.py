"""CMake configure + build of the AOT kernel library on this machine (no GPU: nothing is launched)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the kernel tests set TRITON_INTERPRET for this process; the AOT compile must see the real CUDA backend
COMPILE_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.skipif(shutil.which("cmake") is None, reason="skipped: cmake not installed")
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="skipped: nvcc (CUDA toolkit) not installed")
def test_configure_and_build_kernel_library(tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
         "-DMVGEN_AOT_ARCHS=90;80", "-DMVGEN_AOT_DTYPES=fp16", "-DMVGEN_AOT_HEAD_DIMS=128",
         "-DMVGEN_AOT_MASKS=full"], capture_output=True, text=True, timeout=300, env=COMPILE_ENV)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    assert "skipping the plugin library" in configure.stdout or "building mvgen_trt_plugin" in configure.stdout
    built = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=300,
                           env=COMPILE_ENV)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-2000:]
    library = build / "libmvgen_triton_kernels.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    for arch in (90, 80):
        for prefix in ("", "load_", "unload_"):
            assert f" T {prefix}mvgen_ja_fp16_d128_full_sm{arch}\n" in symbols
    # a C consumer of the umbrella header compiles against the generated declarations
    consumer = tmp_path / "consumer.c"
    consumer.write_text(
        '#include "mvgen_joint_attention.h"\n'
        "CUresult run(CUstream s, CUdeviceptr q, CUdeviceptr pos, CUdeviceptr scale, CUdeviceptr nv,\n"
        "             CUdeviceptr inv_freq, CUdeviceptr out) {\n"
        "  load_mvgen_ja_fp16_d128_full_sm90();\n"
        "  return mvgen_ja_fp16_d128_full_sm90(s, q, q, q, pos, scale, nv, inv_freq, 64, 12, 2, out, 0);\n"
        "}\n")
    cache = (build / "CMakeCache.txt").read_text()
    bin_dir = next(line.split("=", 1)[1] for line in cache.splitlines() if line.startswith("CUDAToolkit_BIN_DIR:"))
    cuda_include = Path(bin_dir).parent / "include"
    cc = subprocess.run(["cc", "-fsyntax-only", "-Wall", "-Werror", f"-I{build / 'aot'}", f"-I{cuda_include}",
                         str(consumer)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr[-2000:]
