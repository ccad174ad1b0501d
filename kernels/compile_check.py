"""Compile every Triton kernel (each autotune config) for sm_90 and sm_80 without a GPU, and report resources.

    python -m kernels.compile_check [--arch 90 80] [--jobs 2] [--json out.json]

Each variant goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a fresh
cache, so PTX generation and ptxas really run. Registers, spills and stack come from ptxas' ``-v`` log,
shared memory from the kernel metadata. Exit status: 0 all compiled, 1 a variant failed, 3 the CUDA backend
cannot compile on this machine at all (reason printed after ``skipped:``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

BACKEND_UNAVAILABLE = 3


@dataclass(frozen=True)
class Variant:
    """One compilation: kernel ``module:function``, its constexprs and launch options."""
    kernel: str
    label: str
    pointers: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    floats: tuple = ()


@dataclass
class Result:
    kernel: str
    label: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool
    seconds: float = 0.0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    mma: str = ""
    error: str = field(default="", repr=False)


def _attention_variants() -> list[Variant]:
    from .joint_attention import kernel as attn
    from .rope import rope_bands

    def variant(dtype, head_dim, mask, block_m, block_n, warps, stages):
        t_band, h_band, _ = rope_bands(head_dim)
        fp32 = dtype == "fp32"
        consts = dict(HEAD_DIM=head_dim, T_PAIRS=t_band // 2, H_PAIRS=h_band // 2, MASK_MODE=attn.MASK_IDS[mask],
                      HAS_KEY_SCALE=True, FAST_TRIG=not fp32, DOT_PRECISION="ieee" if fp32 else "tf32",
                      EMULATE_BF16=False, BLOCK_M=block_m, BLOCK_N=block_n)
        pointers = dict(Q=f"*{dtype}", K=f"*{dtype}", V=f"*{dtype}", Out=f"*{dtype}", QPos="*i32", KPos="*i32",
                        KeyScale="*fp32", InvFreq="*fp32")
        return Variant("kernels.joint_attention.kernel:_joint_attention_fwd",
                       f"{dtype} d{head_dim} {mask} {block_m}x{block_n}", pointers, consts, warps, stages,
                       floats=("qk_scale",))

    class _Cfg:  # the autotuner's view of a config, for the prune function
        def __init__(self, m, n, w, s):
            self.kwargs, self.num_warps, self.num_stages = dict(BLOCK_M=m, BLOCK_N=n), w, s

    def pruned(head_dim, precision):
        configs = [_Cfg(*c) for c in attn.AUTOTUNE_CONFIGS]
        kept = attn._prune_configs(configs, dict(n_q=1 << 20), HEAD_DIM=head_dim, DOT_PRECISION=precision)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]

    # every config the pruner keeps, in "prototype" mode (the superset of the masking code), bf16;
    # fp16 and fp32 (IEEE) once each. The other masks are compiled by ``_mask_variants`` (sm_90 only).
    out = [variant("bf16", d, "prototype", *cfg) for d in attn.HEAD_DIMS for cfg in pruned(d, "tf32")]
    out.append(variant("fp16", 128, "prototype", *pruned(128, "tf32")[0]))
    out.append(variant("fp32", 64, "prototype", *pruned(64, "ieee")[0]))
    masks = [variant("bf16", 128, mask, *pruned(128, "tf32")[0]) for mask in ("full", "isolated")]
    return out, masks


def _prototype_variants() -> list[Variant]:
    from .prototype.kernel import GPU_CONFIG, GPU_CONFIG_FP32

    out = []
    for dtype, config in (("bf16", GPU_CONFIG), ("fp32", GPU_CONFIG_FP32)):
        common = dict(BLOCK_D=64, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", EMULATE_BF16=False)
        ptr = dict(Q=f"*{dtype}", K=f"*{dtype}")
        out.append(Variant("kernels.prototype.kernel:_ppa_row_stats", f"{dtype} d64", ptr | dict(Lse="*fp32"),
                           common | dict(BLOCK_Q=config["BLOCK_Q"], BLOCK_K=config["BLOCK_T"]),
                           config["num_warps"], config["num_stages"], floats=("qk_scale",)))
        out.append(Variant("kernels.prototype.kernel:_ppa_columns", f"{dtype} d64",
                           ptr | dict(Z=f"*{dtype}", Lse="*fp32", Scores="*fp32", Proto=f"*{dtype}"),
                           common | {k: config[k] for k in ("BLOCK_Q", "BLOCK_T", "BLOCK_C")},
                           config["num_warps"], config["num_stages"], floats=("qk_scale", "inv_n_q")))
    return out


def _fusion_variants() -> list[Variant]:
    from .fusions.kernel import block_and_warps

    kernels = {
        "_adaln_layernorm_fwd": ("X", "Shift", "Scale", "Out"),
        "_qk_rmsnorm_fwd": ("Q", "K", "WQ", "WK", "OutQ", "OutK"),
        "_gated_residual_fwd": ("X", "Y", "Gate", "Out"),
        "_distribution_fusion_fwd": ("A", "B", "Out"),
    }
    out = []
    for channels in (1536, 5120):  # Wan 1.3B and 14B hidden sizes
        block, warps = block_and_warps(channels)
        for name, pointers in kernels.items():
            out.append(Variant(f"kernels.fusions.kernel:{name}", f"bf16 C={channels}",
                               {p: "*fp32" if p in ("Shift", "Scale", "Gate", "WQ", "WK") else "*bf16"
                                for p in pointers},
                               dict(BLOCK_C=block, EMULATE_BF16=False), warps, 1, floats=("eps",)))
    return out


def jobs(archs) -> list[tuple[Variant, int]]:
    """(variant, arch) pairs: every variant for every arch, the extra mask modes for the first arch."""
    attention, masks = _attention_variants()
    per_arch = attention + _prototype_variants() + _fusion_variants()
    return [(v, a) for a in archs for v in per_arch] + [(v, archs[0]) for v in masks]


def _load(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _signature(fn, v: Variant) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name in v.pointers:
            sig[name] = v.pointers[name]
        else:
            sig[name] = "fp32" if name in v.floats else "i32"
    return sig


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_variant(v: Variant, arch: int) -> Result:
    """Compile one variant for ``sm_<arch>``; never raises (failures are reported in the result)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(v.kernel.split(":")[1], v.label, arch, v.num_warps, v.num_stages, ok=False)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        fn = _load(v.kernel)
        src = ASTSource(fn=fn, signature=_signature(fn, v), constexprs=v.constexprs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    except Exception as exc:  # a compile error of one variant is a result, not a crash of the check
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        result.seconds = time.perf_counter() - start
        return result
    result.ok = True
    result.seconds = time.perf_counter() - start
    result.shared = compiled.metadata.shared
    text = log.getvalue()
    for key, pattern in _PTXAS.items():
        found = pattern.findall(text)
        setattr(result, key, int(found[-1]) if found else None)
    ptx = compiled.asm.get("ptx", "")
    result.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "")
    return result


def _init_worker(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def probe() -> str | None:
    """None if the CUDA backend compiles a trivial kernel here, else the reason it cannot."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as exc:
        return f"triton does not import: {exc}"
    if "nvidia" not in backends:
        return f"triton has no CUDA backend (backends: {sorted(backends)})"
    v = Variant("kernels.fusions.kernel:_distribution_fusion_fwd", "probe", {"A": "*fp32", "B": "*fp32",
                "Out": "*fp32"}, dict(BLOCK_C=64, EMULATE_BF16=False), 1, 1, floats=("eps",))
    result = compile_variant(v, 80)
    return None if result.ok else f"a trivial kernel does not compile: {result.error}"


def _cell(value) -> str:
    return "" if value is None else str(value)


def table(results: list[Result]) -> str:
    header = ["kernel", "variant", "arch", "warps", "stages", "regs", "spill st/ld (B)", "stack (B)", "smem (B)",
              "mma", "s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        spills = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        lines.append("| " + " | ".join([r.kernel, r.label, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages),
                                        _cell(r.registers), spills, _cell(r.stack), _cell(r.shared), r.mma,
                                        f"{r.seconds:.1f}", "ok" if r.ok else f"FAILED {r.error}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mvgen-triton-cache-") as cache:
        _init_worker(cache)
        reason = probe()
        if reason is not None:
            print(f"skipped: {reason}")
            return BACKEND_UNAVAILABLE
        todo = jobs(args.arch)
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker, initargs=(cache,)) as pool:
            results = list(pool.map(compile_variant, *zip(*todo)))
    print(table(results))
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} variants compiled for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} in {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
