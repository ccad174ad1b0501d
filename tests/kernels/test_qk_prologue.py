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


def oracle(x, pos, weight, eps, scale, theta=10000.0, axes=None, per_head=False):
    """float64, written from the definitions (not kernels.rope): x [B, N, H, D], pos [N, 3], scale [N]; ``axes``
    the RoPE band sizes (None: Wan's), ``per_head`` RMSNorm over each head's D channels with a [D] weight."""
    b, n, h, d = x.shape
    y = x.double()
    if weight is not None and per_head:
        rms = y.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
        y = y / rms * weight.double()
    elif weight is not None:
        rms = y.reshape(b, n, h * d).pow(2).mean(-1).add(eps).sqrt()
        y = y / rms[:, :, None, None] * weight.double().reshape(h, d)
    bands = axes or (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
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


HUNYUAN_AXES = (16, 56, 56)  # HunyuanVideo's rope_axes_dim at head_dim 128


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("norm", ["per_head", "across_heads", None])
@pytest.mark.parametrize("head_dim, axes", [(128, HUNYUAN_AXES), (64, (8, 24, 32))], ids=["d128-16-56-56", "d64-8-24-32"])
def test_prologue_axes_and_per_head_norm(dtype, norm, head_dim, axes, gen):
    """Explicit RoPE bands and the per-head RMSNorm ([D] weight), kernel (interpreted) and reference against the
    float64 oracle, at HunyuanVideo's theta; awkward token and head counts."""
    b, n_q, n_k, h = 2, 19, 23, 3
    q = torch.randn(b, n_q, h, head_dim, generator=gen).mul(3).to(dtype)
    k = torch.randn(b, n_k, h, head_dim, generator=gen).mul(3).to(dtype)
    q_pos = torch.randint(-60, 60, (n_q, 3), generator=gen)
    k_pos = torch.randint(-60, 60, (n_k, 3), generator=gen)
    size = {"per_head": head_dim, "across_heads": h * head_dim, None: None}[norm]
    wq, wk = ((torch.randn(size, generator=gen) if size else None) for _ in range(2))
    key_scale = torch.rand(n_k, generator=gen) * 1.5 + 0.25
    kw = dict(weight_q=wq, weight_k=wk, q_scale=0.3, key_scale=key_scale, theta=256.0, rope_axes=axes,
              norm=norm or "per_head")
    want_q = oracle(q, q_pos, wq, 1e-6, torch.full((n_q,), 0.3), 256.0, axes, norm == "per_head")
    want_k = oracle(k, k_pos, wk, 1e-6, key_scale, 256.0, axes, norm == "per_head")
    out_q, out_k = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))  # poisoned
    got = kernels.qk_prologue(q, k, q_pos, k_pos, out_q=out_q, out_k=out_k, backend="triton", **kw)
    assert got[0] is out_q and got[1] is out_k
    ref = kernels.qk_prologue_reference(q, k, q_pos, k_pos, **kw)
    for pair in (got, ref):
        for out, want in zip(pair, (want_q, want_k)):
            assert torch.isfinite(out).all()
            assert ((out.double() - want).norm() / want.norm()).item() < TOLERANCE[dtype]


def _hunyuan_rope(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """diffusers' HunyuanVideo rotary embedding of x [B, N, H, 128], N = T*H*W tokens of ``grid`` in row-major
    order: its (cos, sin) table and ``apply_rotary_emb`` as the transformer's attention processor applies them."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed

    rope = HunyuanVideoRotaryPosEmbed(patch_size=1, patch_size_t=1, rope_dim=list(HUNYUAN_AXES), theta=256.0)
    cos, sin = rope(torch.zeros(1, 4, *grid))
    assert cos.shape == (math.prod(grid), 128)
    return apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)


def _grid_positions(t: int, h: int, w: int) -> torch.Tensor:
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww], -1).reshape(-1, 3)


def test_rope_axes_match_diffusers_hunyuan_video(gen):
    """``qk_prologue_reference`` with HunyuanVideo's bands (16, 56, 56) and theta 256, no norm, no scale, is
    diffusers' ``HunyuanVideoRotaryPosEmbed`` + ``apply_rotary_emb`` on a (3, 4, 6) token grid."""
    grid = (3, 4, 6)
    x = torch.randn(2, math.prod(grid), 3, 128, generator=gen)
    pos = _grid_positions(*grid)
    want = _hunyuan_rope(x, grid)
    got, _ = kernels.qk_prologue_reference(x, x, pos, pos, theta=256.0, rope_axes=HUNYUAN_AXES)
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    # and the table a caller reuses across layers (prologue_rope_table) gives the same rotation
    table = kernels.prologue_rope_table(pos, 128, x, 256.0, backend="reference", rope_axes=HUNYUAN_AXES)
    tabled, _ = kernels.qk_prologue_reference(x, x, pos, pos, theta=256.0, rope_axes=HUNYUAN_AXES, q_rope=table)
    assert torch.equal(tabled, got)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_head_norm_matches_diffusers_rms_norm(backend, dtype, gen):
    """``norm="per_head"`` is diffusers' ``RMSNorm(head_dim, eps=1e-6)`` (float32 statistics) with a random
    weight, then HunyuanVideo's rotation; the reference path and the kernel (interpreted)."""
    from diffusers.models.normalization import RMSNorm

    grid = (3, 4, 6)
    x = torch.randn(2, math.prod(grid), 3, 128, generator=gen).mul(4).to(dtype)
    pos = _grid_positions(*grid)
    norm = RMSNorm(128, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(128, generator=gen))
        want = _hunyuan_rope(norm(x.float()), grid)  # diffusers in float32 on the same (rounded) input
        unrotated = norm(x.float())
    zero = torch.zeros_like(pos)
    got_norm, _ = kernels.qk_prologue(x, x, zero, zero, weight_q=norm.weight.detach(), weight_k=norm.weight.detach(),
                                      eps=1e-6, norm="per_head", rope_axes=HUNYUAN_AXES, backend=backend)
    got, _ = kernels.qk_prologue(x, x, pos, pos, weight_q=norm.weight.detach(), weight_k=norm.weight.detach(),
                                 eps=1e-6, theta=256.0, norm="per_head", rope_axes=HUNYUAN_AXES, backend=backend)
    tol = TOLERANCE[dtype] if dtype != torch.float32 else 1e-5  # diffusers' float32 rounding vs ours
    for out, ref in ((got_norm, unrotated), (got, want)):
        assert out.dtype == dtype
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < tol


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


def _prologue_call(backend, **changes):
    x = torch.zeros(1, 4, 2, 64)
    pos = torch.zeros(4, 3, dtype=torch.long)
    args = dict(q=x, k=x, q_pos=pos, k_pos=pos) | changes
    return lambda: kernels.qk_prologue(**args, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("changes, message", [
    (dict(weight_q=torch.ones(64), weight_k=torch.ones(64)), "weight_q must be \\[128\\] \\(heads x head_dim\\)"),
    (dict(weight_q=torch.ones(128), weight_k=torch.ones(128), norm="per_head"), "weight_q must be \\[64\\] \\(head_dim\\)"),
    (dict(norm="per_token"), "norm must be one of"),
    (dict(rope_axes=(16, 24, 22)), "three even positive ints summing to head_dim 64"),
    (dict(rope_axes=(20, 22, 24)), "three even positive ints"),
    (dict(rope_axes=(0, 32, 32)), "three even positive ints"),
    (dict(rope_axes=(32, 32)), "three even positive ints"),
])
def test_bad_norm_and_rope_axes(backend, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        _prologue_call(backend, **changes)()
    assert "\n" not in str(err.value)
