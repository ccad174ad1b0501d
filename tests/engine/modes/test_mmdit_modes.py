"""The seed methods' modes on the MMDiT (HunyuanVideo) against their float64 formulations.

MVAnimate's Eq. 2 (``view_attention="multiview"``): in every block (dual-stream, then single-stream) the video rows
entering the output projection must be ``(A_joint + lambda * A_mv) / (1 + lambda)`` of that block's own q/k/v.
A_joint's oracle is the joint attention's float64 reference over [video | references | text] (``kernels``, itself
checked against SDPA) with the text padding masked by key lengths and HunyuanVideo's RoPE bands; A_mv's is the
token-by-token Eq. 2 of ``test_view_attention.eq2_oracle`` (written from the paper). The captured q/k are the
blocks' own projections, RMS-normalised here by the blocks' diffusers norms.

M2HVideo's identity adapter does not apply (it fuses a second image cross-attention with Wan's CLIP branch; the
MMDiT has no cross-attention) and is refused by name.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.backbones.families import MMDIT
from engine.backbones.mmdit.model import MultiViewMMDiT
from engine.config import MvgenConfig
from engine.streams.positions import grid_positions, rd_rope_positions
from kernels.joint_attention.reference import joint_attention_reference

from ..conftest import PARITY_RTOL, rel_err
from ..test_mmdit import SMALL_MMDIT, mmdit_inputs
from .test_view_attention import eq2_oracle

OMEGA = (0.7, 1.3, 0.4)
VIDEO = (2, 6, 8)  # latent frames, height, width: 2 x 3 x 4 tokens


def build(seed: int = 0, **overrides) -> MultiViewMMDiT:
    """A small HunyuanVideo-I2V MMDiT, every weight random (its own reference stream included)."""
    torch.manual_seed(seed)
    config = MvgenConfig.from_dict(MMDIT.config_values(SMALL_MMDIT), **overrides)
    model = MultiViewMMDiT(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def pair(omega=OMEGA, **overrides):
    """(plain, multiview) MMDiTs with the same weights; the multiview one's omega set as an adapter's would be."""
    plain = build(**overrides)
    multiview = MultiViewMMDiT(plain.config.replace(view_attention="multiview")).eval().requires_grad_(False)
    multiview.load_state_dict(plain.state_dict())  # strict: view_omega comes from the paper's initialisation hook
    if omega is not None:
        multiview.view_omega.copy_(torch.tensor(omega))
    return plain, multiview


def capture(model):
    """Every call's (input, output) of every Linear, by module, in call order."""
    calls, handles = {}, []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(
                lambda m, args, out: calls.setdefault(m, []).append((args[0], out))))
    return calls, handles


def stream_qkv(calls, block, ref_block, heads):
    """One block's (q, k, v) per stream [B, N, heads, Dh], q/k RMS-normalised by the block's own norms: the video's
    and the text's (a dual-stream block's added projections; a single-stream block's shared projections, which
    run for the video first, then the text), the reference stream's from its own block."""
    attn, ref = block.attn, ref_block.attn
    dual = hasattr(block, "ff")
    out = {}
    for n in "qkv":
        proj = getattr(attn, f"to_{n}")
        video = heads(calls[proj][0][1])
        text = heads(calls[getattr(attn, f"add_{n}_proj")][0][1] if dual else calls[proj][1][1])
        reference = heads(calls[getattr(ref, f"to_{n}")][0][1])
        if n != "v":
            norm, added = getattr(attn, f"norm_{n}"), getattr(attn, f"norm_added_{n}") if dual else None
            video, reference = norm(video), getattr(ref, f"norm_{n}")(reference)
            text = (added if dual else norm)(text)
        out[n] = torch.cat([video, reference, text], 1).double()
    return out["q"], out["k"], out["v"]


@pytest.mark.parametrize("views,ref_hw,view_lambda", [(1, (6, 8), 1.0), (2, (4, 10), 0.35), (3, (8, 4), 1.0)])
def test_blocks_match_eq2(views, ref_hw, view_lambda):
    _, model = pair(view_lambda=view_lambda)
    x = mmdit_inputs(20 + views, "i2v", *VIDEO, refs=views)
    x["ref_latents"] = torch.randn(2, views, 16, *ref_hw, generator=torch.Generator().manual_seed(views))
    calls, handles = capture(model)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for handle in handles:
            handle.remove()
    cfg = model.config
    fhw, rhw = (VIDEO[0], VIDEO[1] // 2, VIDEO[2] // 2), (ref_hw[0] // 2, ref_hw[1] // 2)
    n_video, n_ref, n_text = math.prod(fhw), views * math.prod(rhw), x["text"].shape[1]
    pos = torch.cat([grid_positions(*fhw), rd_rope_positions(cfg.ref_rope, views, rhw, fhw, cfg.ref_t_stride),
                     torch.zeros(n_text, 3, dtype=torch.long)])
    key_lengths = n_video + n_ref + x["text_mask"].sum(1).to(torch.int64)
    omega = torch.tensor(OMEGA[:views]).expand(2, views)
    heads = lambda t: t.unflatten(-1, (cfg.num_attention_heads, -1))  # noqa: E731
    pairs = [*zip(model.transformer_blocks, model.ref_blocks),
             *zip(model.single_transformer_blocks, model.ref_single_blocks)]
    for block, ref_block in pairs:
        q, k, v = stream_qkv(calls, block, ref_block, heads)
        offsets = (n_video, n_video + n_ref)
        a_joint = joint_attention_reference(q, k, v, pos, pos, q_offsets=offsets, k_offsets=offsets,
                                            key_lengths=key_lengths, theta=cfg.rope_theta,
                                            rope_axes=cfg.rope_axes_dim)[:, :n_video]
        a_mv = eq2_oracle(q[:, :n_video], k[:, n_video:offsets[1]], v[:, n_video:offsets[1]], omega, fhw, rhw)
        want = (a_joint + view_lambda * a_mv) / (1 + view_lambda)
        # the video rows entering the output projection (a single-stream block's reads [attention | MLP])
        out = block.attn.to_out[0] if hasattr(block, "ff") else block.proj_out
        got = heads(calls[out][0][0][..., :cfg.inner_dim])
        assert rel_err(got, want) < PARITY_RTOL


@pytest.mark.parametrize("path_kind", ["live", "cached"])
def test_omega_one_lambda_zero_is_the_plain_model_exactly(path_kind):
    """``(A + 0 * X) / (1 + 0)`` is A bit for bit: with lambda 0 the multiview MMDiT is its plain model."""
    settings = dict(ref_attention="isolated", ref_timestep="zero") if path_kind == "cached" else {}
    plain, model = pair(omega=(1.0, 1.0, 1.0), view_lambda=0.0, **settings)
    x = mmdit_inputs(31, "i2v", *VIDEO, refs=3)
    with torch.no_grad():
        if path_kind == "cached":
            cache = model.precompute_reference(x["ref_latents"], None, None, VIDEO, text_mask=x["text_mask"],
                                               pooled_text=x["pooled_text"])
            x = {**x, "ref_latents": None, "ref_cache": cache}
        assert torch.equal(model(**x), plain(**x))


def test_no_references_is_the_plain_model_exactly():
    plain, model = pair()
    x = mmdit_inputs(37, "i2v", *VIDEO, refs=0)
    with torch.no_grad():
        assert torch.equal(model(**x), plain(**x))
        assert torch.equal(model(**{**x, "ref_latents": None}), plain(**{**x, "ref_latents": None}))


@pytest.mark.parametrize("views", [1, 3])
def test_cached_path_equals_live_path(views):
    """The reference cache (``isolated`` + ``zero``) keeps exactly the normalised keys and values Eq. 2 reads."""
    _, model = pair(view_lambda=0.8, ref_attention="isolated", ref_timestep="zero")
    gen = torch.Generator().manual_seed(41 + views)
    x = mmdit_inputs(41 + views, "i2v", *VIDEO, refs=views)
    omega = torch.rand(2, views, generator=gen) + 0.2
    with torch.no_grad():
        cache = model.precompute_reference(x["ref_latents"], None, None, VIDEO, text_mask=x["text_mask"],
                                           pooled_text=x["pooled_text"])
        live = model(**x, view_omega=omega)
        cached = model(**{**x, "ref_latents": None, "ref_cache": cache}, view_omega=omega)
    assert rel_err(cached, live) < 1e-6  # float32: 0 to 1e-7 measured (the same per-layer tensors)


def test_per_request_omega_overrides_the_model():
    _, model = pair()
    x = mmdit_inputs(43, "i2v", *VIDEO, refs=2)
    rows = torch.tensor([list(OMEGA[:2]), [2.0, 0.1]])
    with torch.no_grad():
        both = model(**x, view_omega=rows)
        first = model(**{k: v[:1] for k, v in x.items()})
        second = model(**{k: v[1:] for k, v in x.items()}, view_omega=rows[1:])
        default = model(**x)
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)  # row 0 asked for the model's omega
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-6)
    assert rel_err(both[1:], default[1:]) > 1e-3  # row 1's omega changed its output


def test_mode_inputs_are_checked():
    plain, model = pair()
    x = mmdit_inputs(47, "i2v", *VIDEO, refs=2)
    with pytest.raises(ValueError, match="view_omega is for denoisers with MVAnimate"):
        plain(**x, view_omega=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"view_omega must be \[batch, references\] = \[2, 2\]"):
        model(**x, view_omega=torch.ones(2, 3))
    with pytest.raises(ValueError, match="identity=True is not implemented on the MMDiT"):
        MvgenConfig.from_dict(MMDIT.config_values(SMALL_MMDIT), identity=True, image_dim=16)
    with pytest.raises(ValueError, match="ref_attention='prototype' is not implemented on the MMDiT"):
        MvgenConfig.from_dict(MMDIT.config_values(SMALL_MMDIT), ref_attention="prototype")
