"""The one configuration that flows from checkpoint to kernel launch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from kernels import ATTENTION_BACKENDS, ATTENTION_PRECISIONS, MASK_MODES

from .backbones.families import WAN_KEYS, family_of, family_of_class
from .streams.positions import REF_ROPES
from .files import read_json
from .errors import CheckpointError

REF_MODES = ("dual_stream", "token_concat")
REF_TIMESTEPS = ("shared", "zero")
REF_ATTENTIONS = MASK_MODES  # the joint attention's masks (kernels.joint_attention)
REF_WEIGHTS = ("shared", "merged")  # how load_denoiser holds the reference stream (engine.adapters.reference_weights)
VIEW_ATTENTIONS = ("none", "multiview")  # MVAnimate Eq. 2: a softmax over the views at the aligned position
# the denoiser's block linears in 8 bits (engine.runtime.fp8): "fp8" runs FP8 GEMMs where the device has FP8 tensor
# cores and dequantises on the fly elsewhere; the other two force one of those paths
QUANTIZE_MODES = ("none", "fp8", "fp8_gemm", "fp8_weight_only")
@dataclass(frozen=True)
class MvgenConfig:
    """Transformer hyper-parameters (a ``family``, T2V or I2V: ``engine.backbones.families``) plus the multi-view reference
    settings.

    The first block mirrors diffusers' ``WanTransformer3DModel`` config so a diffusers checkpoint maps
    onto it key for key; the second holds what an MMDiT (``HunyuanVideoTransformer3DModel``) adds, whose other
    keys map onto the first (``from_files``); the third block is ours (from ``mvgen_config.json`` or overrides).
    """

    # Wan2.1/2.2 (diffusers names; defaults: Wan2.1-I2V-14B)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 36
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = 1280
    added_kv_proj_dim: int | None = 5120
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    rope_theta: float = 10000.0
    text_len: int = 512

    # MMDiT (HunyuanVideo; family "mmdit"): single-stream blocks after the dual-stream ones, the text token refiner,
    # the pooled CLIP text projection, RoPE bands given per axis (None: Wan's split of the head dim)
    family: str = "wan"
    num_single_layers: int = 0
    num_refiner_layers: int = 0
    mlp_ratio: float = 4.0
    guidance_embeds: bool = False
    pooled_projection_dim: int = 768
    rope_axes_dim: tuple[int, int, int] | None = None
    image_condition_type: str | None = None

    # multi-view reference stream
    ref_mode: str = "dual_stream"
    ref_rope: str = "decoupled"
    ref_t_stride: int = 1
    ref_timestep: str = "shared"
    ref_attention: str = "full"
    # False: the reference tokens skip the cross-attention (Stand-In); the reference stream then reads no prompt, so
    # one cached reference row serves every guidance row of a request (``shares_reference_rows``)
    ref_cross_attention: bool = True
    max_references: int = 3
    # per-view logit scales inside the one joint softmax (1 = plain attention); not MVAnimate's Eq. 2
    view_logit_scales: tuple[float, ...] | None = None
    view_attention: str = "none"  # "multiview": MVAnimate's Eq. 2 attention across the views (engine.modes)
    view_lambda: float = 1.0  # weight of the multi-view attention: (A_joint + lambda * A_mv) / (1 + lambda)
    pose_channels: int = 3  # ProFashion PPA (ref_attention="prototype"): channels of a rendered pose image
    identity: bool = False  # M2HVideo's distribution-aware identity adapter (engine.modes)
    # the scale of the adapter's LoRA pairs (engine.adapters.lora.ScaleRule): "alpha_over_rank" (PEFT, kohya: alpha / r) or
    # "mvi2v" (MVI2V's W + alpha * B @ A); lora_alpha, when set, is every pair's alpha (else the files' own);
    # lora_rank, when set, must be every pair's rank
    lora_convention: str = "alpha_over_rank"
    lora_alpha: float | None = None
    lora_rank: int | None = None
    # "shared": the reference stream holds the video stream's weights and applies its LoRA unmerged (about 1% more
    # parameters); "merged": its own copy of every block with the LoRA merged (about 1.9x the base's parameters)
    ref_weights: str = "shared"
    attention_backend: str = "auto"
    # the joint attention's arithmetic (kernels.ATTENTION_PRECISIONS): "bf16" (16-bit operands, the model's dtype)
    # or "int8" (INT8 QK^T with K smoothing, FP8 P.V: kernels.quantized_attention); opt-in, error in the README
    attention_precision: str = ATTENTION_PRECISIONS[0]
    # step-invariant work once per request (engine.checkpoint.Denoiser): every block's cross-attention K/V of the
    # text, CLIP image and identity states; False recomputes them at every step
    context_cache: bool = True
    # TeaCache-style step caching (engine.runtime.step_cache): skip the block stack while the accumulated relative change of
    # the first block's modulated input stays under this threshold; 0 = off
    step_cache_threshold: float = 0.0
    # a request's step-invariant inputs (text, image and identity states, condition, references, poses) reach the
    # denoiser at its first step and are kept there (engine.checkpoint.RequestState); later steps carry the
    # latents and the timestep only. False: every step carries every input (the loop's bytes before this option)
    inputs_once: bool = True
    # batch-invariant numerics (engine.runtime.batch_invariance): a request's bits do not depend on its batch companions
    deterministic: bool = False
    # block linears held as float8_e4m3fn with per-output-channel scales after the load (QUANTIZE_MODES)
    quantize: str = "none"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        family = family_of(self.family)
        _choice("ref_mode", self.ref_mode, REF_MODES)
        _choice("ref_rope", self.ref_rope, REF_ROPES)
        _choice("ref_timestep", self.ref_timestep, REF_TIMESTEPS)
        _choice("ref_attention", self.ref_attention, REF_ATTENTIONS)
        _choice("ref_weights", self.ref_weights, REF_WEIGHTS)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("attention_precision", self.attention_precision, ATTENTION_PRECISIONS)
        _choice("view_attention", self.view_attention, VIEW_ATTENTIONS)
        _choice("quantize", self.quantize, QUANTIZE_MODES)
        family.check(self)
        if (self.in_channels, self.out_channels) not in family.tasks:
            hint = " (Wan2.2-TI2V-5B takes 48 channels in and out)" if 48 in (self.in_channels, self.out_channels) else ""
            raise ValueError(
                f"unsupported {self.family} transformer: in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}{hint}; supported: {family.supported}"
            )
        if self.rope_axes_dim is not None and (sum(self.rope_axes_dim) != self.attention_head_dim
                                               or any(n <= 0 or n % 2 for n in self.rope_axes_dim)):
            raise ValueError(f"rope_axes_dim must be three even positive sizes summing to attention_head_dim="
                             f"{self.attention_head_dim}, got {self.rope_axes_dim}")
        if self.ref_t_stride < 1:
            raise ValueError(f"ref_t_stride must be >= 1, got {self.ref_t_stride}")
        if self.max_references < 0:
            raise ValueError(f"max_references must be >= 0, got {self.max_references}")
        if self.view_logit_scales is not None and len(self.view_logit_scales) != self.max_references:
            raise ValueError(
                f"view_logit_scales has {len(self.view_logit_scales)} entries, expected max_references={self.max_references}"
            )
        if self.view_attention == "multiview" and self.ref_attention == "prototype":
            raise ValueError("view_attention='multiview' (MVAnimate) reads each view's keys at the aligned position; "
                             "ref_attention='prototype' (ProFashion) replaces the views by per-frame prototypes: "
                             "choose one")
        if not self.step_cache_threshold >= 0:
            raise ValueError(f"step_cache_threshold must be >= 0 (0 = off), got {self.step_cache_threshold}")
        if self.view_lambda < 0:
            raise ValueError(f"view_lambda must be >= 0, got {self.view_lambda}")
        if not self.ref_cross_attention and not family_of(self.family).context_cache:
            raise ValueError(f"ref_cross_attention=False skips the reference tokens' cross-attention; a {self.family} "
                             "denoiser has none (its text is a stream of the joint attention)")
        if self.identity and self.image_dim is None:
            raise ValueError("identity (M2HVideo) encodes the identity image with the checkpoint's CLIP image "
                             "encoder; this checkpoint has none (image_dim is None)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def task(self) -> str:
        """``"t2v"`` (no first frame: text- or reference-to-video), ``"i2v"`` (a first frame is required) or ``"ti2v"``
        (Wan2.2-TI2V-5B: a first frame is optional and replaces the noisy latents where it is known)."""
        return family_of(self.family).tasks[(self.in_channels, self.out_channels)]

    @property
    def condition_channels(self) -> int:
        """Channels of the first-frame condition beside the latents: 0 on T2V; on I2V 20 on Wan (4 mask + 16),
        17 on an MMDiT (16 + 1 mask); on TI2V 1 + 48 (a known mask, then the first frame's latent), which replace
        the latents rather than join them."""
        return family_of(self.family).condition_channels(self.in_channels, self.out_channels)

    @property
    def condition_optional(self) -> bool:
        """Whether the denoiser runs with and without a condition (TI2V: text- and image-to-video alike)."""
        return self.task == "ti2v"

    @property
    def caches_reference(self) -> bool:
        """The reference stream is independent of the video and of the step: compute its K/V once."""
        return (family_of(self.family).reference_cache and self.ref_attention in ("isolated", "prototype")
                and self.ref_timestep == "zero")

    @property
    def shares_reference_rows(self) -> bool:
        """The cached reference stream reads neither the video, the step nor the prompt: one row, computed once per
        request, serves every row of a call (the guidance rows differ only in their prompt)."""
        return self.caches_reference and not self.ref_cross_attention

    @property
    def caches_context(self) -> bool:
        """Every block's cross-attention K/V of the request's text/image/identity states is computed once per
        request (``context_cache``; an MMDiT has no cross-attention: its text is a stream of every step)."""
        return self.context_cache and family_of(self.family).context_cache

    @property
    def caches_requests(self) -> bool:
        """The denoiser keeps something of a request between its steps: its step-invariant inputs
        (``inputs_once``), reference K/V, context K/V or a step cache."""
        return self.inputs_once or self.caches_reference or self.caches_context or self.step_cache_threshold > 0

    def replace(self, **changes) -> "MvgenConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> "MvgenConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        merged = {**values, **overrides}
        kwargs = {k: v for k, v in merged.items() if k in known}
        problems = _type_problems(kwargs)
        if problems:
            raise ValueError(problems[0])
        for key in ("patch_size", "view_logit_scales", "rope_axes_dim"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        unknown_overrides = set(overrides) - known
        if unknown_overrides:
            raise ValueError(f"unknown config override(s): {sorted(unknown_overrides)}; known: {sorted(known)}")
        return cls(**kwargs, extra={k: v for k, v in merged.items() if k not in known and not k.startswith("_")})

    @classmethod
    def from_files(cls, transformer_config: Path, mvgen_config: Path | None = None, **overrides) -> "MvgenConfig":
        """Raises ``CheckpointError`` naming the file when either JSON file is unreadable or not an object."""
        base = read_json(transformer_config, CheckpointError, "config")
        values = family_of_class(base.get("_class_name")).config_values(base)
        problems = _type_problems(values)
        if problems:
            raise CheckpointError(f"{transformer_config}: {problems[0]}")
        if mvgen_config is not None and Path(mvgen_config).is_file():
            found = read_json(mvgen_config, CheckpointError, "config")
            problems = _type_problems(found)
            if problems:
                raise CheckpointError(f"{mvgen_config}: {problems[0]}")
            values.update(found)
        return cls.from_dict(values, **overrides)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    def wan_dict(self) -> dict:
        """The diffusers ``WanTransformer3DModel`` constructor arguments of this config."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.to_dict().items() if k in WAN_KEYS}

    def mmdit_dict(self) -> dict:
        """The diffusers ``HunyuanVideoTransformer3DModel`` constructor arguments of this (MMDiT) config."""
        pt, p, _ = self.patch_size
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
                    num_layers=self.num_layers, num_single_layers=self.num_single_layers,
                    num_refiner_layers=self.num_refiner_layers, mlp_ratio=self.mlp_ratio, patch_size=p,
                    patch_size_t=pt, qk_norm=self.qk_norm, guidance_embeds=self.guidance_embeds,
                    text_embed_dim=self.text_dim, pooled_projection_dim=self.pooled_projection_dim,
                    rope_theta=self.rope_theta, rope_axes_dim=list(self.rope_axes_dim),
                    image_condition_type=self.image_condition_type)


def _type_problems(values: dict) -> list[str]:
    """A line for each value (read from JSON) of the wrong type for its field, so ``__post_init__`` and the
    model never see ``"two"`` layers."""
    annotations = {f.name: f.type for f in dataclasses.fields(MvgenConfig)}
    return [f"{name} must be {annotations[name]}, got {value!r}" for name, value in values.items()
            if name in annotations and name != "extra"
            and not any(_fits(value, kind) for kind in annotations[name].split(" | "))]


def _fits(value, kind: str) -> bool:
    """Whether a JSON value fits one alternative of a field annotation (``int``, ``tuple[float, ...]``, ...)."""
    if kind.startswith("tuple["):
        items = [item.strip() for item in kind[len("tuple["):-1].split(",")]
        if not isinstance(value, (list, tuple)):
            return False
        if items[-1] == "...":
            return all(_fits(v, items[0]) for v in value)
        return len(value) == len(items) and all(_fits(v, item) for v, item in zip(value, items))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"None": value is None, "bool": isinstance(value, bool), "str": isinstance(value, str),
            "int": number and isinstance(value, int), "float": number}[kind]


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# the third block of MvgenConfig (ours, not the checkpoint's): the multi-view options and run settings, the fields a
# mode that adds tensors to the model is among (engine.backbones.assembly names it when an adapter lacks them)
_NAMES = [f.name for f in dataclasses.fields(MvgenConfig)]
MULTIVIEW_FIELDS = tuple(_NAMES[_NAMES.index("ref_mode"):_NAMES.index("extra")])
