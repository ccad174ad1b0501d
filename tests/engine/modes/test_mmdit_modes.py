"""The seed methods' modes on the MMDiT (HunyuanVideo) against their float64 formulations.

ProFashion PPA (``ref_attention="prototype"``): in every block the video rows of frame i entering the output
projection must be the attention of frame i's queries over [every video key | frame i's prototype | the prompt's
text keys], and the text rows the attention over [video | text] (a prototype belongs to one frame); the prototypes
are ``test_prototype.fine_prototypes`` (Eqs. 5-8 in float64, from the raw poses and the isolated reference
stream's attention input, captured) projected by the video block's K/V with HunyuanVideo's per-head key RMSNorm
(Eq. 10), at ``test_prototype.prototype_grid``'s positions.

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
from ..test_mmdit import SMALL_MMDIT, mmdit_dir, mmdit_inputs  # noqa: F401  (fixture)
from .test_prototype import fine_prototypes, pose_inputs, prototype_grid
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


def captured_calls(model, x) -> dict:
    """One forward of ``model`` on ``x``: every call's (input, output) of every Linear, by module, in call order."""
    calls, handles = {}, []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(
                lambda m, args, out: calls.setdefault(m, []).append((args[0], out))))
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


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
    calls = captured_calls(model, x)
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
    with pytest.raises(ValueError, match="view_logit_scales=.* is not implemented on the MMDiT"):
        MvgenConfig.from_dict(MMDIT.config_values(SMALL_MMDIT), view_logit_scales=(1.0, 2.0, 1.0))


def ppa_inputs(seed, num_refs, ref_hw=(4, 10)):
    x = mmdit_inputs(seed, "i2v", *VIDEO, refs=num_refs)
    gen = torch.Generator().manual_seed(seed)
    x["ref_latents"] = torch.randn(2, num_refs, 16, *ref_hw, generator=gen)
    x["frame_pose"], x["ref_pose"] = pose_inputs(gen, 2, VIDEO[0], VIDEO[1], VIDEO[2], num_refs, ref_hw)
    return x


def rms_heads(x, norm, heads):
    """HunyuanVideo's per-head key RMSNorm in float64, x [B, N, D] -> [B, N, H, Dh]."""
    x = x.unflatten(-1, (heads, -1))
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()


@pytest.mark.parametrize("ref_rope", ["decoupled", "none"])
@pytest.mark.parametrize("num_refs", [1, 3])
def test_ppa_blocks_match_equations(num_refs, ref_rope):
    model = build(ref_attention="prototype", ref_rope=ref_rope)
    x = ppa_inputs(60 + num_refs, num_refs)
    calls = captured_calls(model, x)
    cfg, heads_n = model.config, model.config.num_attention_heads
    fhw, rhw = (VIDEO[0], VIDEO[1] // 2, VIDEO[2] // 2), (2, 5)
    per_frame, n_video, tokens = fhw[1] * fhw[2], math.prod(fhw), math.prod(rhw)
    text_len = x["text_mask"].sum(1).to(torch.int64)
    heads = lambda t: t.unflatten(-1, (heads_n, -1))  # noqa: E731
    video_pos, text_pos = grid_positions(*fhw), torch.zeros(x["text"].shape[1], 3, dtype=torch.long)
    rope = dict(theta=cfg.rope_theta, rope_axes=cfg.rope_axes_dim)
    pairs = [*zip(model.transformer_blocks, model.ref_blocks),
             *zip(model.single_transformer_blocks, model.ref_single_blocks)]
    for layer, (block, ref_block) in enumerate(pairs):
        attn, dual = block.attn, hasattr(block, "ff")
        q, k, v = (heads(calls[getattr(attn, f"to_{n}")][0][1]) for n in "qkv")  # the video stream's
        q, k = attn.norm_q(q).double(), attn.norm_k(k).double()
        text = [heads(calls[getattr(attn, f"add_{n}_proj")][0][1] if dual else calls[getattr(attn, f"to_{n}")][1][1])
                for n in "qkv"]
        tq, tk = ((attn.norm_added_q, attn.norm_added_k) if dual else (attn.norm_q, attn.norm_k))
        tq, tk, tv = tq(text[0]).double(), tk(text[1]).double(), text[2].double()
        z = calls[ref_block.attn.to_k][0][0].double().unflatten(1, (num_refs, -1))  # the references' input, alone
        proto = fine_prototypes(model.prototype.double(), layer, x["frame_pose"].double(), x["ref_pose"].double(), z,
                                fhw[1:], rhw)
        kp = rms_heads(proto @ attn.to_k.weight.double().T + attn.to_k.bias.double(), attn.norm_k, heads_n)
        vp = (proto @ attn.to_v.weight.double().T + attn.to_v.bias.double()).unflatten(-1, (heads_n, -1))
        model.prototype.float()
        want = torch.zeros_like(q)
        for fi in range(fhw[0]):
            rows = slice(fi * per_frame, (fi + 1) * per_frame)
            keys, values = torch.cat([k, kp[:, fi], tk], 1), torch.cat([v.double(), vp[:, fi], tv], 1)
            pos = torch.cat([video_pos, torch.tensor(prototype_grid(ref_rope, fi, fhw, rhw)), text_pos])
            want[:, rows] = joint_attention_reference(
                q[:, rows], keys, values, video_pos[rows], pos, q_offsets=(per_frame, per_frame),
                k_offsets=(n_video, n_video + tokens), key_lengths=n_video + tokens + text_len, **rope)
        out = block.attn.to_out[0] if dual else block.proj_out
        got = heads(calls[out][0][0][..., :cfg.inner_dim])
        assert rel_err(got, want) < PARITY_RTOL
        # the text rows: video and text keys, no prototype
        want_text = joint_attention_reference(
            tq, torch.cat([k, tk], 1), torch.cat([v.double(), tv], 1), text_pos, torch.cat([video_pos, text_pos]),
            q_offsets=(0, 0), k_offsets=(n_video, n_video), key_lengths=n_video + text_len, **rope)
        text_out = attn.to_add_out if dual else block.proj_out
        got_text = heads(calls[text_out][0 if dual else 1][0][..., :cfg.inner_dim])
        valid = torch.arange(tq.shape[1])[None, :] < text_len[:, None]  # padded text rows read nothing real
        assert rel_err(got_text[valid], want_text[valid]) < PARITY_RTOL


@pytest.mark.parametrize("no_refs", ["none", "empty"])
def test_ppa_without_references_is_the_base_model(no_refs):
    model = build(ref_attention="prototype")
    plain = build()  # the same seed: the same base weights (PPA's modules are extra)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prototype.")})
    x = mmdit_inputs(67, "i2v", *VIDEO, refs=0)
    if no_refs == "none":
        x["ref_latents"] = None
    with torch.no_grad():
        assert torch.equal(model(**x), plain(**x))


@pytest.mark.parametrize("num_refs", [1, 2])
def test_ppa_reference_cache_equals_recompute(num_refs):
    model = build(ref_attention="prototype", ref_timestep="zero")
    x = ppa_inputs(70 + num_refs, num_refs)
    with torch.no_grad():
        cache = model.precompute_reference(x["ref_latents"], None, None, VIDEO, text_mask=x["text_mask"],
                                           pooled_text=x["pooled_text"])
        live = model(**x)
        cached = model(**{**x, "ref_latents": None, "ref_cache": cache})
    assert rel_err(cached, live) < 1e-6  # float32: the same per-layer features (0 measured)
    assert len(cache.keys) == model.config.num_layers + model.config.num_single_layers


def test_ppa_pose_inputs_are_checked():
    model = build(ref_attention="prototype")
    x = ppa_inputs(73, 2)
    with pytest.raises(ValueError, match="needs frame_pose"):
        model(**{**x, "frame_pose": None})
    with pytest.raises(ValueError, match=r"ref_pose must be \[B, 2, 3, 4, 10\]"):
        model(**{**x, "ref_pose": x["ref_pose"][..., :8]})


def test_modes_load_from_a_checkpoint_and_an_adapter(mmdit_dir, tmp_path):
    """``load_denoiser``: MVAnimate's omega starts at the paper's values (float32 in a bfloat16 model); PPA's modules
    come from the adapter, and without them the load names what is missing and the setting that needs it."""
    from safetensors.torch import save_file

    from engine.backbones.registry import load_denoiser
    from engine.errors import AdapterError

    path, task, _ = mmdit_dir
    den = load_denoiser(path, view_attention="multiview", dtype=torch.bfloat16)
    assert den.view_omega.dtype == torch.float32 and den.view_omega.tolist() == pytest.approx([0.25, 0.25, 0.1])
    with pytest.raises(AdapterError, match=r"no adapter was given, so the model lacks .*prototype\.pose_encoder.* "
                                           r"which ref_attention='prototype' needs"):
        load_denoiser(path, ref_attention="prototype")
    with torch.device("meta"):
        modes = {k: v.shape for k, v in MultiViewMMDiT(den.config.replace(
            view_attention="none", ref_attention="prototype")).state_dict().items() if k.startswith("prototype.")}
    gen = torch.Generator().manual_seed(79)
    save_file({k: torch.randn(s, generator=gen) * 0.1 for k, s in modes.items()}, tmp_path / "ppa.safetensors")
    ppa = load_denoiser(path, tmp_path / "ppa.safetensors", ref_attention="prototype")
    x = ppa_inputs(81, 2) if task == "i2v" else None
    if x is not None:
        with torch.no_grad():
            assert ppa(**x).isfinite().all()
