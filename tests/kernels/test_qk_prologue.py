"""The QK prologue kernel (through Triton's interpreter) against a float64 formulation written from Wan's
equations here: RMSNorm over all heads, the 3-axis RoPE rotation of interleaved pairs, the folded scales."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from tests.kernels.conftest import needs_interpreter

pytestmark = needs_interpreter

# relative Frobenius error per dtype: one rounding of the output (the inputs are in the dtype already)
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def oracle(x, pos, weight, eps, scale, theta=10000.0):
    """float64, written from the definitions (not kernels.rope): x [B, N, H, D], pos [N, 3], scale [N]."""
    b, n, h, d = x.shape
    y = x.double()
    if weight is not None:
        rms = y.reshape(b, n, h * d).pow(2).mean(-1).add(eps).sqrt()
        y = y / rms[:, :, None, None] * weight.double().reshape(h, d)
    bands = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    angles = []
    for axis, size in enumerate(bands):
        j = torch.arange(size // 2, dtype=torch.float64)
        angles.append(pos[:, axis, None].double() * theta ** (-2 * j / size))
    angle = torch.cat(angles, 1)  # [N, D/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    even, odd = y[..., 0::2], y[..., 1::2]
    out = torch.empty_like(y)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out * scale.double()[None, :, None, None]


CASES = [  # (batch, n_q, n_k, heads, head_dim): awkward token and head counts (the kernel pads heads to 2^k)
    (2, 29, 31, 3, 64),
    (1, 17, 5, 5, 128),
    (3, 1, 40, 1, 64),
]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
def test_prologue_matches_float64_oracle(dtype, case, norm, gen):
    b, n_q, n_k, h, d = case
    q = torch.randn(b, n_q, h, d, generator=gen).mul(3).to(dtype)
    k = torch.randn(b, n_k, h, d, generator=gen).mul(3).to(dtype)
    # decoupled references sit at large negative t: the kernel's trigonometry needs range reduction
    q_pos = torch.randint(-120, 120, (n_q, 3), generator=gen)
    k_pos = torch.randint(-120, 120, (n_k, 3), generator=gen)
    wq = torch.randn(h * d, generator=gen) if norm else None
    wk = torch.randn(h * d, generator=gen) if norm else None
    key_scale = torch.rand(n_k, generator=gen) * 1.5 + 0.25
    q_scale = kernels.LOG2E / math.sqrt(d)
    out_q, out_k = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))  # poisoned
    got_q, got_k = kernels.qk_prologue(q, k, q_pos, k_pos, weight_q=wq, weight_k=wk, eps=1e-6, q_scale=q_scale,
                                       key_scale=key_scale, out_q=out_q, out_k=out_k, backend="triton")
    assert got_q is out_q and got_k is out_k
    want_q = oracle(q, q_pos, wq, 1e-6, torch.full((n_q,), q_scale))
    want_k = oracle(k, k_pos, wk, 1e-6, key_scale)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert torch.isfinite(got).all()
        assert ((got.double() - want).norm() / want.norm()).item() < TOLERANCE[dtype]
    # the reference (the CPU path) agrees with the oracle too
    ref_q, ref_k = kernels.qk_prologue_reference(q, k, q_pos, k_pos, weight_q=wq, weight_k=wk, q_scale=q_scale,
                                                 key_scale=key_scale)
    assert ((ref_k.double() - want_k).norm() / want_k.norm()).item() < TOLERANCE[dtype]


def test_prologue_writes_into_slices_of_a_joint_buffer(gen):
    """Two streams (own weights, positions, key scales) written straight into one [video | reference] buffer."""
    h, d = 2, 64
    video, ref = (torch.randn(2, n, h, d, generator=gen) for n in (13, 7))
    joint = torch.full((2, 20, h, d), float("nan"))
    pos_v, pos_r = torch.randint(0, 9, (13, 3), generator=gen), torch.randint(-9, 0, (7, 3), generator=gen)
    w_v, w_r = torch.randn(h * d, generator=gen), torch.randn(h * d, generator=gen)
    scale_r = torch.rand(7, generator=gen) + 0.5
    for x, pos, w, scale, sl in ((video, pos_v, w_v, None, slice(0, 13)), (ref, pos_r, w_r, scale_r, slice(13, 20))):
        kernels.qk_prologue(None, x, None, pos, weight_q=w, weight_k=w, key_scale=scale, out_k=joint[:, sl],
                            backend="triton")
    want = torch.cat([oracle(video, pos_v, w_v, 1e-6, torch.ones(13)), oracle(ref, pos_r, w_r, 1e-6, scale_r)], 1)
    assert ((joint.double() - want).norm() / want.norm()).item() < 2e-6


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.qk_prologue(torch.zeros(1, 4, 2, 64), torch.zeros(1, 4, 2, 64), torch.zeros(4, 2, dtype=torch.long),
                                 torch.zeros(4, 3, dtype=torch.long), backend="triton"), "q_pos must be integer"),
    (lambda: kernels.qk_prologue(torch.zeros(1, 4, 2, 64), torch.zeros(1, 4, 2, 64), torch.zeros(4, 3, dtype=torch.long),
                                 torch.zeros(4, 3, dtype=torch.long), weight_q=torch.ones(128), backend="triton"),
     "both be given"),
    (lambda: kernels.qk_prologue(torch.zeros(1, 4, 2, 64), torch.zeros(1, 4, 2, 64), torch.zeros(4, 3, dtype=torch.long),
                                 torch.zeros(4, 3, dtype=torch.long), key_scale=torch.ones(3), backend="triton"),
     "key_scale must be"),
    (lambda: kernels.qk_prologue(torch.zeros(1, 4, 2, 64), torch.zeros(1, 4, 3, 64), torch.zeros(4, 3, dtype=torch.long),
                                 torch.zeros(4, 3, dtype=torch.long), backend="triton"), "must agree"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
