"""MVI2V's triple stream on an MMDiT video backbone: video, references and text as three streams.

The backbone is diffusers' ``HunyuanVideoTransformer3DModel``: dual-stream blocks (video and text, each with its
own modulation, Q/K/V/out projections and FFN, meeting in one joint self-attention) followed by single-stream blocks
(video and text concatenated through one set of weights). MVI2V (Sec. 4.2; App. B: "transforming its dual-stream
design into a tri-stream architecture ... a reference token stream, whose modules were initialized with weights from
the video token stream"; Sec. 5.1: "we extend their single-stream blocks and dual-stream blocks into dual-stream
blocks and triplet-stream blocks") adds the clean reference views as a stream of their own:

- each **dual-stream block** becomes triple-stream: the references get their own AdaLN-Zero modulation, Q/K/V/out
  projections with per-head QK RMSNorm, and FFN (``ReferenceBlock``), initialised from the block's video modules;
- each **single-stream block** becomes dual-stream: video and text keep sharing the block's weights (as in the base),
  the references run through their own copy of the block (``ref_single_blocks``), initialised from it.

The streams meet only in the joint self-attentions. Every block runs its streams as data (``_Stream`` with a
``_StreamModules`` view per block) through the one joint attention of every backbone (``engine.streams.joint_attention``)
over ``[video | references | text]``: per stream the QK prologue (per-head RMSNorm, RoPE with HunyuanVideo's bands at
the stream's positions: the video grid, the references' RD-RoPE placement, none for text), then one attention with
the streams given by offsets, the text padding as per-row key lengths (diffusers' ``encoder_attention_mask``) and
``ref_attention``'s mask (``full``; ``isolated``: reference queries see reference keys only). With ``ref_mode="token_concat"`` the references
run through the video stream's modules (MVI2V's Token-Concat baseline).

Parameter names of the base follow diffusers key for key (the modules are diffusers' own: patch embedding, token
refiner, condition embedding, the blocks' norms, attentions and FFNs, the output norm), so a ``save_pretrained``
directory loads as it is; the reference stream lives in ``ref_blocks`` and ``ref_single_blocks``. The modules are
diffusers'; the order of operations across streams is ours. With no reference the model is its base exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoConditionEmbedding,
    HunyuanVideoPatchEmbed,
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTokenRefiner,
    HunyuanVideoTransformerBlock,
)
from torch import nn

from kernels import adaln_layernorm, gated_residual, kernel_backend

from ...config import MvgenConfig
from ...modes.prototype import PoseTokens, PrototypeAggregator, prototype_positions
from ...modes.view_attention import ViewAttention, fill_paper_omega, paper_view_omega
from ..families import MMDIT, family_of
from ...runtime.batch_invariance import batch_invariant
from ...runtime.caches import ReferenceCache
from ...runtime.parallel import ParallelLayout, SequenceParallel
from ...streams.joint_attention import JointAttention, QKNorm, StreamQKV
from ...streams.positions import grid_positions, rd_rope_positions

EPS = 1e-6  # every LayerNorm and QK RMSNorm of HunyuanVideo


class ReferenceBlock(nn.Module):
    """The reference stream's modules of one dual-stream block, named as the block's video modules (``norm1``,
    ``attn.to_q/to_k/to_v/norm_q/norm_k/to_out.0``, ``norm2``, ``ff``) so MVI2V's initialisation is a key copy."""

    def __init__(self, cfg: MvgenConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = AdaLayerNormZero(dim, norm_type="layer_norm")
        # the projections of a diffusers Attention without added K/V (its processor is never called: the joint
        # attention runs outside, over every stream)
        self.attn = Attention(query_dim=dim, cross_attention_dim=None, dim_head=cfg.attention_head_dim,
                              heads=cfg.num_attention_heads, out_dim=dim, bias=True, qk_norm="rms_norm", eps=EPS)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
        self.ff = FeedForward(dim, mult=cfg.mlp_ratio, activation_fn="gelu-approximate")


@dataclass(frozen=True)
class _StreamModules:
    """One stream's modules in one block: its modulation linear (``chunks`` of shift/scale/gate), Q/K/V
    projections, per-head QK RMSNorms, and either (dual-stream) an output projection and an FFN, or (single-stream)
    the MLP branch and the output projection that reads [attention | MLP]."""

    modulation: nn.Linear
    chunks: int
    heads: int
    to_q: nn.Module
    to_k: nn.Module
    to_v: nn.Module
    norm_q: nn.Module
    norm_k: nn.Module
    to_out: nn.Module
    ff: nn.Module | None = None
    proj_mlp: nn.Module | None = None

    @classmethod
    def dual_video(cls, block: HunyuanVideoTransformerBlock | ReferenceBlock) -> "_StreamModules":
        a = block.attn
        return cls(block.norm1.linear, 6, a.heads, a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k, a.to_out[0],
                   ff=block.ff)

    @classmethod
    def dual_text(cls, block: HunyuanVideoTransformerBlock) -> "_StreamModules":
        a = block.attn
        return cls(block.norm1_context.linear, 6, a.heads, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.norm_added_q,
                   a.norm_added_k, a.to_add_out, ff=block.ff_context)

    @classmethod
    def single(cls, block: HunyuanVideoSingleTransformerBlock) -> "_StreamModules":
        a = block.attn
        return cls(block.norm.linear, 3, a.heads, a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k, block.proj_out,
                   proj_mlp=block.proj_mlp)

    def key_value_heads(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values [B, N, D] -> keys RMS-normalised per head and values, [B, N, H, Dh] (what
        PPA's prototypes need: ``engine.modes.prototype``)."""
        return self.norm_k(k.unflatten(2, (self.heads, -1))), v.unflatten(2, (self.heads, -1))


@dataclass
class _Stream:
    """One stream's state through the blocks: its role (``engine.streams.joint_attention.STREAM_ROLES``), tokens [B, N, D],
    the embedding that modulates it [B, D], its positions [N, 3] and their RoPE table (None where the prologue
    kernel computes angles)."""

    name: str
    x: torch.Tensor
    temb: torch.Tensor
    pos: torch.Tensor
    rope: tuple | None
    tokens: int | None = None  # under sequence parallel: the whole stream's tokens (this rank holds a shard)


@dataclass
class _CachedStream:
    """The reference stream as keys and values only, per layer [B, n_ref, H, Dh] (normalised, before RoPE) of a
    ``ReferenceCache`` (``isolated`` + ``zero`` timestep: it reads neither the video, the text nor the step);
    ``layer`` advances with the blocks."""

    name: str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: torch.Tensor
    rope: tuple | None
    layer: int = 0


@dataclass
class _PrototypeStream:
    """ProFashion PPA's prototypes as keys and values only: per layer, each frame's T tokens aggregated from that
    layer's reference features (``features``: (W_k z, W_v z) [B, R*T, D] per layer, computed once per call or
    read from a ``ReferenceCache``) by the pose selectors, projected with the video block's biases and key norm;
    held whole by every rank under sequence parallel."""

    name: str
    features: list
    prototype: PrototypeAggregator
    poses: PoseTokens
    pos: torch.Tensor
    rope: tuple | None
    layer: int = 0


@dataclass(frozen=True)
class _ViewRows:
    """MVAnimate's Eq. 2 (``engine.modes.view_attention``) on each block's video rows: the video queries and every
    view's keys, RMS-normalised and unrotated, and the views' values (a live reference stream's gathered whole
    under sequence parallel; a cached one's as kept, which is exactly that)."""

    views: ViewAttention
    first_token: int  # this rank's first video token
    sequence_parallel: SequenceParallel | None

    def __call__(self, rows, reference, video_modules: _StreamModules, video: StreamQKV,
                 ref_modules: _StreamModules, ref: StreamQKV) -> torch.Tensor:
        q = video_modules.norm_q(video.q)
        if isinstance(reference, _CachedStream):
            k, v = ref.k, ref.v
        else:
            k, v, sp = ref_modules.norm_k(ref.k), ref.v, self.sequence_parallel
            if sp is not None:
                k, v = sp.gather(k, reference.tokens), sp.gather(v, reference.tokens)
        return self.views(rows, q, k, v, self.first_token)


class MultiViewMMDiT(JointAttention, nn.Module):
    """HunyuanVideo (T2V, or I2V with ``latent_concat``) with MVI2V's reference stream."""

    # (video blocks, reference blocks) whose modules share names: the reference stream may hold the video stream's
    # weights (engine.adapters.reference_weights)
    REFERENCE_BLOCKS = (("transformer_blocks", "ref_blocks"), ("single_transformer_blocks", "ref_single_blocks"))
    FP32_PARAMS = ("view_omega",)  # kept in float32 whatever the compute dtype (engine.backbones.assembly)

    def __init__(self, config: MvgenConfig):
        super().__init__()
        if family_of(config) is not MMDIT:
            raise ValueError(f"MultiViewMMDiT takes an MMDiT config, got family {config.family!r}")
        self.config = cfg = config
        dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        pt, p, _ = cfg.patch_size
        self.x_embedder = HunyuanVideoPatchEmbed((pt, p, p), cfg.in_channels, dim)
        self.context_embedder = HunyuanVideoTokenRefiner(cfg.text_dim, heads, head_dim,
                                                         num_layers=cfg.num_refiner_layers)
        self.time_text_embed = HunyuanVideoConditionEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds,
                                                              cfg.image_condition_type)
        self.transformer_blocks = nn.ModuleList(
            HunyuanVideoTransformerBlock(heads, head_dim, mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm)
            for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            HunyuanVideoSingleTransformerBlock(heads, head_dim, mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm)
            for _ in range(cfg.num_single_layers))
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=EPS)
        self.proj_out = nn.Linear(dim, pt * p * p * cfg.out_channels)
        own = cfg.ref_mode == "dual_stream"  # Token-Concat: the references go through the video modules
        self.ref_blocks = nn.ModuleList(ReferenceBlock(cfg) for _ in range(cfg.num_layers)) if own else None
        self.ref_single_blocks = (nn.ModuleList(
            HunyuanVideoSingleTransformerBlock(heads, head_dim, mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm)
            for _ in range(cfg.num_single_layers)) if own else None)
        # MVAnimate's per-view omega of Eq. 2 (engine.modes.view_attention): the paper's initial values unless an
        # adapter gives its own
        if cfg.view_attention == "multiview":
            self.register_buffer("view_omega", paper_view_omega(cfg.max_references))
            self.register_load_state_dict_pre_hook(fill_paper_omega)
        else:
            self.view_omega = None
        # ProFashion PPA (engine.modes.prototype): a pose selector per layer, dual-stream blocks then single-stream
        self.prototype = (PrototypeAggregator(cfg, layers=cfg.num_layers + cfg.num_single_layers)
                          if cfg.ref_attention == "prototype" else None)
        # this rank's token shards and the Ulysses all-to-alls (engine.runtime.parallel); None: one process holds all
        self.sequence_parallel: SequenceParallel | None = None

    def parallelize(self, sp: SequenceParallel | None) -> None:
        """Run every later call as one rank of a sequence-parallel group (None: alone again): the video, reference
        and text streams are sharded by tokens (a cached reference stream is held whole by every rank)."""
        if sp is not None:
            ParallelLayout(sp.size).check_heads(self.config.num_attention_heads)
        self.sequence_parallel = sp

    # ---- the reference stream's modules -------------------------------------------------------------------
    def init_reference_stream_from_base(self) -> None:
        """MVI2V's initialisation (a model built here; a load assembles it: ``engine.backbones.assembly``): each
        reference module list a copy of its video stream's list."""
        if self.ref_blocks is not None:
            for video, ref in self.REFERENCE_BLOCKS:
                own = getattr(self, ref).state_dict()  # a dual-stream block's reference modules: no text stream
                getattr(self, ref).load_state_dict({k: v for k, v in getattr(self, video).state_dict().items()
                                                    if k in own})

    def _dual_modules(self, i: int, stream: str) -> _StreamModules:
        block = self.transformer_blocks[i]
        if stream == "text":
            return _StreamModules.dual_text(block)
        if stream == "reference" and self.ref_blocks is not None:
            return _StreamModules.dual_video(self.ref_blocks[i])
        return _StreamModules.dual_video(block)

    def _single_modules(self, i: int, stream: str) -> _StreamModules:
        own = stream == "reference" and self.ref_single_blocks is not None
        return _StreamModules.single(self.ref_single_blocks[i] if own else self.single_transformer_blocks[i])

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, condition: torch.Tensor | None, timestep: torch.Tensor,
                text: torch.Tensor, image_context: torch.Tensor | None = None,
                ref_latents: torch.Tensor | None = None, ref_cache=None, *, text_mask: torch.Tensor | None = None,
                pooled_text: torch.Tensor | None = None, frame_pose=None, ref_pose=None, identity_context=None,
                view_omega=None, context_cache=None, step_cache=None) -> torch.Tensor:
        """Flow-matching velocity [B, 16, F, H, W].

        latents [B, 16, F, H, W]; condition [B, 17, F, H, W] on I2V (HunyuanVideo-I2V's ``latent_concat``: the
        first frame's latent in frame 0 then zeros, and a mask channel; None on T2V), so ``cat([latents,
        condition])`` is diffusers' model input; timestep [B]; text [B, L, text_dim] (Llama states), text_mask
        [B, L] (1 = token; the valid tokens come first), pooled_text [B, pooled_projection_dim] (CLIP);
        ref_latents [B, R, 16, Hr, Wr] clean reference latents (R may be 0, or None); the seed methods' inputs as on
        Wan (``frame_pose`` [B, F, Cp, H, W] and ``ref_pose`` [B, R, Cp, Hr, Wr]: ProFashion PPA; ``view_omega``
        [B, R]: MVAnimate's per-view weights, None: the model's). The Wan-only inputs (``image_context``,
        ``identity_context``, the context cache) must be absent; a served call sends them empty.
        """
        cfg = self.config
        exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
        for name, value in (("image_context", image_context), ("identity_context", identity_context),
                            ("context_cache", context_cache)):
            if value is not None and not (isinstance(value, torch.Tensor) and (exporting or value.numel() == 0)):
                raise ValueError(f"{name} is not an input of the MMDiT denoiser (Wan-family only)")
        if text_mask is None or pooled_text is None:
            raise ValueError("the MMDiT denoiser needs text_mask [B, L] and pooled_text [B, pooled_projection_dim] "
                             "beside text")
        if not exporting:  # a served call's absent input travels empty
            frame_pose, ref_pose, view_omega = (t if t is not None and t.numel() > 0 else None
                                                for t in (frame_pose, ref_pose, view_omega))
        if view_omega is not None and self.view_omega is None:
            raise ValueError("view_omega is for denoisers with MVAnimate's multi-view attention "
                             "(view_attention='multiview'); this one has none")
        if (condition is None) != (cfg.condition_channels == 0):
            raise ValueError(f"a {cfg.task} denoiser takes {'no' if cfg.condition_channels == 0 else 'a'} condition")
        b, _, frames, height, width = latents.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = frames // pt, height // ph, width // pw
        dtype = self.proj_out.weight.dtype
        video = latents if condition is None else torch.cat([latents, condition], dim=1)

        # 1. conditioning: timestep + pooled CLIP text [B, D]; the refined text tokens [B, L, D]; video tokens
        # (small-M layers on fixed row blocks, so a row's bits never depend on its batch: engine.backbones.wan.model's
        # batch_invariant)
        timestep = timestep.to(dtype)
        temb = batch_invariant(lambda t, pooled: self.time_text_embed(t, pooled)[0], timestep, pooled_text.to(dtype))
        tokens = self._refine_text(text.to(dtype), timestep, text_mask)
        x = batch_invariant(self.x_embedder, video.to(dtype))
        n_text = tokens.shape[1]
        streams = [_Stream("video", x, temb, grid_positions(f, h, w, device=x.device), None)]
        num_refs, ref_hw = 0, None
        attention = dict(mask="full") if cfg.ref_attention == "prototype" else {}
        has_refs = ref_cache is not None or (ref_latents is not None and ref_latents.shape[1] > 0)
        if self.prototype is not None and has_refs:
            prototypes, attention = self._prototypes(ref_latents, ref_cache, (f, h, w), timestep, pooled_text,
                                                     frame_pose, ref_pose)
            streams.append(prototypes)
        elif ref_cache is not None:
            if ref_cache.video_fhw != (f, h, w):
                raise ValueError(f"reference cache was built for video grid {ref_cache.video_fhw}, this call has "
                                 f"{(f, h, w)}")
            num_refs, ref_hw = ref_cache.num_refs, ref_cache.ref_hw
            pos = rd_rope_positions(cfg.ref_rope, num_refs, ref_hw, (f, h, w), cfg.ref_t_stride, device=x.device)
            streams.append(_CachedStream("reference", ref_cache.keys, ref_cache.values, pos, None))
        elif ref_latents is not None and ref_latents.shape[1] > 0:
            r, ref_pos = self._embed_references(ref_latents, (f, h, w))
            num_refs, ref_hw = ref_latents.shape[1], (ref_latents.shape[3] // ph, ref_latents.shape[4] // pw)
            ref_temb = temb if cfg.ref_timestep == "shared" else batch_invariant(
                lambda t, pooled: self.time_text_embed(t, pooled)[0], torch.zeros_like(timestep), pooled_text.to(dtype))
            streams.append(_Stream("reference", r, ref_temb, ref_pos, None))
        no_rotation = torch.zeros(n_text, 3, dtype=torch.long, device=x.device)  # text tokens are not rotated
        streams.append(_Stream("text", tokens, temb, no_rotation, None))
        # text padding: diffusers masks the keys past each row's prompt (encoder_attention_mask)
        n_video = x.shape[1]
        n_before_text = n_video + (streams[1].pos.shape[0] if len(streams) > 2 else 0)
        key_lengths = n_before_text + text_mask.to(torch.int32).sum(1, dtype=torch.int32)
        sp = self.sequence_parallel
        if sp is not None:  # this rank's share of every live stream's tokens (the attention sees them all)
            for s in streams:
                if isinstance(s, _Stream):
                    s.tokens, s.x, s.pos = s.x.shape[1], sp.shard(s.x, 1), sp.shard(s.pos, 0)
        for s in streams:  # each stream's RoPE table, of the positions this rank holds
            s.rope = self._rope(s.pos, x)
        start = streams[0].x
        views = ViewAttention.for_call(self.view_omega, view_omega, cfg.view_lambda, b, num_refs, (f, h, w), ref_hw,
                                       x.device)
        hook = None if views is None else _ViewRows(views, 0 if sp is None else sp.first_token(n_video), sp)

        # 2. dual-stream blocks (triple with references), then single-stream blocks (dual with references)
        # skipped on the steps the step cache finds redundant (engine.runtime.step_cache: the first block's
        # modulated video input barely moved, so the stack's last residual on the video tokens is reused)
        real = n_video if sp is None else max(0, min(start.shape[1], n_video - sp.first_token(n_video)))
        if step_cache is None or not step_cache.skip(self._first_modulated_input(streams[0]), real):
            self._run_blocks(streams, key_lengths, view_rows=hook, attention=attention)
            if step_cache is not None:
                step_cache.computed_residual(streams[0].x - start)
        else:
            streams[0].x = start + step_cache.residual

        # 3. output head on the video tokens, unpatchify (diffusers' layout)
        x = streams[0].x
        scale, shift = batch_invariant(lambda t: self.norm_out.linear(F.silu(t)), temb).chunk(2, dim=1)
        x = adaln_layernorm(x, shift[:, None], scale[:, None], eps=EPS, backend=self._backend)
        x = self.proj_out(x)
        if sp is not None:  # every rank's tokens, padding cut
            x = sp.gather(x, n_video)
        x = x.reshape(b, f, h, w, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, -1, f * pt, h * ph, w * pw)

    def _first_modulated_input(self, video: _Stream) -> torch.Tensor:
        """TeaCache's indicator: the first dual-stream block's AdaLN-modulated video input [B, N, D]."""
        m = self._dual_modules(0, "video")
        shift, scale = batch_invariant(lambda t: m.modulation(F.silu(t)), video.temb).chunk(m.chunks, dim=1)[:2]
        return adaln_layernorm(video.x, shift[:, None], scale[:, None], eps=EPS, backend=self._backend)

    def _layer_modules(self, layer: int, stream: str) -> _StreamModules:
        """A stream's modules in layer ``layer`` of the whole stack: the dual-stream blocks, then the single ones."""
        dual = len(self.transformer_blocks)
        return self._dual_modules(layer, stream) if layer < dual else self._single_modules(layer - dual, stream)

    def _run_blocks(self, streams: list, key_lengths: torch.Tensor | None, keep=None,
                    view_rows: "_ViewRows | None" = None, attention: dict | None = None) -> None:
        """Every block in order over the streams, in place: the dual-stream blocks, then the single-stream ones.
        ``keep(layer, h, k, v, modules)``: called with each live stream's modulated input and projected K/V;
        ``attention``: the joint attention's mask arguments (default: the config's ``ref_attention``)."""
        for layer in range(len(self.transformer_blocks) + len(self.single_transformer_blocks)):
            at = None if keep is None else (lambda *a, layer=layer: keep(layer, *a))
            self._block(streams, [self._layer_modules(layer, s.name) for s in streams], key_lengths, at, view_rows,
                        attention or {})

    @torch.no_grad()
    def precompute_reference(self, ref_latents: torch.Tensor, text: torch.Tensor | None,
                             image_context: torch.Tensor | None, latent_fhw: tuple[int, int, int], *,
                             text_mask: torch.Tensor | None = None,
                             pooled_text: torch.Tensor | None = None) -> ReferenceCache:
        """Run the reference stream alone once and keep each layer's normalised K/V [B, n_ref, H, Dh] (dual-stream
        blocks, then single-stream ones). Valid when the reference stream reads neither the video nor the text
        (``isolated``) nor the step (``ref_timestep='zero'``): it still reads the prompt's pooled CLIP text through
        its timestep embedding, so the cache belongs to its rows (``pooled_text`` [B, pooled_projection_dim])."""
        cfg = self.config
        if self.prototype is not None and cfg.ref_timestep == "zero":  # PPA's features of its isolated references
            if pooled_text is None:
                raise ValueError("the MMDiT's reference cache needs pooled_text: the reference stream's timestep "
                                 "embedding reads the prompt's pooled CLIP text")
            fhw = tuple(n // p for n, p in zip(latent_fhw, cfg.patch_size))
            zero = torch.zeros(ref_latents.shape[0], device=ref_latents.device)
            keys, values = (list(t) for t in zip(*self._reference_features(ref_latents, fhw, zero, pooled_text)))
            _, ph, pw = cfg.patch_size
            return ReferenceCache(keys, values, ref_latents.shape[1],
                                  (ref_latents.shape[3] // ph, ref_latents.shape[4] // pw), fhw)
        if not cfg.caches_reference:
            raise ValueError("reference K/V caching needs ref_attention='isolated' and ref_timestep='zero', "
                             f"got ref_attention={cfg.ref_attention!r}, ref_timestep={cfg.ref_timestep!r}")
        if pooled_text is None:
            raise ValueError("the MMDiT's reference cache needs pooled_text: the reference stream's timestep "
                             "embedding reads the prompt's pooled CLIP text")
        fhw = tuple(n // p for n, p in zip(latent_fhw, cfg.patch_size))
        dtype = self.proj_out.weight.dtype
        r, pos = self._embed_references(ref_latents, fhw)
        zero = torch.zeros(r.shape[0], device=r.device, dtype=dtype)
        temb = batch_invariant(lambda t, pooled: self.time_text_embed(t, pooled)[0], zero, pooled_text.to(dtype))
        stream = _Stream("reference", r, temb, pos, self._rope(pos, r))
        kept = []  # one (K, V) per layer: the stream is alone
        self._run_blocks([stream], None, lambda layer, h, k, v, m: kept.append((m.norm_k(k), v)))
        keys, values = (list(t) for t in zip(*kept))
        _, _, _, height, width = ref_latents.shape
        _, ph, pw = cfg.patch_size
        return ReferenceCache(keys, values, ref_latents.shape[1], (height // ph, width // pw), fhw)

    def _reference_features(self, ref_latents: torch.Tensor, fhw, ref_timestep: torch.Tensor,
                            pooled_text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """PPA's reference side: the reference stream run alone (references see references only), and per layer
        its attention input projected by the *video* block's K/V weights, bias-free (Eq. 10's projection of the
        aggregate, ``PrototypeAggregator.reference_features``): [(W_k z, W_v z) [B, R*T, D]] per layer."""
        dtype = self.proj_out.weight.dtype
        r, pos = self._embed_references(ref_latents, fhw)
        temb = batch_invariant(lambda t, pooled: self.time_text_embed(t, pooled)[0], ref_timestep.to(dtype),
                               pooled_text.to(dtype))
        features = []
        self._run_blocks([_Stream("reference", r, temb, pos, self._rope(pos, r))], None,
                         lambda layer, h, k, v, m: features.append(
                             self.prototype.reference_features(h, self._layer_modules(layer, "video"))),
                         attention=dict(mask="full"))
        return features

    def _prototypes(self, ref_latents, ref_cache, fhw, timestep, pooled_text, frame_pose, ref_pose):
        """ProFashion PPA's stream for this call (the references' per-layer features computed here, or a cache's)
        and the prototype mask: video queries of frame i see every video key, frame i's prototype and the text."""
        cfg = self.config
        if ref_cache is not None:
            if ref_cache.video_fhw != fhw:
                raise ValueError(f"reference cache was built for video grid {ref_cache.video_fhw}, this call has "
                                 f"{fhw}")
            num_refs, ref_hw = ref_cache.num_refs, ref_cache.ref_hw
            features = list(zip(ref_cache.keys, ref_cache.values))
        else:
            _, ph, pw = cfg.patch_size
            num_refs, ref_hw = ref_latents.shape[1], (ref_latents.shape[3] // ph, ref_latents.shape[4] // pw)
            ref_t = torch.zeros_like(timestep) if cfg.ref_timestep == "zero" else timestep
            features = self._reference_features(ref_latents, fhw, ref_t, pooled_text)
        poses = self.prototype.encode_poses(frame_pose, ref_pose, fhw, num_refs, ref_hw)
        pos = prototype_positions(cfg.ref_rope, fhw, ref_hw, device=timestep.device)
        stream = _PrototypeStream("prototype", features, self.prototype, poses, pos, None)
        return stream, dict(mask="prototype", tokens_per_frame=fhw[1] * fhw[2], proto_tokens=ref_hw[0] * ref_hw[1])

    def _refine_text(self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """diffusers' ``HunyuanVideoTokenRefiner`` (its modules, its order of operations) with only its M = B linears
        (the timestep + pooled-text embedding, each block's gates) on fixed row blocks: the token-wise layers have
        M = B x L rows, which no batch size changes the kernel of, so they run on the batch's own rows (blocking
        the whole refiner cost 4x its time at batch 2)."""
        refiner = self.context_embedder
        weights = mask.float().unsqueeze(-1)
        pooled = ((text * weights).sum(dim=1) / weights.sum(dim=1)).to(text.dtype)  # the prompt's mean state
        temb = batch_invariant(refiner.time_text_embed, timestep, pooled)
        h = refiner.proj_in(text)
        # each token sees the prompt's tokens, a padding token its first one (diffusers' self_attn_mask)
        b, n = mask.shape
        keep = mask.bool().view(b, 1, 1, n).expand(b, 1, n, n)
        self_mask = (keep & keep.transpose(2, 3)) | (torch.arange(n, device=mask.device) == 0)
        for block in refiner.token_refiner.refiner_blocks:
            attn = block.attn(hidden_states=block.norm1(h), encoder_hidden_states=None, attention_mask=self_mask)
            gates = batch_invariant(lambda t: block.norm_out.linear(block.norm_out.nonlinearity(t)), temb)
            gate_msa, gate_mlp = (g.unsqueeze(1) for g in gates.chunk(2, dim=1))
            h = h + attn * gate_msa
            h = h + block.ff(block.norm2(h)) * gate_mlp
        return h

    def _embed_references(self, ref_latents: torch.Tensor, fhw: tuple[int, int, int]):
        """[B, R, 16, hr*ph, wr*pw] clean latents -> tokens [B, R*hr*wr, D] and their positions. On I2V a reference
        enters the video's patch embedding as a fully known frame: latent, first-frame condition = itself, mask 1
        (what diffusers sees for a reference appended as a frame)."""
        cfg = self.config
        b, num_refs, c, height, width = ref_latents.shape
        _, ph, pw = cfg.patch_size
        z = ref_latents.reshape(b * num_refs, c, 1, height, width)
        if cfg.condition_channels:
            z = torch.cat([z, z, torch.ones_like(z[:, :1])], dim=1)
        embed = self.x_embedder
        tokens = batch_invariant(embed, z.to(self.proj_out.weight.dtype))  # [B*R, hr*wr, D]
        ref_hw = (height // ph, width // pw)
        pos = rd_rope_positions(cfg.ref_rope, num_refs, ref_hw, fhw, cfg.ref_t_stride, device=ref_latents.device)
        return tokens.reshape(b, -1, tokens.shape[-1]).contiguous(), pos

    @property
    def _backend(self) -> str:
        return kernel_backend(self.config.attention_backend)

    def _block(self, streams: list, modules: list[_StreamModules], key_lengths: torch.Tensor | None,
               keep=None, view_rows: "_ViewRows | None" = None, attention: dict | None = None) -> None:
        """One block over every stream, in place: each stream's modulated input and Q/K/V (a cached stream: its
        layer's keys and values), one joint attention, then each live stream's output projection (and FFN, or MLP
        branch) with its gated residuals. ``keep(h, k, v, modules)``: called with each live stream's modulated
        input and projected K/V (a reference cache, PPA's features being built); a prototype stream's keys and
        values are aggregated here from its layer's features; ``view_rows``: MVAnimate's Eq. 2 on the video rows (video first, the
        reference stream second)."""
        backend, heads = self._backend, self.config.num_attention_heads
        mods, inputs, qkv = [], [], []
        for s, m in zip(streams, modules):
            if isinstance(s, (_CachedStream, _PrototypeStream)):
                if isinstance(s, _CachedStream):
                    k, v = s.keys[s.layer], s.values[s.layer]
                else:  # the video block's K/V modules finish the prototypes (m: the video stream's modules)
                    k, v = s.prototype.prototype_kv(s.layer, s.poses, *s.features[s.layer], m)
                qkv.append(StreamQKV(None, k, v, s.pos, None, rope=s.rope, role="reference"))
                s.layer += 1
                mods.append(None)
                inputs.append(None)
                continue
            mod = batch_invariant(lambda t: m.modulation(F.silu(t)), s.temb).chunk(m.chunks, dim=1)
            h = adaln_layernorm(s.x, mod[0][:, None], mod[1][:, None], eps=EPS, backend=backend)
            mods.append(mod)
            inputs.append(h)
            q, k, v = (proj(h).unflatten(2, (heads, -1)) for proj in (m.to_q, m.to_k, m.to_v))
            qkv.append(StreamQKV(q, k, v, s.pos, QKNorm(m.norm_q, m.norm_k), tokens=s.tokens, rope=s.rope,
                                 role=s.name))
            if keep is not None:
                keep(h, k, v, m)
        live = [(s, m, mod, h) for s, m, mod, h in zip(streams, modules, mods, inputs) if mod is not None]
        rows = list(self._attend(qkv, key_lengths=key_lengths, **(attention or {})).split(
            [s.x.shape[1] for s, *_ in live], dim=1))
        if view_rows is not None:
            rows[0] = view_rows(rows[0], streams[1], modules[0], qkv[0], modules[1], qkv[1])
        for (s, m, mod, h), out in zip(live, rows):
            out = out.flatten(2)
            if m.ff is None:  # single-stream: proj_out([attention | gelu(proj_mlp(h))]), one gate
                mlp = F.gelu(m.proj_mlp(h), approximate="tanh")
                s.x = gated_residual(s.x, m.to_out(torch.cat([out, mlp], dim=2)), mod[2][:, None], backend=backend)
            else:  # dual-stream: AdaLN-Zero's attention gate, then the modulated FFN and its gate
                _, _, gate, shift_mlp, scale_mlp, gate_mlp = mod
                x = gated_residual(s.x, m.to_out(out), gate[:, None], backend=backend)
                h = adaln_layernorm(x, shift_mlp[:, None], scale_mlp[:, None], eps=EPS, backend=backend)
                s.x = gated_residual(x, m.ff(h), gate_mlp[:, None], backend=backend)
