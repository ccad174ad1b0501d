"""The TensorRT-plugin entry point of the joint-attention kernel: interpreted on CPU vs the reference, and
compiled for sm_90/sm_80 (no GPU needed)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # compiles the plugin kernel for every GPU target

INTERPRETED = textwrap.dedent("""
    import math
    import torch, triton
    import kernels
    from kernels import joint_attention_reference
    from export.trt_kernel import joint_attention_plugin_kernel, plugin_constexprs

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for mask in ("full", "isolated"):
        for batch, heads, n_video, n_ref in ((2, 2, 24, 8), (1, 1, 20, 0)):
            n, d = n_video + n_ref, 64
            q, k, v = (torch.randn(batch, n, heads, d, generator=gen) for _ in range(3))
            pos = torch.randint(-4, 9, (n, 3), generator=gen)
            key_scale = torch.cat([torch.ones(n_video), torch.rand(n_ref, generator=gen) + 0.5])
            # what the graph computes before the node: the QK prologue (rotation, folded scales)
            q_rot, k_rot = kernels.qk_prologue(q, k, pos, pos, q_scale=kernels.LOG2E / math.sqrt(d),
                                               key_scale=key_scale, backend="reference")
            out = torch.full_like(q, float("nan"))
            meta = plugin_constexprs("fp32", d, mask, 90)
            grid = (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)
            joint_attention_plugin_kernel[grid](q_rot, k_rot, v, torch.tensor([n_video]), n, heads, batch, out,
                                                **meta)
            want = joint_attention_reference(q.double(), k.double(), v.double(), pos, pos, q_offsets=(n_video, n),
                                             k_offsets=(n_video, n), key_scale=key_scale.double(), mask=mask)
            worst = max(worst, ((out.double() - want).norm() / want.norm()).item())
    print(worst)
""")


def test_plugin_entry_point_matches_reference_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.strip().splitlines()[-1]) < 1e-5


COMPILED = textwrap.dedent("""
    import sys
    from export.trt_kernel import compile_plugin_kernel

    dtype, head_dim, mask, arch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    compiled = compile_plugin_kernel(dtype, head_dim, mask, arch)
    assert compiled.metadata.name == "joint_attention_plugin_kernel", compiled.metadata.name
    assert f".target sm_{arch}" in compiled.asm["ptx"] and compiled.asm["cubin"]
    # the specialised build (16-byte aligned pointers) the plugin ships: within the opt-in shared memory of an
    # H100/A100 (227/163 KiB; past 48 KiB the launchers opt in)
    limit = {90: 227, 80: 163}[arch] * 1024
    assert compiled.metadata.shared <= limit, compiled.metadata.shared
    print("compiled", compiled.metadata.shared)
""")


@pytest.mark.parametrize("dtype,head_dim,mask,arch", [("fp16", 128, "full", 90), ("bf16", 64, "isolated", 80)])
def test_plugin_entry_point_compiles_for_gpu_targets(dtype, head_dim, mask, arch, tmp_path):
    # a fresh process: this one may have Triton in interpreter mode (set by the kernel tests)
    # a fresh cache, so ptxas really runs and reports
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DUMP_PTXAS_LOG": "1",
                                                                               "TRITON_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", COMPILED, dtype, str(head_dim), mask, str(arch)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1].startswith("compiled")
    spills = re.findall(r"(\d+) bytes spill stores", run.stdout + run.stderr)  # ptxas -v of the shipped build
    assert spills and all(n == "0" for n in spills), (run.stdout + run.stderr)[-2000:]
