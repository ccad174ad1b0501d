"""The multi-view reference denoiser: a Wan2.1/2.2 DiT (T2V or I2V) plus a reference-token stream.

Parameter names of the video stream follow diffusers' ``WanTransformer3DModel`` key for key, so a diffusers
checkpoint loads without renaming; the reference stream lives in ``ref_blocks`` (dual-stream, MVI2V) or
reuses ``blocks`` (Token-Concat). The streams meet only in the joint self-attention, the [video, reference] case of
``engine.streams.joint_attention`` (a reference stream run alone, to build a cache, is its [reference] case).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import adaln_layernorm, gated_residual, kernel_backend

from ...runtime.batch_invariance import batch_invariant
from ...runtime.caches import ContextCache, CrossKV, ReferenceCache
from ...config import MvgenConfig
from ...streams.joint_attention import JointAttention, StreamQKV
from ...modes.identity import IdentityCrossAttention
from ...modes.prototype import PrototypeAggregator, prototype_positions
from ...modes.view_attention import ViewAttention, fill_paper_omega, paper_view_omega
from ...runtime.parallel import ParallelLayout, SequenceParallel
from ...streams.positions import grid_positions, rd_rope_positions
from ...runtime.step_cache import StepCache
from ...streams.driver import (CachedReference, IsolatedReference, LiveReference, PrototypeReference, VideoRows,
                             ViewAttentionHook, run_layers)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the activation dtype (as Wan does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int, dim_out: int | None = None, approximate: str = "tanh"):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, inner_dim, approximate), nn.Identity(),
                                  nn.Linear(inner_dim, dim_out or dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class Attention(nn.Module):
    """Q/K/V/out projections with RMSNorm across heads on Q and K (and the I2V image K/V when asked; M2HVideo's
    identity branch, ``engine.modes.identity``, when given)."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None,
                 identity: IdentityCrossAttention | None = None):
        super().__init__()
        self.heads = heads
        self.identity = identity
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))  # [B, N, H, Dh]

    def key_value_heads(self, k: torch.Tensor, v: torch.Tensor):
        """Projected keys and values [B, N, D] -> RMS-normalised keys (across heads) and values [B, N, H, Dh]."""
        return self.split_heads(self.norm_k(k)), self.split_heads(v)

    def project_qkv(self, x: torch.Tensor, context: torch.Tensor):
        q = self.split_heads(self.norm_q(self.to_q(x)))
        k = self.split_heads(self.norm_k(self.to_k(context)))
        v = self.split_heads(self.to_v(context))
        return q, k, v

    def normed(self, q: torch.Tensor, k: torch.Tensor):
        """RMSNorm across heads of projections [B, N, H, Dh] (the self-attention leaves it to the QK prologue)."""
        return self.split_heads(self.norm_q(q.flatten(2))), self.split_heads(self.norm_k(k.flatten(2)))

    def cross_kv(self, text: torch.Tensor, image: torch.Tensor | None,
                 identity: torch.Tensor | None = None) -> "CrossKV":
        """The cross-attention's keys and values [B, L, H, Dh] of the embedded text, image (I2V) and identity
        (M2HVideo) states: they depend on neither the latents nor the step, so a request computes them once
        (``ContextCache``)."""
        k, v = self.split_heads(self.norm_k(self.to_k(text))), self.split_heads(self.to_v(text))
        image_kv = identity_kv = None
        if image is not None:
            image_kv = (self.split_heads(self.norm_added_k(self.add_k_proj(image))),
                        self.split_heads(self.add_v_proj(image)))
            if identity is not None:
                identity_kv = self.identity.key_value(identity)
        return CrossKV((k, v), image_kv, identity_kv)

    def cross(self, x: torch.Tensor, kv: "CrossKV") -> torch.Tensor:
        """Cross-attention to the text states, plus (I2V) to the CLIP image states, summed; with identity
        keys/values, the image branch has the identity branch fused in (M2HVideo Eq. 3)."""
        q = self.split_heads(self.norm_q(self.to_q(x)))
        out = _sdpa(q, *kv.text)
        if kv.image is not None:
            z_image = _sdpa(q, *kv.image)
            if kv.identity is not None:
                z_image = self.identity.fuse(_sdpa(q, *kv.identity), z_image)
            out = out + z_image
        return self.to_out[0](out.flatten(2).contiguous())


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@dataclass
class Modulation:
    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    c_shift: torch.Tensor
    c_scale: torch.Tensor
    c_gate: torch.Tensor


class StreamBlock(nn.Module):
    """One Wan transformer block of one stream, split at the joint self-attention.

    ``self_attention_inputs`` produces this stream's Q/K/V; the joint attention runs outside over all
    streams; ``finish`` applies this stream's output projection, cross-attention and FFN.
    """

    def __init__(self, cfg: MvgenConfig, identity: bool = False):
        super().__init__()
        dim = cfg.inner_dim
        # the fused AdaLN/gated-residual kernels on GPU (one read, one write each), their references on CPU; follows
        # the model's config (MultiViewWanTransformer.config)
        self.backend = kernel_backend(cfg.attention_backend)
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        # identity: M2HVideo's adapter in the cross-attention, on video-stream blocks only (engine.modes.identity)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim,
                               IdentityCrossAttention(cfg) if identity else None)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation(self, timestep_proj: torch.Tensor) -> Modulation:
        # timestep_proj [B, 6, D] -> six [B, 1, D] float32 tensors; per token (TI2V) [B, N, 6, D] -> six [B, N, D]
        if timestep_proj.dim() == 4:
            return Modulation(*(self.scale_shift_table.unsqueeze(0) + timestep_proj.float()).unbind(2))
        return Modulation(*(self.scale_shift_table + timestep_proj.float()).chunk(6, dim=1))

    def attention_input(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """The self-attention's input: norm1 modulated by this stream's shift and scale."""
        return adaln_layernorm(x, mod.shift_msa, mod.scale_msa, eps=self.norm1.eps, backend=self.backend)

    def self_attention_inputs(self, x: torch.Tensor, mod: Modulation):
        """Normalised Q/K (not rotated) and V of this stream: what a reference cache keeps."""
        h = self.attention_input(x, mod)
        return self.attn1.project_qkv(h, h)

    def self_attention_stream(self, x: torch.Tensor, mod: Modulation, pos: torch.Tensor,
                              key_scale: torch.Tensor | None = None, tokens: int | None = None,
                              rope: tuple | None = None, role: str = "video") -> StreamQKV:
        """This stream's raw Q/K projections and V: RMSNorm and RoPE happen in the QK prologue."""
        h = self.attention_input(x, mod)
        attn = self.attn1
        return StreamQKV(attn.split_heads(attn.to_q(h)), attn.split_heads(attn.to_k(h)),
                         attn.split_heads(attn.to_v(h)), pos, attn, key_scale, tokens, rope, role)

    def finish(self, x, attn: torch.Tensor, mod: Modulation, kv: CrossKV | None) -> torch.Tensor:
        # attn [B, N, H, Dh]: this stream's rows of the joint attention; kv: this block's cross-attention keys and
        # values (``Context.kv``: computed now, or once per request), None where the stream skips the cross-attention
        # (Stand-In's reference tokens: ``ref_cross_attention=False``)
        out = self.attn1.to_out[0](attn.flatten(2).contiguous())
        x = gated_residual(x, out, mod.gate_msa, backend=self.backend)
        if kv is not None:
            x = x + self.attn2.cross(self.norm2(x.float()).type_as(x), kv)
        h = adaln_layernorm(x, mod.c_shift, mod.c_scale, eps=self.norm3.eps, backend=self.backend)
        return gated_residual(x, self.ffn(h), mod.c_gate, backend=self.backend)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ImageEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim)
        self.ff = FeedForward(in_dim, in_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)

    def forward(self, x):
        return self.norm2(self.ff(self.norm1(x)))


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep features: [cos | sin] of t * 10000**(-i/half), float32 [B, dim]."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    args = timestep.float()[:, None] * exponent.exp()[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: MvgenConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(cfg.text_dim, dim)
        self.image_embedder = ImageEmbedding(cfg.image_dim, dim) if cfg.image_dim is not None else None

    def time(self, timestep: torch.Tensor, dtype: torch.dtype):
        """temb [B, D] (output head) and timestep_proj [B, 6, D] (block modulation) of timesteps [B]; of per-token
        timesteps [B, N] (TI2V), temb [B, N, D] and timestep_proj [B, N, 6, D]."""
        features = sinusoidal_embedding(timestep.flatten(), self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = batch_invariant(self.time_embedder, features).to(dtype)
        tproj = batch_invariant(lambda t: self.time_proj(F.silu(t)), temb)
        return temb.unflatten(0, timestep.shape), tproj.unflatten(0, timestep.shape).unflatten(-1, (6, -1))


@dataclass
class Context:
    """What one stream's cross-attentions read in a call: the embedded text, image and identity states (the
    identity on the video stream only), or a ``ContextCache`` holding every block's keys and values; ``cross``
    False: the stream skips the cross-attention (Stand-In's reference tokens), ``kv`` gives None."""

    text: torch.Tensor | None
    image: torch.Tensor | None
    identity: torch.Tensor | None = None
    cache: ContextCache | None = None
    stream: str = "video"
    cross: bool = True

    def kv(self, layer: int, block: StreamBlock) -> CrossKV | None:
        if not self.cross:
            return None
        if self.cache is None:
            return block.attn2.cross_kv(self.text, self.image, self.identity)
        if self.stream == "video":
            return self.cache.video[layer]
        if self.cache.reference is None:  # Token-Concat: the video blocks' keys and values, without the identity
            return dataclasses.replace(self.cache.video[layer], identity=None)
        return self.cache.reference[layer]

    def for_references(self, cross: bool = True) -> "Context":
        """The reference stream's context: the same states without the identity (it conditions the video only);
        ``cross`` False where the references skip the cross-attention (``ref_cross_attention``)."""
        return Context(self.text, self.image, None, self.cache, "reference", cross)


class MultiViewWanTransformer(JointAttention, nn.Module):
    """A Wan DiT with a reference stream; with no references it is exactly its base model (T2V or I2V)."""

    # (video blocks, reference blocks): module lists whose blocks name their modules alike (the reference stream
    # may share the video stream's weights: engine.adapters.reference_weights)
    REFERENCE_BLOCKS = (("blocks", "ref_blocks"),)
    # kept in float32 beside what diffusers' Wan keeps (engine.backbones.assembly.kept_float32): the view tables
    FP32_PARAMS = ("view_logit_scales", "view_omega")

    def __init__(self, config: MvgenConfig):
        super().__init__()
        self._config = cfg = config
        dim = cfg.inner_dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.ref_patch_embedding: nn.Conv3d | None = None
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList(StreamBlock(cfg, identity=cfg.identity) for _ in range(cfg.num_layers))
        # the reference stream has no identity adapter: identity conditions the generated video only. Built here as
        # blocks of their own; load_denoiser makes them hold the video blocks' parameters where they are the same
        # (ref_weights="shared", engine.adapters.reference_weights)
        self.ref_blocks = (
            nn.ModuleList(StreamBlock(cfg) for _ in range(cfg.num_layers)) if cfg.ref_mode == "dual_stream" else None
        )
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        weights = cfg.view_logit_scales if cfg.view_logit_scales is not None else (1.0,) * cfg.max_references
        self.register_buffer("view_logit_scales", torch.tensor(weights, dtype=torch.float32))
        if cfg.view_attention == "multiview":
            # MVAnimate Eq. 2's learned per-view omega [max_references] (engine.modes.view_attention): an adapter
            # tensor of this name replaces it; a state without it loads the paper's [0.25, 0.25, 0.1, ...]
            self.register_buffer("view_omega", paper_view_omega(cfg.max_references))
            self.register_load_state_dict_pre_hook(fill_paper_omega)
        else:
            self.view_omega = None
        # ProFashion PPA's pose encoder and per-layer pose selectors (engine.modes.prototype)
        self.prototype = PrototypeAggregator(cfg) if cfg.ref_attention == "prototype" else None
        # this rank's token shards and the Ulysses all-to-alls (engine.runtime.parallel); None: one process holds all
        self.sequence_parallel: SequenceParallel | None = None

    @property
    def config(self) -> MvgenConfig:
        return self._config

    @config.setter
    def config(self, cfg: MvgenConfig) -> None:
        """A new configuration reaches every kernel dispatch of the model: the attention reads it per call, the
        blocks' fusions and the modes' kernels (``backend`` attributes) are told here, so switching
        ``attention_backend`` on one set of weights switches every kernel (parity tests, GPU comparisons)."""
        self._config = cfg
        for module in self.modules():
            if isinstance(module, (StreamBlock, IdentityCrossAttention, PrototypeAggregator)):
                module.backend = kernel_backend(cfg.attention_backend)

    def parallelize(self, sp: SequenceParallel | None) -> None:
        """Run every later call as one rank of a sequence-parallel group (None: alone again). The video and the
        joint reference stream are sharded by tokens; a cached or prototype reference stream, small and computed
        once, is held whole by every rank (and MVAnimate's Eq. 2 gathers the joint stream's keys and values:
        each video token reads every view at its aligned cell)."""
        if sp is not None:
            ParallelLayout(sp.size).check_heads(self.config.num_attention_heads)
        self.sequence_parallel = sp

    # ---- pieces -------------------------------------------------------------------------------------------
    def reference_block(self, i: int) -> StreamBlock:
        return self.ref_blocks[i] if self.ref_blocks is not None else self.blocks[i]

    def init_reference_stream_from_base(self) -> None:
        """MVI2V initialisation: the reference stream starts as a copy of the video stream's weights (a model built
        here; ``load_denoiser`` shares them instead, ``engine.adapters.reference_weights``)."""
        if self.ref_blocks is not None:
            base = self.blocks.state_dict()
            self.ref_blocks.load_state_dict({k: v for k, v in base.items() if ".attn2.identity." not in k})

    def embed_references(self, ref_latents: torch.Tensor) -> torch.Tensor:
        """[B, R, 16, Hr, Wr] clean latents -> [B, R*hr*wr, D] tokens.

        Without an adapter-provided embedding a reference enters Wan's own patch embedding as the 36
        channels ``[z, ones(4), z]``: a fully known frame whose first-frame condition is itself.
        """
        b, r, c, hr, wr = ref_latents.shape
        z = ref_latents.reshape(b * r, c, 1, hr, wr)
        embed = self.ref_patch_embedding if self.ref_patch_embedding is not None else self.patch_embedding
        if embed.in_channels != c:
            z = torch.cat([z, torch.ones_like(z[:, :4]), z], dim=1)
        tokens = batch_invariant(embed, z.to(embed.weight.dtype)).flatten(2).transpose(1, 2)  # [B*R, hr*wr, D]
        return tokens.reshape(b, -1, tokens.shape[-1]).contiguous()  # the row-wise fusion kernels read rows

    def reference_key_scale(self, num_video: int, num_refs: int, tokens_per_ref: int, device) -> torch.Tensor:
        """Per-key logit multiplier: 1 for video keys, omega_m for the keys of view m (MVAnimate)."""
        # gathered, not sliced: an exported graph's reference count is symbolic over the refs axis, which may reach
        # past max_references (a slice of the buffer would then be shorter than the keys); a request never does
        views = torch.arange(num_refs, device=self.view_logit_scales.device).clamp(
            max=max(self.view_logit_scales.shape[0] - 1, 0))
        ref_scale = self.view_logit_scales[views].repeat_interleave(tokens_per_ref)
        return torch.cat([torch.ones(num_video, device=device), ref_scale.to(device)])

    def _reference_grid(self, ref_latents: torch.Tensor) -> tuple[int, tuple[int, int]]:
        """(R, (hr, wr)): the number of references and each one's token grid after patching."""
        _, num_refs, _, height, width = ref_latents.shape
        _, ph, pw = self.config.patch_size
        return num_refs, (height // ph, width // pw)

    def _keys_layout(self, video_pos, num_refs, ref_hw, video_fhw):
        """Positions [Nv + R*hr*wr, 3] of the [video | reference] keys and their per-key logit scales."""
        cfg = self.config
        ref_pos = rd_rope_positions(cfg.ref_rope, num_refs, ref_hw, video_fhw, cfg.ref_t_stride, device=video_pos.device)
        key_scale = self.reference_key_scale(video_pos.shape[0], num_refs, ref_hw[0] * ref_hw[1], video_pos.device)
        return torch.cat([video_pos, ref_pos]), key_scale

    def _reference_context(self, video_context: Context) -> Context:
        """The reference stream's cross-attention context beside this video context (none where the references skip
        the cross-attention: ``ref_cross_attention=False``)."""
        return video_context.for_references(self.config.ref_cross_attention)

    def _ref_timestep(self, timestep):
        return torch.zeros_like(timestep) if self.config.ref_timestep == "zero" else timestep

    def _check_image_context(self, image_context) -> None:
        """CLIP states exactly when the checkpoint has an image embedder (Wan2.1-I2V; not T2V, not Wan2.2)."""
        if (image_context is None) != (self.config.image_dim is None):
            raise ValueError(f"this denoiser takes {'no' if self.config.image_dim is None else 'an'} image_context")

    def _contexts(self, text, image_context):
        emb = self.condition_embedder
        dtype = self.proj_out.weight.dtype
        image = emb.image_embedder(image_context.to(dtype)) if emb.image_embedder is not None else None
        return emb.text_embedder(text.to(dtype)), image

    def _identity_context(self, identity_context: torch.Tensor | None) -> torch.Tensor | None:
        """M2HVideo: CLIP states [B, L, image_dim] of the identity image -> [B, L, D] through the checkpoint's own
        image embedder (``engine.modes.identity``); None (no identity in this request) skips the adapter."""
        if identity_context is None:
            return None
        if not self.config.identity:
            raise ValueError("identity_context is for denoisers with M2HVideo's identity adapter (identity=True); "
                             "this one has none")
        return self.condition_embedder.image_embedder(identity_context.to(self.proj_out.weight.dtype))

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor | None,
        timestep: torch.Tensor,
        text: torch.Tensor,
        image_context: torch.Tensor | None,
        ref_latents: torch.Tensor | None = None,
        ref_cache: ReferenceCache | None = None,
        *,
        frame_pose: torch.Tensor | None = None,
        ref_pose: torch.Tensor | None = None,
        identity_context: torch.Tensor | None = None,
        view_omega: torch.Tensor | None = None,
        context_cache: ContextCache | None = None,
        step_cache: StepCache | None = None,
        text_mask: torch.Tensor | None = None,
        pooled_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow-matching velocity [B, 16, F, H, W].

        latents [B,16,F,H,W], condition [B,20,F,H,W] (4 mask + 16 first-frame channels; None on T2V),
        timestep [B], text [B,L,text_dim], image_context [B,257,image_dim] (None without CLIP: T2V, Wan2.2),
        ref_latents [B,R,16,Hr,Wr] (R may be 0) or
        ``ref_cache`` from ``precompute_reference`` (isolated + zero-timestep reference stream).
        The seed methods' inputs (None unless the config's mode takes them): ``frame_pose`` [B, F, Cp, H, W]
        and ``ref_pose`` [B, R, Cp, Hr, Wr] rendered pose images on the latent grid in [-1, 1] (ProFashion PPA,
        ``ref_attention="prototype"``), ``identity_context`` [B, 257, image_dim] CLIP states of an identity
        image (M2HVideo, ``identity``), ``view_omega`` [B, R] per-view weights of MVAnimate's Eq. 2
        (``view_attention="multiview"``; None: the adapter's). ``context_cache`` from ``precompute_context`` holds
        every block's cross-attention keys and values of these rows' text/image/identity states (then only their
        shapes are read). ``step_cache`` (``engine.runtime.step_cache``): this request's TeaCache state; on a step it
        finds redundant the block stack is skipped and its last residual reused. ``text_mask`` and
        ``pooled_text`` are the MMDiT's text inputs (``engine.backbones.mmdit.model``): a Wan denoiser takes neither.
        """
        if text_mask is not None or pooled_text is not None:
            raise ValueError("text_mask and pooled_text are inputs of the MMDiT denoiser; a Wan denoiser takes "
                             "neither (its text is the umT5 states, read through cross-attention)")
        cfg = self.config
        b, _, frames, height, width = latents.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = frames // pt, height // ph, width // pw
        device = latents.device
        # a served model receives an absent mode input as an empty tensor (denoiser_io.mode_specs); a traced graph
        # keeps them (its shapes are symbolic)
        if not (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()):
            frame_pose, ref_pose, identity_context, view_omega = (
                t if t is not None and t.numel() > 0 else None
                for t in (frame_pose, ref_pose, identity_context, view_omega))

        # 1. video tokens [B, Nv, D] and their (t, h, w) positions [Nv, 3]
        # the convolution's algorithm depends on the batch, so it runs on fixed row blocks (see batch_invariant)
        if (condition is None) != (cfg.condition_channels == 0) and not cfg.condition_optional:
            raise ValueError(f"a {cfg.task} denoiser takes {'no' if cfg.condition_channels == 0 else 'a'} condition")
        self._check_image_context(image_context)
        token_known = None
        if cfg.condition_optional and condition is not None:  # TI2V: the known latents replace the noisy ones
            known, first = condition[:, :1], condition[:, 1:]
            video = known * first + (1 - known) * latents
            token_known = known[:, 0, ::pt, ::ph, ::pw].flatten(1)  # [B, Nv]: 1 where the token is a known frame
        else:
            video = latents if condition is None else torch.cat([latents, condition], dim=1)
        x = batch_invariant(self.patch_embedding, video.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2).contiguous()
        n_video = x.shape[1]
        video_pos = grid_positions(f, h, w, device=device)
        sp = self.sequence_parallel
        if sp is not None:  # this rank's share of the video tokens and their positions
            x, video_pos = sp.shard(x, 1), sp.shard(video_pos, 0)

        # 2. timestep and context embeddings (TI2V with a first frame: per token, 0 on the known tokens, as diffusers'
        # expand_timesteps; every rank keeps its tokens' share)
        temb, tproj = self.condition_embedder.time(
            timestep if token_known is None else timestep[:, None] * (1 - token_known), x.dtype)
        if token_known is not None and sp is not None:
            temb, tproj = sp.shard(temb, 1), sp.shard(tproj, 1)
        if context_cache is not None:
            if context_cache.rows != b:
                raise ValueError(f"context cache holds {context_cache.rows} rows, this call has {b}")
            video_ctx = Context(None, None, None, context_cache)
        else:
            text_ctx, image_ctx = self._contexts(text, image_context)
            video_ctx = Context(text_ctx, image_ctx, self._identity_context(identity_context))  # identity [B, L, D]
        if view_omega is not None and self.view_omega is None:
            raise ValueError("view_omega is for denoisers with MVAnimate's multi-view attention "
                             "(view_attention='multiview'); this one has none")

        # 3. blocks: reference stream joint with the video, cached, or absent; skipped on the steps the step cache
        # finds redundant (the first block's modulated input barely moved: its last residual is reused)
        if self.prototype is not None and ref_latents is not None and ref_latents.shape[1] == 0:
            ref_latents = None  # no reference, no prototype: the base model
        blocks = (lambda x: self._blocks(x, n_video, video_pos, timestep, tproj, video_ctx, ref_latents, ref_cache,
                                         frame_pose, ref_pose, (f, h, w), view_omega))
        if step_cache is None:
            x = blocks(x)
        else:
            first = self.blocks[0]
            real = n_video if sp is None else max(0, min(x.shape[1], n_video - sp.first_token(n_video)))
            if step_cache.skip(first.attention_input(x, first.modulation(tproj)), real):
                x = x + step_cache.residual
            else:
                start, x = x, blocks(x)
                step_cache.computed_residual(x - start)

        # 4. output head on video tokens, unpatchify
        if temb.dim() == 3:  # per token (TI2V): [B, n_local, D] each
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # [B, Nv, 16*pt*ph*pw]
        if sp is not None:  # every rank's tokens, padding cut
            x = sp.gather(x, n_video)
        x = x.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f * pt, h * ph, w * pw)

    def _blocks(self, x, n_video, video_pos, timestep, tproj, video_ctx, ref_latents, ref_cache, frame_pose, ref_pose,
                fhw, view_omega):
        """The block stack over this rank's video tokens x [B, n_local, D], with the reference stream joint, cached,
        as PPA prototypes, or absent: one driver (``engine.streams.driver``) over the streams of this call."""
        if ref_cache is not None and ref_cache.video_fhw != fhw:
            raise ValueError(f"reference cache was built for video grid {ref_cache.video_fhw}, this call has {fhw}")
        sp = self.sequence_parallel
        video = VideoRows(x, video_pos, self._rope(video_pos, x), n_video if sp is not None else None, tproj, video_ctx)
        if self.prototype is not None and (ref_cache is not None or ref_latents is not None):
            reference, hooks = self._prototype_source(video, timestep, ref_latents, ref_cache, frame_pose, ref_pose,
                                                      fhw), ()
        else:
            reference, hooks = self._reference_source(video, n_video, timestep, ref_latents, ref_cache, fhw,
                                                      view_omega)
        for _ in run_layers(self, video, reference, hooks):
            pass
        return video.x

    def _reference_source(self, video: VideoRows, n_video, timestep, ref_latents, ref_cache, fhw, view_omega):
        """The reference stream beside the video (live, or its cached K/V) and MVAnimate's Eq. 2 hook on the video
        rows where the model has it; (None, ()) without references."""
        sp, x = self.sequence_parallel, video.x
        n_local = x.shape[1]
        if ref_cache is not None:  # held whole by every rank under sequence parallel
            num_refs, ref_hw = ref_cache.num_refs, ref_cache.ref_hw
            pos, key_scale = self._keys_layout(video.pos, num_refs, ref_hw, fhw)
            ref_pos, ref_scale = pos[n_local:], key_scale[n_local:]
            reference = CachedReference(ref_cache.keys, ref_cache.values, ref_pos, ref_scale, self._rope(ref_pos, x))
        elif ref_latents is not None:
            r = self.embed_references(ref_latents)  # [B, R*hr*wr, D]
            num_refs, ref_hw = self._reference_grid(ref_latents)
            pos, key_scale = self._keys_layout(video.pos, num_refs, ref_hw, fhw)
            n_ref, ref_pos, ref_scale = r.shape[1], pos[n_local:], key_scale[n_local:]
            if sp is not None:  # the reference stream is sharded like the video
                r, ref_pos, ref_scale = sp.shard(r, 1), sp.shard(ref_pos, 0), sp.shard(ref_scale, 0)
            _, ref_tproj = self.condition_embedder.time(self._ref_timestep(timestep), x.dtype)
            reference = LiveReference(self.reference_block, r, ref_pos, ref_scale, self._rope(ref_pos, r),
                                      n_ref if sp is not None else None, ref_tproj,
                                      self._reference_context(video.context), len(self.blocks), sp)
        else:
            return None, ()
        views = ViewAttention.for_call(self.view_omega, view_omega, self.config.view_lambda, x.shape[0], num_refs,
                                       fhw, ref_hw, x.device)
        first_token = sp.first_token(n_video) if sp is not None else 0
        return reference, (() if views is None else (ViewAttentionHook(views, first_token),))

    def _prototype_source(self, video: VideoRows, timestep, ref_latents, ref_cache, frame_pose, ref_pose, fhw):
        """ProFashion PPA (``engine.modes.prototype``): video queries of frame i attend to every video key plus the
        T tokens of frame i's prototype, aggregated per layer from the isolated reference stream (run beside the
        video layer by layer, or read from ``ref_cache``); every rank holds the prototypes whole."""
        if ref_cache is not None:
            num_refs, ref_hw = ref_cache.num_refs, ref_cache.ref_hw
            features = zip(ref_cache.keys, ref_cache.values)
        else:
            num_refs, ref_hw = self._reference_grid(ref_latents)
            features = self._reference_features(ref_latents, self._ref_timestep(timestep),
                                                self._reference_context(video.context), fhw)
        poses = self.prototype.encode_poses(frame_pose, ref_pose, fhw, num_refs, ref_hw)
        proto_pos = prototype_positions(self.config.ref_rope, fhw, ref_hw, device=video.x.device)
        mask = dict(mask="prototype", tokens_per_frame=fhw[1] * fhw[2], proto_tokens=ref_hw[0] * ref_hw[1])
        return PrototypeReference(self.prototype, poses, iter(features), proto_pos, self._rope(proto_pos, video.x),
                                  mask)

    def _isolated_reference(self, ref_latents, ref_timestep, ref_ctx: Context, fhw, attention: dict,
                            keep_last: bool) -> IsolatedReference:
        """The reference stream to run alone (video-independent: ``isolated`` or PPA's), at its own positions."""
        num_refs, ref_hw = self._reference_grid(ref_latents)
        r = self.embed_references(ref_latents)  # [B, R*T, D]
        no_video = torch.zeros(0, 3, dtype=torch.long, device=r.device)
        pos, key_scale = self._keys_layout(no_video, num_refs, ref_hw, fhw)
        _, ref_tproj = self.condition_embedder.time(ref_timestep, r.dtype)
        return IsolatedReference(self.reference_block, r, pos, key_scale, ref_tproj, ref_ctx, len(self.blocks),
                                 keep_last, attention)

    def _reference_features(self, ref_latents, ref_timestep, ref_ctx: Context, fhw):
        """Per layer, the isolated reference stream's attention input projected by the video block's K/V weights
        (``PrototypeAggregator.reference_features``), yielded as the stream advances layer by layer."""
        source = self._isolated_reference(ref_latents, ref_timestep, ref_ctx, fhw, {"mask": "full"}, keep_last=False)
        for i in run_layers(self, None, source):
            yield self.prototype.reference_features(source.z, self.blocks[i].attn1)

    @torch.no_grad()
    def precompute_context(self, text: torch.Tensor, image_context: torch.Tensor | None,
                           identity_context: torch.Tensor | None = None) -> ContextCache:
        """Every block's cross-attention keys and values of these rows' text [B, L, text_dim], CLIP image
        [B, 257, image_dim] and identity (M2HVideo) states, for both streams: a request's step-invariant work,
        done once and passed to every step as ``forward(context_cache=...)``."""
        self._check_image_context(image_context)
        text_ctx, image_ctx = self._contexts(text, image_context)
        if identity_context is not None and identity_context.numel() == 0:
            identity_context = None  # a served call's absent input travels empty
        video = Context(text_ctx, image_ctx, self._identity_context(identity_context))
        reference = self._reference_context(video)
        return ContextCache([video.kv(i, block) for i, block in enumerate(self.blocks)],
                            None if self.ref_blocks is None or not reference.cross else
                            [reference.kv(i, block) for i, block in enumerate(self.ref_blocks)])

    @torch.no_grad()
    def precompute_reference(self, ref_latents, text, image_context, latent_fhw) -> ReferenceCache:
        """Run the reference stream alone once and keep each layer's K/V.

        ``latent_fhw`` is the video latent's (frames, height, width), which fixes the reference positions
        (``shared`` places references after the last frame; ``decoupled`` centres them on the video grid).
        Valid only when the reference stream depends neither on the video (``ref_attention='isolated'``, or
        ``'prototype'``, whose reference stream runs isolated) nor on the step (``ref_timestep='zero'``); then
        every step reuses the cache.
        """
        cfg = self.config
        fhw = tuple(n // p for n, p in zip(latent_fhw, cfg.patch_size))
        num_refs, ref_hw = self._reference_grid(ref_latents)
        ref_ctx = self._reference_context(Context(*self._contexts(text, image_context)))
        zero = torch.zeros(ref_latents.shape[0], device=ref_latents.device)
        if self.prototype is not None and cfg.ref_timestep == "zero":  # PPA's isolated reference stream
            keys, values = zip(*self._reference_features(ref_latents, zero, ref_ctx, fhw))
            return ReferenceCache(list(keys), list(values), num_refs, ref_hw, fhw)
        if not cfg.caches_reference:
            raise ValueError(
                "reference K/V caching needs ref_attention='isolated' and ref_timestep='zero', "
                f"got ref_attention={cfg.ref_attention!r}, ref_timestep={cfg.ref_timestep!r}"
            )
        source = self._isolated_reference(ref_latents, zero, ref_ctx, fhw, {}, keep_last=True)
        keys, values = [], []
        for _ in run_layers(self, None, source):
            keys.append(source.kept[0])
            values.append(source.kept[1])
        return ReferenceCache(keys, values, num_refs, ref_hw, fhw)
