"""Ahead-of-time build of the joint-attention kernel library (called by ``CMakeLists.txt``; no GPU needed).

For every (arch, dtype, head_dim, mask) it runs ``triton.tools.compile`` on
``export/trt_kernel.py:joint_attention_plugin_kernel`` (C launcher + embedded cubin), then
``triton.tools.link`` gives each specialisation a stable C entry point (the grid is computed inside)
``mvgen_ja_<dtype>_d<head_dim>_<mask>_sm<arch>(stream, Q, K, V, Pos, KeyScale, NVideo, InvFreq, n_tokens,
n_heads, batch, Out)`` with ``load_``/``unload_`` companions, declared in ``<out>/mvgen_joint_attention.h``;
the sources are ``<out>/gen/*.c`` and ``<out>/mvgen_joint_attention.c``.

``triton.tools.compile`` asks Triton's *active driver* for the target and the C types; on a build machine
without a GPU no driver is active, so an offline stand-in that knows only the requested target and the
CUDA type mapping is installed first (the compile itself is ``triton.compile`` for that target).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .trt_kernel import aot_signature, launch_config

KERNEL = "joint_attention_plugin_kernel"
DTYPES = ("fp16", "bf16", "fp32")
MASKS = ("full", "isolated")
HEAD_DIMS = (64, 128)


class _OfflineCudaDriver:
    """The two things ``triton.tools.compile`` needs from a driver, without a GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import ty_to_cpp

        self.target = GPUTarget("cuda", arch, 32)
        self.map_python_to_cpp_type = ty_to_cpp

    def get_current_target(self):
        return self.target


def variant_name(dtype: str, head_dim: int, mask: str, arch: int) -> str:
    return f"mvgen_ja_{dtype}_d{head_dim}_{mask}_sm{arch}"


def compile_variant(gen_dir: Path, dtype: str, head_dim: int, mask: str, arch: int) -> None:
    import triton
    from triton.tools.compile import CompileArgs, compile_kernel

    block_m, _, warps, stages = launch_config(dtype, head_dim)
    name = variant_name(dtype, head_dim, mask, arch)
    previous = triton.runtime.driver._active
    triton.runtime.driver.set_active(_OfflineCudaDriver(arch))
    try:
        compile_kernel(CompileArgs(
            path=str(Path(__file__).with_name("trt_kernel.py")), kernel_name=KERNEL, target=f"cuda:{arch}:32",
            num_warps=warps, num_stages=stages, out_name=name, out_path=gen_dir / name,
            signature=aot_signature(dtype, head_dim, mask),
            grid=f"(n_tokens + {block_m - 1}) / {block_m}, batch * n_heads, 1",
        ))
    finally:
        triton.runtime.driver._active = previous


def link(gen_dir: Path, out_dir: Path) -> Path:
    import runpy

    headers = sorted(str(h) for h in gen_dir.glob("mvgen_ja_*.h"))
    argv, sys.argv = sys.argv, ["link", *headers, "-o", str(out_dir / "mvgen_joint_attention")]
    try:
        runpy.run_module("triton.tools.link", run_name="__main__")
    finally:
        sys.argv = argv
    return out_dir / "mvgen_joint_attention.h"


def build(out_dir: Path, archs, dtypes, head_dims, masks) -> Path:
    out_dir = Path(out_dir)
    gen_dir = out_dir / "gen"
    gen_dir.mkdir(parents=True, exist_ok=True)
    for stale in gen_dir.glob("mvgen_ja_*"):
        stale.unlink()
    for arch in archs:
        for dtype in dtypes:
            for head_dim in head_dims:
                for mask in masks:
                    compile_variant(gen_dir, dtype, head_dim, mask, arch)
    return link(gen_dir, out_dir)


def _csv(kind, allowed=None):
    def parse(text):
        values = [kind(v) for v in text.replace(";", ",").split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma list from {allowed}, got {text!r}")
        return values
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.aot_build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (gen/ + mvgen_joint_attention.{c,h})")
    parser.add_argument("--archs", type=_csv(int), default=[90, 80], help="SM architectures, e.g. 90,80")
    parser.add_argument("--dtypes", type=_csv(str, DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--head-dims", type=_csv(int, HEAD_DIMS), default=list(HEAD_DIMS))
    parser.add_argument("--masks", type=_csv(str, MASKS), default=list(MASKS))
    args = parser.parse_args(argv)
    print(build(args.out, args.archs, args.dtypes, args.head_dims, args.masks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
