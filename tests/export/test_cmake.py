"""CMake configure + build of the AOT kernel library on this machine (no GPU: nothing is launched), and the
TensorRT-independent parts of the mvgen::JointAttention plugin (native/) compiled with g++ and run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # configures and builds the native library

ROOT = Path(__file__).resolve().parents[2]
NATIVE_TEST = Path(__file__).with_name("native") / "test_joint_attention_dispatch.cpp"
CXX = shutil.which("g++") or shutil.which("c++")
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
    cache = (build / "CMakeCache.txt").read_text()
    found = {line.split(":", 1)[0]: not line.endswith("-NOTFOUND") for line in cache.splitlines()
             if line.startswith(("TensorRT_INCLUDE_DIR:", "TensorRT_LIBRARY:"))}
    tensorrt_found = found.get("TensorRT_INCLUDE_DIR", False) and found.get("TensorRT_LIBRARY", False)
    if tensorrt_found:
        assert "building mvgen_trt_plugin and mvgen_trt_plugin_dynamic" in configure.stdout
    else:  # this machine: the plugin targets are skipped, and say why
        assert ("TensorRT not found (NvInfer.h / libnvinfer; set TensorRT_ROOT): skipping the plugin libraries "
                "mvgen_trt_plugin and mvgen_trt_plugin_dynamic") in configure.stdout, configure.stdout[-2000:]
    # the variant list the plugin's launcher table is built from
    variants = (build / "aot" / "mvgen_ja_variants.h").read_text()
    assert "#define MVGEN_JA_FOR_EACH_VARIANT(X)" in variants
    assert "X(fp16, 128, full, 90) \\\n  X(fp16, 128, full, 80)\n" in variants
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
        "CUresult run(CUstream s, CUdeviceptr q, CUdeviceptr nv, CUdeviceptr out) {\n"
        "  load_mvgen_ja_fp16_d128_full_sm90();\n"
        "  return mvgen_ja_fp16_d128_full_sm90(s, q, q, q, nv, 64, 12, 2, out, 0);\n"
        "}\n")
    bin_dir = next(line.split("=", 1)[1] for line in cache.splitlines() if line.startswith("CUDAToolkit_BIN_DIR:"))
    cuda_include = Path(bin_dir).parent / "include"
    cc = subprocess.run(["cc", "-fsyntax-only", "-Wall", "-Werror", f"-I{build / 'aot'}", f"-I{cuda_include}",
                         str(consumer)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr[-2000:]

    # the plugin's launcher table over this build tree: it compiles against the generated headers, links to the
    # library's real entry points (libcuda is absent here: its symbols stay unresolved, nothing calls them) and
    # selects the sm_90 / sm_80 variants as a GPU of that compute capability would
    if CXX is not None:
        exe = tmp_path / "launchers_test"
        cxx = subprocess.run(
            [CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-DMVGEN_TEST_LAUNCHERS", f"-I{ROOT / 'native'}",
             f"-I{build / 'aot'}", f"-I{cuda_include}", str(NATIVE_TEST), f"-L{build}", "-lmvgen_triton_kernels",
             "-Wl,--allow-shlib-undefined", "-o", str(exe)], capture_output=True, text=True)
        assert cxx.returncode == 0, cxx.stderr[-3000:]
        ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LD_LIBRARY_PATH": str(build)})
        assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout[-3000:] + ran.stderr[-2000:]
    if tensorrt_found:
        libs = {name: build / f"lib{name}.so" for name in ("mvgen_trt_plugin", "mvgen_trt_plugin_dynamic")}
        exported = {name: subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                                         text=True).stdout for name, lib in libs.items()}
        assert " T getCreators\n" in exported["mvgen_trt_plugin_dynamic"]
        assert " T getCreators\n" not in exported["mvgen_trt_plugin"]
        assert all(" T setLoggerFinder\n" in text for text in exported.values())


@pytest.mark.skipif(CXX is None, reason="skipped: no C++ compiler (g++) installed")
def test_plugin_dispatch_logic(tmp_path):
    """Field parsing, shape/launch checks and variant choice of the TensorRT plugin, with g++ alone."""
    exe = tmp_path / "dispatch_test"
    cxx = subprocess.run([CXX, "-std=c++17", "-Wall", "-Wextra", "-Wpedantic", "-Werror", f"-I{ROOT / 'native'}",
                          str(NATIVE_TEST), "-o", str(exe)], capture_output=True, text=True)
    assert cxx.returncode == 0, cxx.stderr[-3000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout[-3000:]


def test_plugin_fields_match_the_onnx_node():
    """The plugin's identity and fields are those export/plugin.py puts on the node."""
    from export import plugin

    dispatch = (ROOT / "native" / "joint_attention_dispatch.h").read_text()
    source = (ROOT / "native" / "joint_attention_plugin.cpp").read_text()
    assert f'kPluginName[] = "{plugin.OP_TYPE}"' in dispatch
    assert f'kPluginNamespace[] = "{plugin.DOMAIN}"' in dispatch
    assert f'kPluginVersion[] = "{plugin.OP_VERSION}"' in dispatch
    for name in ("mask", "plugin_namespace"):
        assert f'PluginField("{name}", nullptr' in source
    for mask in plugin.EXPORTED_MASKS:
        assert f'text == "{mask}"' in dispatch
