"""M2HVideo's distribution-aware adapter (``identity=True``, ``engine.modes.identity``) against a float64
formulation written here from Eq. 3, ``z̄_a = (z_a - mu_a) / sigma_a * sigma_b + mu_b`` (statistics per token over
its channels, ``sigma = sqrt(biased var + eps)``), added to the CLIP image branch through the per-channel gate.

The whole-denoiser oracle is diffusers' ``WanTransformer3DModel`` (the base we did not write) with hooks: each
block's cross-attention records its queries and image K/V, and its output projection receives, on the video
rows only, ``gate * z̄_a`` computed here in float64.
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from engine.config import MvgenConfig
from engine.backbones.wan.model import Attention, MultiViewWanTransformer
from engine.backbones.registry import load_denoiser
from engine.modes.identity import IdentityCrossAttention

from ..conftest import PARITY_RTOL, inputs, rel_err
from ..test_denoiser import diffusers_velocity

EPS = 1e-6
PARAMS = ("add_k_proj.weight", "add_k_proj.bias", "add_v_proj.weight", "add_v_proj.bias", "norm_added_k.weight",
          "gate")
IDENTITY_LEN = 257  # CLIP tokens of the identity image
# joint references: the frame-append settings, so that diffusers (references as further frames) is the oracle
JOINT = dict(ref_rope="shared", ref_timestep="shared", ref_attention="full")
CACHED = dict(ref_attention="isolated", ref_timestep="zero")


# ---- the float64 formulation ------------------------------------------------------------------------------
def eq3(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eq. 3 with mean and standard deviation over each token's channels (the last dim)."""
    mu_a, mu_b = z_a.mean(-1, keepdim=True), z_b.mean(-1, keepdim=True)
    sigma_a = ((z_a - mu_a).square().mean(-1, keepdim=True) + eps).sqrt()
    sigma_b = ((z_b - mu_b).square().mean(-1, keepdim=True) + eps).sqrt()
    return (z_a - mu_a) / sigma_a * sigma_b + mu_b


def rms_norm(x, weight, eps=EPS):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def attention(q, k, v, heads):
    """q [B, N, C], k/v [B, L, C] -> softmax(q k^T / sqrt(Dh)) v per head, [B, N, C]."""
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    logits = torch.einsum("bnhd,blhd->bhnl", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhnl,blhd->bnhd", logits.softmax(-1), v).flatten(2)


def linear(x, p, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def identity_term(q, identity, p, heads):
    """``gate * z̄_a``: the identity branch's attention (adapter K/V of the identity tokens, the block's queries)
    re-normalised to the image branch ``p["z_b"]`` by Eq. 3. Everything float64."""
    k = rms_norm(linear(identity, p, "add_k_proj"), p["norm_added_k.weight"])
    z_a = attention(q, k, linear(identity, p, "add_v_proj"), heads)
    return p["gate"] * eq3(z_a, p["z_b"])


def random_identity_params(config: MvgenConfig, gen: torch.Generator, gate: str = "random") -> dict:
    """State-dict entries of every block's identity adapter: random, non-trivial, with the gate ``random``
    (0.5..1.5 per channel), ``ones`` (the paper's Eq. 3 sum) or ``zero``."""
    dim = config.inner_dim
    out = {}
    for block in range(config.num_layers):
        p = {
            "add_k_proj.weight": torch.randn(dim, dim, generator=gen) / dim**0.5,
            "add_k_proj.bias": 0.1 * torch.randn(dim, generator=gen),
            "add_v_proj.weight": torch.randn(dim, dim, generator=gen) / dim**0.5,
            "add_v_proj.bias": 0.1 * torch.randn(dim, generator=gen),
            "norm_added_k.weight": 1 + 0.1 * torch.randn(dim, generator=gen),
            "gate": {"random": 0.5 + torch.rand(dim, generator=gen), "ones": torch.ones(dim),
                     "zero": torch.zeros(dim)}[gate],
        }
        out.update({f"blocks.{block}.attn2.identity.{name}": t for name, t in p.items()})
    return out


def block_params(params: dict, block: int) -> dict:
    prefix = f"blocks.{block}.attn2.identity."
    return {k.removeprefix(prefix): v.double() for k, v in params.items() if k.startswith(prefix)}


def with_identity(plain: MultiViewWanTransformer, params: dict) -> MultiViewWanTransformer:
    """The plain denoiser's weights plus the identity adapter's, in a denoiser built with ``identity=True``."""
    model = MultiViewWanTransformer(plain.config.replace(identity=True))
    model.load_state_dict({**plain.state_dict(), **params}, strict=True)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def identity_hooks(wan, params: dict, identity_context: torch.Tensor, n_video: int):
    """diffusers' Wan with the identity adapter added by hooks: per block, ``attn2`` records its queries
    (``norm_q``) and image K/V (``norm_added_k``, ``add_v_proj``); the input of its output projection (the sum of
    the text and image branches) then gets ``gate * z̄_a`` on the first ``n_video`` rows."""
    identity = wan.condition_embedder.image_embedder(identity_context).double()  # the checkpoint's CLIP embedder
    handles = []
    for i, block in enumerate(wan.blocks):
        attn, seen = block.attn2, {}

        def keep(name, seen=seen):
            return lambda module, args, out: seen.__setitem__(name, out.double())

        def add_identity(module, args, i=i, attn=attn, seen=seen):
            p = block_params(params, i)
            p["z_b"] = attention(seen["q"], seen["k_img"], seen["v_img"], attn.heads)
            hidden = args[0].clone()
            term = identity_term(seen["q"], identity, p, attn.heads)
            hidden[:, :n_video] += term[:, :n_video].to(hidden.dtype)
            return (hidden,)

        handles += [attn.norm_q.register_forward_hook(keep("q")),
                    attn.norm_added_k.register_forward_hook(keep("k_img")),
                    attn.add_v_proj.register_forward_hook(keep("v_img")),
                    attn.to_out[0].register_forward_pre_hook(add_identity)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def small_config(**changes) -> MvgenConfig:
    return MvgenConfig(num_attention_heads=2, attention_head_dim=24, num_layers=1, identity=True, **changes)


# ---- one cross-attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("gate", ["random", "ones"])
def test_cross_attention_against_eq3(backend, gate):
    """``Attention.cross`` with the identity branch = to_out(z_text + z_b + gate * z̄_a), all float64 here."""
    gen = torch.Generator().manual_seed(1)
    cfg = small_config(attention_backend=backend)
    dim, heads = cfg.inner_dim, cfg.num_attention_heads
    attn = Attention(dim, heads, cfg.eps, dim, IdentityCrossAttention(cfg))
    params = random_identity_params(cfg, gen, gate)
    with torch.no_grad():
        for name, t in attn.named_parameters():  # every weight random, biases included
            t.copy_(params.get(f"blocks.0.attn2.{name}", torch.randn(t.shape, generator=gen) / dim**0.5 + 0.1))
    x, text, image, identity = (torch.randn(2, n, dim, generator=gen) for n in (13, 11, IDENTITY_LEN, 19))

    got = attn.cross(x, attn.cross_kv(text, image, identity))

    w = {k: v.double() for k, v in attn.state_dict().items()}
    x, text, image, identity = (t.double() for t in (x, text, image, identity))
    q = rms_norm(linear(x, w, "to_q"), w["norm_q.weight"])
    z_text = attention(q, rms_norm(linear(text, w, "to_k"), w["norm_k.weight"]), linear(text, w, "to_v"), heads)
    z_b = attention(q, rms_norm(linear(image, w, "add_k_proj"), w["norm_added_k.weight"]),
                    linear(image, w, "add_v_proj"), heads)
    p = {**block_params(params, 0), "z_b": z_b}
    want = linear(z_text + z_b + identity_term(q, identity, p, heads), w, "to_out.0")
    plain = linear(z_text + z_b, w, "to_out.0")
    assert rel_err(want, plain) > 0.05  # the identity branch is no rounding-level change
    assert rel_err(got, want) < PARITY_RTOL


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fuse_is_eq3_per_token(backend, dtype, tolerance):
    """``fuse``: z_b + gate * z̄_a with Eq. 3's statistics over each token's channels (all heads); the Triton
    kernel (interpreted on CPU) and the PyTorch reference both."""
    gen = torch.Generator().manual_seed(2)
    cfg = small_config(attention_backend=backend)
    module = IdentityCrossAttention(cfg)
    with torch.no_grad():
        module.gate.copy_(0.5 + torch.rand(cfg.inner_dim, generator=gen))
    shape = (2, 9, cfg.num_attention_heads, cfg.attention_head_dim)
    z_a = (3 * torch.randn(shape, generator=gen) - 1).to(dtype)
    z_b = (0.5 * torch.randn(shape, generator=gen) + 2).to(dtype)
    got = module.to(dtype).fuse(z_a, z_b)
    a, b = z_a.double().flatten(2), z_b.double().flatten(2)
    want = (b + module.gate.double() * eq3(a, b)).unflatten(-1, shape[-2:])
    assert got.dtype == dtype and got.shape == shape
    assert rel_err(got, want) < tolerance


def test_zero_identity_values_still_add_mu_b():
    """Why the gate: with z_a = 0 Eq. 3 gives mu_b, not 0, so a zero value projection is not the plain model."""
    gen = torch.Generator().manual_seed(3)
    cfg = small_config(attention_backend="reference")
    module = IdentityCrossAttention(cfg)
    with torch.no_grad():
        module.gate.fill_(1.0)
    z_b = torch.randn(2, 7, cfg.num_attention_heads, cfg.attention_head_dim, generator=gen) + 1
    got = module.fuse(torch.zeros_like(z_b), z_b)
    mu_b = z_b.flatten(2).mean(-1)[..., None, None]
    assert torch.allclose(got, z_b + mu_b, atol=1e-6)


# ---- the whole denoiser -------------------------------------------------------------------------------------
@pytest.mark.parametrize("refs", ["none", "dual_stream", "token_concat"])
def test_denoiser_against_diffusers_with_eq3_hooks(wan_dir, refs):
    """Every block's video rows get the identity term; reference rows (appended frames for diffusers, the
    reference stream here) get none."""
    path, wan = wan_dir
    gen = torch.Generator().manual_seed(4)
    plain = load_denoiser(path, **({} if refs == "none" else dict(ref_mode=refs, **JOINT)))
    params = random_identity_params(plain.config.replace(identity=True), gen)
    den = with_identity(plain, params)
    x = inputs(gen, refs=0 if refs == "none" else 2)
    ref_latents = x.pop("ref_latents") if refs == "none" else x["ref_latents"]
    identity = torch.randn(2, IDENTITY_LEN, 20, generator=gen)
    frames, height, width = x["latents"].shape[2:]
    n_video = frames * (height // 2) * (width // 2)  # video tokens per row (patch 1x2x2)
    with torch.no_grad():
        base = diffusers_velocity(wan, x, None if refs == "none" else ref_latents)
        with identity_hooks(wan, params, identity, n_video):
            want = diffusers_velocity(wan, x, None if refs == "none" else ref_latents)
        got = den(**x, identity_context=identity)
    assert rel_err(want, base) > 0.05  # the oracle's identity term moves the velocity by far more than 1e-4
    assert rel_err(got, want) < PARITY_RTOL


def test_cached_references_take_identity_like_the_joint_run(wan_dir):
    """The cached-reference path (isolated, zero-timestep stream) fuses the identity as the joint run does."""
    path, _ = wan_dir
    gen = torch.Generator().manual_seed(5)
    plain = load_denoiser(path, **CACHED)
    den = with_identity(plain, random_identity_params(plain.config.replace(identity=True), gen))
    x = inputs(gen, batch=1, refs=2)
    identity = torch.randn(1, IDENTITY_LEN, 20, generator=gen)
    with torch.no_grad():
        cache = den.precompute_reference(x["ref_latents"], x["text"], x["image_context"], tuple(x["latents"].shape[2:]))
        joint = den(**x, identity_context=identity)
        cached = den(**{**x, "ref_latents": None}, ref_cache=cache, identity_context=identity)
        without = den(**x)
    assert rel_err(joint, without) > 0.05
    assert rel_err(cached, joint) < 1e-5


PATHS = {"none": {}, "joint": dict(ref_mode="dual_stream", **JOINT), "cached": CACHED}


def _run(den, x, path, **kw):
    if path == "none":
        return den(**{**x, "ref_latents": None}, **kw)
    if path == "cached":
        cache = den.precompute_reference(x["ref_latents"], x["text"], x["image_context"], tuple(x["latents"].shape[2:]))
        return den(**{**x, "ref_latents": None}, ref_cache=cache, **kw)
    return den(**x, **kw)


@pytest.mark.parametrize("path", list(PATHS))
def test_zero_gate_or_no_identity_is_the_plain_model_exactly(wan_dir, path):
    """A zero identity projection (gate 0) and no identity (None) give the plain denoiser's output bit for bit; a
    random adapter changes it."""
    root, _ = wan_dir
    gen = torch.Generator().manual_seed(6)
    plain = load_denoiser(root, **PATHS[path])
    config = plain.config.replace(identity=True)
    zero = with_identity(plain, random_identity_params(config, gen, gate="zero"))
    active = with_identity(plain, random_identity_params(config, gen))
    x = inputs(gen, batch=1, refs=2)
    identity = torch.randn(1, IDENTITY_LEN, 20, generator=gen)
    with torch.no_grad():
        want = _run(plain, x, path)
        assert torch.equal(_run(zero, x, path, identity_context=identity), want)
        assert torch.equal(_run(active, x, path), want)
        assert rel_err(_run(active, x, path, identity_context=identity), want) > 0.05


def test_triton_fusion_in_the_denoiser_matches_the_reference(monkeypatch):
    """``attention_backend="triton"``: the fused kernel (interpreted on CPU; the joint attention kernel too, hence
    head_dim 64, its smallest) inside the denoiser agrees with the reference path."""
    kernel_module = importlib.import_module("kernels.fusions.kernel")
    launches = []
    launch = kernel_module.distribution_fusion_triton
    monkeypatch.setattr(kernel_module, "distribution_fusion_triton", lambda *a, **k: launches.append(1) or launch(*a, **k))
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    config = MvgenConfig(num_attention_heads=1, attention_head_dim=64, ffn_dim=96, num_layers=2, text_dim=16,
                         freq_dim=32, image_dim=16, added_kv_proj_dim=64, identity=True, attention_backend="reference")
    reference = MultiViewWanTransformer(config).eval().requires_grad_(False)
    reference.load_state_dict({**reference.state_dict(), **random_identity_params(config, gen)})
    triton = MultiViewWanTransformer(config.replace(attention_backend="triton")).eval().requires_grad_(False)
    triton.load_state_dict(reference.state_dict(), strict=True)
    x = inputs(gen, batch=1, frames=1, height=4, width=4, text_dim=16, image_dim=16)
    x.pop("ref_latents")
    identity = torch.randn(1, 5, 16, generator=gen)  # identity_len is an axis: fewer than 257 tokens work too
    with torch.no_grad():
        want = reference(**x, identity_context=identity)
        assert not launches
        got = triton(**x, identity_context=identity)
    assert len(launches) == config.num_layers  # every block's fusion went through the kernel
    assert rel_err(want, reference(**x)) > 0.05
    assert rel_err(got, want) < 1e-5


# ---- parameters -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref_mode", ["dual_stream", "token_concat"])
def test_identity_parameters_live_on_the_video_blocks_only(ref_mode):
    config = MvgenConfig(num_attention_heads=2, attention_head_dim=24, num_layers=3, ref_mode=ref_mode)
    with torch.device("meta"):
        plain = {name for name, _ in MultiViewWanTransformer(config).named_parameters()}
        moded = {name for name, _ in MultiViewWanTransformer(config.replace(identity=True)).named_parameters()}
    assert plain < moded
    assert moded - plain == {f"blocks.{i}.attn2.identity.{p}" for i in range(3) for p in PARAMS}


def test_reference_stream_copies_the_base_without_identity(wan_dir):
    path, _ = wan_dir
    plain = load_denoiser(path)
    den = with_identity(plain, random_identity_params(plain.config, torch.Generator().manual_seed(9)))
    for block in den.ref_blocks:
        block.attn2.to_q.weight.data.zero_()
    den.init_reference_stream_from_base()
    assert torch.equal(den.ref_blocks[0].attn2.to_q.weight, den.blocks[0].attn2.to_q.weight)
    assert den.ref_blocks[0].attn2.identity is None


def test_identity_context_for_a_plain_denoiser_is_refused(wan_dir):
    path, _ = wan_dir
    x = inputs(torch.Generator().manual_seed(8))
    x.pop("ref_latents")
    with pytest.raises(ValueError, match="identity adapter"):
        load_denoiser(path)(**x, identity_context=torch.zeros(2, IDENTITY_LEN, 20))
