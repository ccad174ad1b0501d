"""The TensorRT-plugin entry point of the joint-attention kernel: interpreted on CPU vs the reference, and
compiled for sm_90/sm_80 (no GPU needed)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

INTERPRETED = textwrap.dedent("""
    import torch, triton
    from kernels import joint_attention_reference
    from kernels.rope import rope_inv_freq
    from export.trt_kernel import joint_attention_plugin_kernel, plugin_constexprs

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for mask in ("full", "isolated"):
        for batch, heads, n_video, n_ref in ((2, 2, 24, 8), (1, 1, 20, 0)):
            n, d = n_video + n_ref, 64
            q, k, v = (torch.randn(batch, n, heads, d, generator=gen) for _ in range(3))
            pos = torch.randint(-4, 9, (n, 3), generator=gen)
            key_scale = torch.cat([torch.ones(n_video), torch.rand(n_ref, generator=gen) + 0.5])
            out = torch.empty_like(q)
            meta = plugin_constexprs("fp32", d, mask, fast_trig=False)
            grid = (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)
            joint_attention_plugin_kernel[grid](q, k, v, pos, key_scale, torch.tensor([n_video]),
                                                rope_inv_freq(d).float(), n, heads, batch, out, **meta)
            want = joint_attention_reference(q.double(), k.double(), v.double(), pos, pos, n_video_q=n_video,
                                             n_video_k=n_video, key_scale=key_scale.double(), mask=mask)
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
    # fits the default dynamic shared memory of a launch
    assert compiled.metadata.shared <= 48 * 1024, compiled.metadata.shared
    print("compiled", compiled.metadata.shared)
""")


@pytest.mark.parametrize("dtype,head_dim,mask,arch", [("fp16", 128, "full", 90), ("bf16", 64, "isolated", 80)])
def test_plugin_entry_point_compiles_for_gpu_targets(dtype, head_dim, mask, arch):
    # a fresh process: this one may have Triton in interpreter mode (set by the kernel tests)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILED, dtype, str(head_dim), mask, str(arch)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("compiled")
