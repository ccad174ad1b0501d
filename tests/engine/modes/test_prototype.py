"""ProFashion PPA (``ref_attention="prototype"``) against a float64 formulation written from Eqs. 5-10.

The oracle below re-derives the pose encoding, the selector (Eqs. 5-6), the selection map (Eq. 7), the
fine-grained prototype (Eq. 8), its projection by the video attention (Eq. 10), RoPE and the per-frame
attention with plain loops and einsums; it calls neither ``engine.modes.prototype`` nor ``kernels``. The
Wan pieces around the attention (patch/time/text embeddings, norms, modulation, cross-attention, FFN, head)
are the denoiser's own, checked against diffusers by tests/engine/test_denoiser.py.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.modes.prototype import POSE_DIM, PrototypeAggregator, attention_flops
from kernels import prototype_aggregate
from kernels.joint_attention.reference import attention_mask

from ..conftest import PARITY_RTOL, SMALL_WAN, inputs, make_wan, rel_err

THETA = 10000.0
VIDEO = (3, 6, 8)  # latent frames, height, width: a 3 x 3 x 4 token grid
REF_HW = (4, 10)  # latent reference grid: 2 x 5 tokens, wider than the video (a negative centring offset)


# ---- the oracle ----------------------------------------------------------------------------------------------
def sincos(positions, dim):
    """P: [sin(h w_k), cos(h w_k), sin(w w_k), cos(w w_k)], w_k = 10000**(-k / (dim/4)), float64 [N, dim]."""
    rows = []
    for h, w in positions:
        omega = [10000.0 ** (-k / (dim // 4)) for k in range(dim // 4)]
        rows.append([math.sin(h * o) for o in omega] + [math.cos(h * o) for o in omega]
                    + [math.sin(w * o) for o in omega] + [math.cos(w * o) for o in omega])
    return torch.tensor(rows, dtype=torch.float64)


def group_norm(x, norm, groups=32):
    """GroupNorm (32 groups) of each image x [N, L, C] over (its positions, the channels of a group)."""
    n, length, c = x.shape
    g = x.reshape(n, length, groups, c // groups)
    mean = g.mean(dim=(1, 3), keepdim=True)
    var = g.var(dim=(1, 3), unbiased=False, keepdim=True)
    return ((g - mean) / torch.sqrt(var + norm.eps)).reshape(n, length, c) * norm.weight + norm.bias


def rms_norm(x, norm):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def rope(x, positions):
    """Wan's RoPE from DESIGN.md: bands t, h, w of d - 4(d//6), 2(d//6), 2(d//6) channels; pair j of a band of
    n channels (channels 2j, 2j+1) turns by pos * theta**(-2j/n). x [B, N, H, D], positions [N, 3]."""
    d = x.shape[-1]
    bands = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    pos = torch.tensor(positions, dtype=torch.float64).reshape(-1, 3)
    out, start = x.clone(), 0
    for axis, n in enumerate(bands):
        for j in range(n // 2):
            angle = pos[:, axis] * THETA ** (-2 * j / n)
            cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
            a, b = x[..., start + 2 * j], x[..., start + 2 * j + 1]
            out[..., start + 2 * j] = a * cos - b * sin
            out[..., start + 2 * j + 1] = a * sin + b * cos
        start += n
    return out


def attention(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v per head; q [B, Nq, H, Dh], k/v [B, Nk, H, Dh]."""
    p = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def encode_pose(weight, bias, pose):
    """The 1x2x2 patch embedding as a stride-2 convolution: [B, N, Cp, H, W] -> [B, N, h*w, d]."""
    y = F.conv2d(pose.flatten(0, 1).double(), weight, bias, stride=2)
    return y.flatten(2).transpose(1, 2).unflatten(0, pose.shape[:2])


def grid(h0, w0, hs, ws):
    return [(h0 + y, w0 + x) for y in range(hs) for x in range(ws)]


def ppa_oracle(agg, layer, frame_pose, ref_pose, z, attn, video_hw, ref_hw):
    """Eqs. 5-8 and Eq. 10's projection in float64: prototype keys (RMS-normalised) and values
    [B, F, T, H, Dh] from the raw pose images and the references' attention input z [B, R, T, D]."""
    proto = fine_prototypes(agg, layer, frame_pose, ref_pose, z, video_hw, ref_hw)
    # Eq. 10: cross_attn(z, z (+) z_R) projects the prototype with the video attention's K/V
    keys = rms_norm(proto @ attn.to_k.weight.T + attn.to_k.bias, attn.norm_k)
    values = proto @ attn.to_v.weight.T + attn.to_v.bias
    heads = (attn.heads, -1)
    return keys.unflatten(-1, heads), values.unflatten(-1, heads)


def fine_prototypes(agg, layer, frame_pose, ref_pose, z, video_hw, ref_hw):
    """Eqs. 5-8 in float64: each frame's fine-grained prototype [B, F, T, D] from the raw pose images and the
    references' attention input z [B, R, T, D]."""
    (h, w), (hr, wr) = video_hw, ref_hw
    d = agg.pose_encoder.weight.shape[0]
    sel = agg.selectors[layer]
    xf = encode_pose(agg.pose_encoder.weight, agg.pose_encoder.bias, frame_pose) + sincos(grid(0, 0, h, w), d)
    xr = encode_pose(agg.pose_encoder.weight, agg.pose_encoder.bias, ref_pose) + sincos(
        grid((h - hr) // 2, (w - wr) // 2, hr, wr), d)  # references centred on the video grid
    b, frames, _, _ = xf.shape
    num_refs, tokens = xr.shape[1:3]
    q = group_norm(xf.flatten(0, 1), sel.norm_q).unflatten(0, (b, frames)) @ sel.to_q.weight.T + sel.to_q.bias  # (5)
    k = group_norm(xr.flatten(0, 1), sel.norm_k).unflatten(0, (b, num_refs)) @ sel.to_k.weight.T + sel.to_k.bias  # (6)
    k = k.reshape(b, num_refs * tokens, d)
    m = torch.zeros(b, frames, num_refs * tokens, dtype=torch.float64)
    for i in range(frames):  # Eq. 7: softmax over all R*T reference tokens, averaged over frame i's queries
        m[:, i] = (q[:, i] @ k.transpose(1, 2) / math.sqrt(d)).softmax(-1).mean(1)
    m = m.reshape(b, frames, num_refs, tokens)
    proto = torch.zeros(b, frames, tokens, z.shape[-1], dtype=torch.float64)
    for r in range(num_refs):  # Eq. 8: sum over the references of z_r weighted by the map
        proto += m[:, :, r, :, None] * z[:, None, r]
    return proto


def reference_positions(ref_rope, num_refs, video_fhw, ref_hw):
    """Where the reference stream's tokens sit (DESIGN.md's ref_rope schemes; t_stride 1)."""
    (f, h, w), (hr, wr) = video_fhw, ref_hw
    if ref_rope == "none":
        return [(0, 0, 0)] * (num_refs * hr * wr)
    if ref_rope == "shared":
        return [(f + k, y, x) for k in range(num_refs) for y, x in grid(0, 0, hr, wr)]
    return [(-(k + 1), y, x) for k in range(num_refs) for y, x in grid((h - hr) // 2, (w - wr) // 2, hr, wr)]


def prototype_grid(ref_rope, frame, video_fhw, ref_hw):
    """Prototype i sits at t = i on the reference grid (centred under decoupled); unrotated under none."""
    (_, h, w), (hr, wr) = video_fhw, ref_hw
    if ref_rope == "none":
        return [(0, 0, 0)] * (hr * wr)
    h0, w0 = ((h - hr) // 2, (w - wr) // 2) if ref_rope == "decoupled" else (0, 0)
    return [(frame, y, x) for y, x in grid(h0, w0, hr, wr)]


def projections(attn, h):
    q = rms_norm(attn.to_q(h), attn.norm_q).unflatten(-1, (attn.heads, -1))
    k = rms_norm(attn.to_k(h), attn.norm_k).unflatten(-1, (attn.heads, -1))
    return q, k, attn.to_v(h).unflatten(-1, (attn.heads, -1))


def denoiser_oracle(model, x, frame_pose, ref_pose):
    """The prototype denoiser's velocity in float64 (``model`` a float64 copy)."""
    cfg = model.config
    b, _, f, height, width = x["latents"].shape
    h, w = height // 2, width // 2
    num_refs, hr, wr = x["ref_latents"].shape[1], x["ref_latents"].shape[3] // 2, x["ref_latents"].shape[4] // 2
    d64 = lambda t: t.double() if t is not None else None  # noqa: E731
    video = torch.cat([d64(x["latents"]), d64(x["condition"])], 1)
    tokens = model.patch_embedding(video).flatten(2).transpose(1, 2)
    temb, tproj = model.condition_embedder.time(x["timestep"], torch.float64)
    ref_t = torch.zeros_like(x["timestep"]) if cfg.ref_timestep == "zero" else x["timestep"]
    _, ref_tproj = model.condition_embedder.time(ref_t, torch.float64)
    text, image = model._contexts(d64(x["text"]), d64(x["image_context"]))
    r = model.embed_references(d64(x["ref_latents"]))
    video_pos = [(t, y, xx) for t in range(f) for y, xx in grid(0, 0, h, w)]
    ref_pos = reference_positions(cfg.ref_rope, num_refs, (f, h, w), (hr, wr))
    per_frame = h * w
    for i, (block, ref_block) in enumerate(zip(model.blocks, model.ref_blocks)):
        mod, mod_r = block.modulation(tproj), ref_block.modulation(ref_tproj)
        q, k, v = projections(block.attn1, block.attention_input(tokens, mod))
        q, k = rope(q, video_pos), rope(k, video_pos)
        z = ref_block.attention_input(r, mod_r)
        kp, vp = ppa_oracle(model.prototype, i, d64(frame_pose), d64(ref_pose), z.unflatten(1, (num_refs, -1)),
                            block.attn1, (h, w), (hr, wr))
        out = torch.zeros_like(q)
        for fi in range(f):  # frame fi's queries: every video key plus prototype fi
            rows = slice(fi * per_frame, (fi + 1) * per_frame)
            keys = torch.cat([k, rope(kp[:, fi], prototype_grid(cfg.ref_rope, fi, (f, h, w), (hr, wr)))], 1)
            out[:, rows] = attention(q[:, rows], keys, torch.cat([v, vp[:, fi]], 1))
        tokens_next = block.finish(tokens, out, mod, block.attn2.cross_kv(text, image))
        qr, kr, vr = projections(ref_block.attn1, z)  # the reference stream: references only
        r = ref_block.finish(r, attention(rope(qr, ref_pos), rope(kr, ref_pos), vr), mod_r, ref_block.attn2.cross_kv(text, image))
        tokens = tokens_next
    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    y = model.proj_out(model.norm_out(tokens) * (1 + scale) + shift)
    y = y.reshape(b, f, h, w, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return y.reshape(b, -1, f, height, width)


# ---- models and inputs ---------------------------------------------------------------------------------------
def prototype_denoiser(seed=0, **overrides) -> MultiViewWanTransformer:
    """A small diffusers Wan2.1-I2V as the video stream, a perturbed copy as the reference stream (a merged
    LoRA's effect) and random PPA weights (GroupNorm affines included)."""
    cfg = MvgenConfig.from_dict(SMALL_WAN, ref_attention="prototype", **overrides)
    model = MultiViewWanTransformer(cfg).eval().requires_grad_(False)
    wan = make_wan(seed, **{k: v for k, v in overrides.items() if k in SMALL_WAN})
    missing, unexpected = model.load_state_dict(wan.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("ref_blocks.", "prototype.", "view_logit_scales")) for k in missing)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.init_reference_stream_from_base()
        for p in (*model.ref_blocks.parameters(), *model.prototype.parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def pose_inputs(gen, batch, frames, height, width, num_refs, ref_hw, channels=3):
    """Rendered pose images in [-1, 1] on the latent grids."""
    return (torch.rand(batch, frames, channels, height, width, generator=gen) * 2 - 1,
            torch.rand(batch, num_refs, channels, *ref_hw, generator=gen) * 2 - 1)


def case(seed, num_refs, batch=2):
    gen = torch.Generator().manual_seed(seed)
    x = inputs(gen, batch=batch, frames=VIDEO[0], height=VIDEO[1], width=VIDEO[2], refs=num_refs, ref_hw=REF_HW)
    frame_pose, ref_pose = pose_inputs(gen, batch, *VIDEO, num_refs, REF_HW)
    return x, frame_pose, ref_pose


# ---- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_refs", [1, 3])
def test_selector_and_aggregation_match_equations(num_refs):
    """PoseTokens -> selector -> map -> prototype -> K/V, against Eqs. 5-8 + 10 from the raw pose images."""
    model = prototype_denoiser(seed=3)
    agg, attn = model.prototype, model.blocks[1].attn1
    x, frame_pose, ref_pose = case(4, num_refs)
    (f, hl, wl), (hr, wr) = VIDEO, (REF_HW[0] // 2, REF_HW[1] // 2)
    z = torch.randn(2, num_refs * hr * wr, model.config.inner_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        poses = agg.encode_poses(frame_pose, ref_pose, (f, hl // 2, wl // 2), num_refs, (hr, wr))
        keys, values = agg.prototype_kv(1, poses, *agg.reference_features(z, attn), attn)
    agg64, attn64 = copy.deepcopy(agg).double(), copy.deepcopy(attn).double()
    want_k, want_v = ppa_oracle(agg64, 1, frame_pose.double(), ref_pose.double(),
                                z.double().unflatten(1, (num_refs, -1)), attn64, (hl // 2, wl // 2), (hr, wr))
    assert keys.shape == (2, f * hr * wr, 2, 24) and values.shape == keys.shape
    assert rel_err(keys, want_k.flatten(1, 2)) < PARITY_RTOL
    assert rel_err(values, want_v.flatten(1, 2)) < PARITY_RTOL


@pytest.mark.parametrize("ref_rope", ["decoupled", "shared", "none"])
@pytest.mark.parametrize("num_refs", [1, 3])
def test_denoiser_matches_equations(ref_rope, num_refs):
    model = prototype_denoiser(seed=num_refs, ref_rope=ref_rope)
    x, frame_pose, ref_pose = case(10 + num_refs, num_refs)
    with torch.no_grad():
        got = model(**x, frame_pose=frame_pose, ref_pose=ref_pose)
        want = denoiser_oracle(copy.deepcopy(model).double(), x, frame_pose, ref_pose)
        base = model(**{**x, "ref_latents": None})
    assert got.shape == x["latents"].shape
    assert rel_err(got, want) < PARITY_RTOL
    # the prototypes matter at this tolerance: without them the output is far from the oracle
    assert rel_err(base, want) > 1e-2


def test_selector_weights_steer_the_output():
    """The selection map steers the prototypes: a sharper map, or the references' poses permuted, changes the output.

    Only slightly: Eq. 7's map sums to 1 over all R*T reference tokens, so a prototype token is about 1/T of a
    feature (T = 10 here) and the video projection's biases weigh as much as its content. Float32 noise is ~1e-7.
    """
    model = prototype_denoiser(seed=7)
    x, frame_pose, ref_pose = case(8, 3)
    with torch.no_grad():
        got = model(**x, frame_pose=frame_pose, ref_pose=ref_pose)
        model.prototype.selectors[0].to_k.weight.mul_(4.0)  # a sharper selection map at layer 0
        sharper = model(**x, frame_pose=frame_pose, ref_pose=ref_pose)
        moved = model(**x, frame_pose=frame_pose, ref_pose=ref_pose.flip(1))  # the references' poses permuted
    assert rel_err(sharper, got) > 1e-5
    assert rel_err(moved, sharper) > 1e-5


@pytest.mark.parametrize("no_refs", ["none", "empty"])
def test_without_references_equals_wan(no_refs):
    """A prototype model with no reference is its base model, so diffusers is the oracle."""
    model = prototype_denoiser(seed=2)
    wan = make_wan(2)
    x, _, _ = case(3, 0)
    with torch.no_grad():
        refs = x.pop("ref_latents")
        got = model(**x, ref_latents=None if no_refs == "none" else refs)
        want = wan(torch.cat([x["latents"], x["condition"]], 1), x["timestep"], x["text"], x["image_context"],
                   return_dict=False)[0]
    assert rel_err(got, want) < PARITY_RTOL


@pytest.mark.parametrize("num_refs", [1, 2])
def test_reference_cache_equals_recompute(num_refs):
    """With ref_timestep="zero" the isolated reference stream's features are built once and serve every step."""
    model = prototype_denoiser(seed=5, ref_timestep="zero")
    x, frame_pose, ref_pose = case(6, num_refs)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        cache = model.precompute_reference(x["ref_latents"], x["text"], x["image_context"], VIDEO)
        assert len(cache.keys) == model.config.num_layers and cache.keys[0].shape == (2, num_refs * 10, 48)
        for _ in range(2):
            x["latents"] = torch.randn(x["latents"].shape, generator=gen)
            x["timestep"] = torch.rand(2, generator=gen) * 1000
            want = model(**x, frame_pose=frame_pose, ref_pose=ref_pose)
            got = model(**{**x, "ref_latents": None}, ref_cache=cache, frame_pose=frame_pose, ref_pose=ref_pose)
            assert rel_err(got, want) < 1e-6


def test_triton_kernel_agrees_with_the_reference_on_the_mode_shapes():
    """``prototype_aggregate`` as the mode calls it (pose dim 64, [K | V] channels 2D), Triton (interpreted on CPU)
    against the reference."""
    model = prototype_denoiser(seed=1)
    triton_agg = PrototypeAggregator(model.config.replace(attention_backend="triton"))
    triton_agg.load_state_dict(model.prototype.state_dict())
    x, frame_pose, ref_pose = case(2, 3)
    z = torch.randn(2, 30, 48, generator=torch.Generator().manual_seed(3))
    attn = model.blocks[0].attn1
    with torch.no_grad():
        poses = model.prototype.encode_poses(frame_pose, ref_pose, (3, 3, 4), 3, (2, 5))
        k_feats, v_feats = model.prototype.reference_features(z, attn)
        want = model.prototype.prototype_kv(0, poses, k_feats, v_feats, attn)
        got = triton_agg.prototype_kv(0, poses, k_feats, v_feats, attn)
        sel = model.prototype.selectors[0]
        feats = torch.cat([k_feats, v_feats], -1).unflatten(1, (3, 10))
        scores = [prototype_aggregate(sel.query(poses.frames), sel.key(poses.refs), feats, backend=backend)[1]
                  for backend in ("triton", "reference")]
    assert scores[0].shape == (2, 3, 3, 10)
    assert rel_err(scores[0], scores[1]) < 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_attention_cost_does_not_grow_with_references():
    cfg = MvgenConfig(num_layers=40)  # Wan2.1-I2V-14B, 480x832 (60x104 latent), 21 latent frames
    flops = {r: attention_flops(cfg, 21, 60, 104, r, (60, 104)) for r in (1, 3, 8)}
    assert flops[1]["prototype"] == flops[3]["prototype"] == flops[8]["prototype"]
    assert flops[1]["full"] < flops[3]["full"] < flops[8]["full"]
    assert flops[1]["prototype"] < flops[1]["full"]
    # the counts are the mask's allowed pairs, 4*D FLOPs each (small sizes, the real mask)
    small = MvgenConfig.from_dict(SMALL_WAN)
    f, h, w, tokens = 3, 3, 4, 10
    for r in (1, 3, 8):
        counted = attention_flops(small, f, 2 * h, 2 * w, r, (4, 10))
        n_video = f * h * w
        allowed = attention_mask(n_video, n_video + f * tokens, (n_video, n_video), (n_video, n_video + f * tokens),
                                 "prototype", h * w, tokens).sum()
        assert counted["prototype"] == 4 * small.inner_dim * allowed.item()
        assert counted["full"] == 4 * small.inner_dim * (n_video + r * tokens) ** 2
        assert counted["prototype_reference"] == 4 * small.inner_dim * (r * tokens) ** 2


def test_parameters_exist_only_in_prototype_mode():
    model = prototype_denoiser()
    names = {k for k in model.state_dict() if k.startswith("prototype.")}
    per_layer = {f"prototype.selectors.{i}.{m}.{p}" for i in range(2) for m in ("norm_q", "to_q", "norm_k", "to_k")
                 for p in ("weight", "bias")}
    assert names == {"prototype.pose_encoder.weight", "prototype.pose_encoder.bias"} | per_layer
    assert model.state_dict()["prototype.pose_encoder.weight"].shape == (POSE_DIM, 3, 2, 2)
    plain = MultiViewWanTransformer(MvgenConfig.from_dict(SMALL_WAN, ref_attention="isolated"))
    assert not any(k.startswith("prototype") for k in plain.state_dict())


def test_pose_inputs_are_checked():
    model = prototype_denoiser()
    x, frame_pose, ref_pose = case(1, 2)
    with torch.no_grad(), pytest.raises(ValueError, match="needs ref_pose"):
        model(**x, frame_pose=frame_pose)
    with torch.no_grad(), pytest.raises(ValueError, match=r"frame_pose must be \[B, 3, 3, 6, 8\]"):
        model(**x, frame_pose=frame_pose[:, :2], ref_pose=ref_pose)
    with torch.no_grad(), pytest.raises(ValueError, match=r"ref_pose must be \[B, 2, 3, 4, 10\]"):
        model(**x, frame_pose=frame_pose, ref_pose=ref_pose[:, :1])
