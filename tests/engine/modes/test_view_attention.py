"""MVAnimate's multi-view attention (``view_attention="multiview"``) against a float64 formulation of Eq. 2.

The oracle below is written from the paper, token by token: for the video token at latent cell (t, y, x), every
view m offers its key and value at the reference cell holding the same relative image location
(``floor((y + 1/2) hr / H)``, in floating point here; ``F.interpolate``'s ``nearest-exact`` agrees), and
``alpha_m = exp(omega_m <q, k_m>) / sum_j exp(omega_j <q, k_j>)``, ``out = sum_m alpha_m v_m``; it calls nothing
of ``engine.modes.view_attention``. In the whole denoiser a forward hook captures each layer's q/k/v and the
attention that enters the output projection, which must be ``(A_joint + lambda A_mv) / (1 + lambda)``; A_joint's
oracle there is the joint attention's float64 reference (``kernels``, itself checked against SDPA).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.backbones.registry import load_denoiser
from engine.modes.view_attention import ViewAttention, aligned_cells, multiview_attention
from engine.streams.positions import grid_positions
from kernels.joint_attention.reference import joint_attention_reference

from ..conftest import PARITY_RTOL, SMALL_WAN, inputs, rel_err

VIDEO = (3, 6, 8)  # latent frames, height, width: a 3 x 3 x 4 token grid
# latent reference sizes (ref_hw): None = the video's; (4, 10) = 2 x 5 tokens; (10, 6) = 5 x 3 tokens
OMEGA = (0.7, 1.3, 0.4)  # non-trivial learned omegas for max_references = 3


# ---- the oracle ----------------------------------------------------------------------------------------------
def eq2_oracle(q, k_ref, v_ref, omega, video_fhw, ref_hw):
    """Eq. 2 in float64 for every video token: q [B, F*H*W, heads, Dh], k_ref/v_ref [B, M*hr*wr, heads, Dh],
    omega [B, M]."""
    q, k_ref, v_ref, omega = (t.double() for t in (q, k_ref, v_ref, omega))
    (f, h, w), (hr, wr), views = video_fhw, ref_hw, omega.shape[1]
    out = torch.zeros_like(q)
    for t in range(f):
        for y in range(h):
            for x in range(w):
                n = (t * h + y) * w + x
                cell = math.floor((y + 0.5) * hr / h) * wr + math.floor((x + 0.5) * wr / w)
                keys = torch.stack([k_ref[:, m * hr * wr + cell] for m in range(views)], 1)  # [B, M, heads, Dh]
                values = torch.stack([v_ref[:, m * hr * wr + cell] for m in range(views)], 1)
                scores = (omega[:, :, None] * (q[:, n, None] * keys).sum(-1)).exp()  # [B, M, heads]
                alpha = scores / scores.sum(1, keepdim=True)
                out[:, n] = (alpha[..., None] * values).sum(1)
    return out


def random_qkv(gen, batch, views, video_fhw, ref_hw, heads=2, dh=24):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    n_video, n_ref = math.prod(video_fhw), views * math.prod(ref_hw)
    return r(batch, n_video, heads, dh), r(batch, n_ref, heads, dh), r(batch, n_ref, heads, dh)


def token_grid(ref_hw):
    hw = ref_hw or VIDEO[1:]
    return hw[0] // 2, hw[1] // 2


# ---- the attention alone -------------------------------------------------------------------------------------
@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("ref_hw", [(3, 4), (2, 5), (5, 3), (7, 9)])
def test_attention_matches_eq2(views, ref_hw):
    gen = torch.Generator().manual_seed(100 + views)
    fhw = (2, 3, 4)
    q, k, v = random_qkv(gen, 2, views, fhw, ref_hw)
    omega = torch.rand(2, views, generator=gen) + 0.1
    want = eq2_oracle(q, k, v, omega, fhw, ref_hw)
    assert rel_err(multiview_attention(q, k, v, omega, fhw, ref_hw), want) < PARITY_RTOL
    # aligned with the joint attention: (A + lambda * A_mv) / (1 + lambda) on the video rows
    a_joint = torch.randn(q.shape, generator=gen)
    got = ViewAttention(omega, 0.6, fhw, ref_hw)(a_joint, q, k, v)
    assert got.dtype == a_joint.dtype
    assert rel_err(got, (a_joint.double() + 0.6 * want) / 1.6) < PARITY_RTOL


@pytest.mark.parametrize("video_hw,ref_hw", [((3, 4), (3, 4)), ((3, 4), (2, 5)), ((6, 2), (3, 7)), ((1, 5), (4, 1))])
def test_alignment_is_nearest_exact_resampling(video_hw, ref_hw):
    """The aligned cell of each video cell is the reference cell nearest-exact resampling picks (PyTorch's own)."""
    index = torch.arange(math.prod(ref_hw), dtype=torch.float64).reshape(1, 1, *ref_hw)
    want = F.interpolate(index, size=video_hw, mode="nearest-exact").reshape(-1).long()
    assert torch.equal(aligned_cells(video_hw, ref_hw), want)
    if video_hw == ref_hw:
        assert torch.equal(aligned_cells(video_hw, ref_hw), torch.arange(math.prod(video_hw)))


def test_cost_does_not_grow_with_the_reference_grid():
    """O(Nv * M) dot products: the FLOPs are 2 einsums of B * Nv * heads * M * Dh multiply-adds each, the same for
    a 2 x 2 and a 40 x 40 reference grid (an Nv x (M * T) logit matrix would grow 400-fold)."""
    gen = torch.Generator().manual_seed(5)
    fhw, views, batch, heads, dh = (2, 3, 4), 3, 2, 2, 24
    flops = []
    for ref_hw in ((2, 2), (40, 40)):
        q, k, v = random_qkv(gen, batch, views, fhw, ref_hw, heads, dh)
        with FlopCounterMode(display=False) as counter:
            multiview_attention(q, k, v, torch.ones(batch, views), fhw, ref_hw)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] == 2 * 2 * batch * math.prod(fhw) * heads * views * dh


# ---- the denoiser --------------------------------------------------------------------------------------------
def denoiser_pair(path, omega=OMEGA, **overrides):
    """(plain, multiview) denoisers with the same weights; ``omega`` None leaves the paper's initialisation.

    The multiview model loads the plain one's state, which has no ``view_omega`` (a base checkpoint has none):
    the model's load hook fills in the paper's, which ``omega`` then replaces as an adapter's tensor would."""
    plain = load_denoiser(path, **{k: v for k, v in overrides.items() if k != "view_lambda"})
    config = plain.config.replace(view_attention="multiview", **{k: v for k, v in overrides.items()
                                                                 if k == "view_lambda"})
    multiview = MultiViewWanTransformer(config).eval().requires_grad_(False)
    multiview.load_state_dict(plain.state_dict())  # strict: every key but view_omega comes from the plain model
    if omega is not None:
        multiview.view_omega.copy_(torch.tensor(omega))
    return plain, multiview


def capture_layers(model):
    """Per layer, the flattened q/k/v of each stream (before RoPE) and the attention entering attn1.to_out."""
    layers = [dict() for _ in model.blocks]
    handles = []
    for i, (block, ref_block) in enumerate(zip(model.blocks, model.ref_blocks)):
        for stream, attn in (("video", block.attn1), ("ref", ref_block.attn1)):
            for name, module in (("q", attn.norm_q), ("k", attn.norm_k), ("v", attn.to_v)):
                handles.append(module.register_forward_hook(
                    lambda _m, _i, out, key=(stream, name), i=i: layers[i].__setitem__(key, out)))
        handles.append(block.attn1.to_out[0].register_forward_pre_hook(
            lambda _m, args, i=i: layers[i].__setitem__("aligned", args[0])))
    return layers, handles


@pytest.mark.parametrize("views,ref_hw,view_lambda", [(1, None, 1.0), (2, (4, 10), 0.35), (3, (10, 6), 1.0),
                                                       (3, None, 0.35)])
def test_denoiser_layers_match_eq2(wan_dir, views, ref_hw, view_lambda):
    """Every layer's video-row attention is (A_joint + lambda * A_mv) / (1 + lambda) of that layer's q/k/v."""
    path, _ = wan_dir
    _, model = denoiser_pair(path, view_lambda=view_lambda, ref_attention="full", ref_rope="decoupled")
    x = inputs(torch.Generator().manual_seed(20 + views), refs=views, ref_hw=ref_hw)
    layers, handles = capture_layers(model)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for handle in handles:
            handle.remove()
    fhw, rhw = (VIDEO[0], VIDEO[1] // 2, VIDEO[2] // 2), token_grid(ref_hw)
    n_video = math.prod(fhw)
    video_pos = grid_positions(*fhw)
    pos, key_scale = model._keys_layout(video_pos, views, rhw, fhw)
    omega = torch.tensor(OMEGA[:views]).expand(2, views)
    heads = lambda t: t.double().unflatten(-1, (model.config.num_attention_heads, -1))  # noqa: E731
    for layer in layers:
        q, k, v = (torch.cat([heads(layer[("video", n)]), heads(layer[("ref", n)])], 1) for n in "qkv")
        a_joint = joint_attention_reference(q, k, v, pos, pos, q_offsets=(n_video, q.shape[1]),
                                            k_offsets=(n_video, k.shape[1]), key_scale=key_scale,
                                            mask="full")[:, :n_video]
        a_mv = eq2_oracle(q[:, :n_video], k[:, n_video:], v[:, n_video:], omega, fhw, rhw)
        want = (a_joint + view_lambda * a_mv) / (1 + view_lambda)
        assert rel_err(heads(layer["aligned"]), want) < PARITY_RTOL


@pytest.mark.parametrize("path_kind", ["joint", "cached"])
@pytest.mark.parametrize("ref_hw", [None, (4, 10)])
def test_omega_one_lambda_zero_is_the_plain_model_exactly(wan_dir, path_kind, ref_hw):
    path, _ = wan_dir
    settings = dict(ref_attention="full") if path_kind == "joint" else dict(ref_attention="isolated",
                                                                           ref_timestep="zero")
    plain, model = denoiser_pair(path, omega=(1.0, 1.0, 1.0), view_lambda=0.0, **settings)
    x = inputs(torch.Generator().manual_seed(31), refs=3, ref_hw=ref_hw)
    with torch.no_grad():
        if path_kind == "cached":
            args = x["ref_latents"], x["text"], x["image_context"], VIDEO
            x = {**x, "ref_latents": None, "ref_cache": model.precompute_reference(*args)}
        want, got = plain(**x), model(**x)
    assert torch.equal(got, want)


def test_no_references_is_the_plain_model_exactly(wan_dir):
    """With R = 0 there is no view to attend to: the multiview denoiser is its base model."""
    path, _ = wan_dir
    plain, model = denoiser_pair(path)
    x = inputs(torch.Generator().manual_seed(37), refs=0)
    with torch.no_grad():
        assert torch.equal(model(**x), plain(**x))
        assert torch.equal(model(**{**x, "ref_latents": None}), plain(**x))


@pytest.mark.parametrize("views,ref_hw", [(1, None), (2, (4, 10)), (3, (10, 6))])
def test_cached_path_equals_joint_path(wan_dir, views, ref_hw):
    path, _ = wan_dir
    _, model = denoiser_pair(path, view_lambda=0.8, ref_attention="isolated", ref_timestep="zero")
    gen = torch.Generator().manual_seed(41 + views)
    x = inputs(gen, refs=views, ref_hw=ref_hw)
    omega = torch.rand(2, views, generator=gen) + 0.2
    with torch.no_grad():
        cache = model.precompute_reference(x["ref_latents"], x["text"], x["image_context"], VIDEO)
        for view_omega in (None, omega):  # one cache serves every step: a new step, the model's or given omegas
            x["latents"] = torch.randn(x["latents"].shape, generator=gen)
            x["timestep"] = torch.rand(2, generator=gen) * 1000
            want = model(**x, view_omega=view_omega)
            got = model(**{**x, "ref_latents": None}, ref_cache=cache, view_omega=view_omega)
            assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("views", [1, 3])
def test_per_request_omega_overrides_the_model(wan_dir, views):
    path, _ = wan_dir
    plain, model = denoiser_pair(path, ref_attention="full")
    gen = torch.Generator().manual_seed(53 + views)
    x = inputs(gen, refs=views, ref_hw=(4, 10))
    own = torch.tensor(OMEGA[:views]).expand(2, views)
    other = torch.rand(2, views, generator=gen) * 3 + 0.5
    with torch.no_grad():
        default = model(**x)
        assert rel_err(default, plain(**x)) > 1e-3  # the mode does something at lambda = 1
        assert torch.equal(model(**x, view_omega=own), default)
        assert torch.equal(model(**x, view_omega=own[:, :0]), default)  # sent empty: the model's
        changed = model(**x, view_omega=other)
        # a softmax over one view is 1 whatever its omega (Eq. 2): omega steers only between views
        assert (rel_err(changed, default) > 1e-4) == (views > 1)
        # each row takes its own omegas
        rows = torch.stack([other[0], own[1]])
        mixed = model(**x, view_omega=rows)
        assert rel_err(mixed[:1], changed[:1]) < 1e-6 and rel_err(mixed[1:], default[1:]) < 1e-6


def test_paper_initialisation_and_loading():
    """view_omega: [0.25, 0.25, 0.1, ...] (MVAnimate Sec. IV-C) at construction, even on meta; a state without it
    loads the paper's; a state with it (an adapter's tensor) wins; no such buffer without the mode."""
    config = MvgenConfig.from_dict(SMALL_WAN, view_attention="multiview", max_references=5)
    with torch.device("meta"):
        model = MultiViewWanTransformer(config)
    assert torch.equal(model.view_omega, torch.tensor([0.25, 0.25, 0.1, 0.1, 0.1]))
    assert MultiViewWanTransformer(config.replace(max_references=1)).view_omega.tolist() == [0.25]
    state = MultiViewWanTransformer(config).state_dict()
    del state["view_omega"]
    given = torch.tensor([0.5, 2.0, 1.0, 1.5, 3.0])
    model.load_state_dict(state, strict=True, assign=True)
    assert torch.equal(model.view_omega, torch.tensor([0.25, 0.25, 0.1, 0.1, 0.1]))
    model.load_state_dict({**state, "view_omega": given}, strict=True, assign=True)
    assert torch.equal(model.view_omega, given)
    assert "view_omega" not in MultiViewWanTransformer(config.replace(view_attention="none")).state_dict()


def test_omega_inputs_are_checked(wan_dir):
    path, _ = wan_dir
    plain, model = denoiser_pair(path)
    x = inputs(torch.Generator().manual_seed(61), refs=2)
    with torch.no_grad(), pytest.raises(ValueError, match="view_attention='multiview'"):
        plain(**x, view_omega=torch.ones(2, 2))
    with torch.no_grad(), pytest.raises(ValueError, match=r"view_omega must be \[batch, references\] = \[2, 2\]"):
        model(**x, view_omega=torch.ones(2, 3))
