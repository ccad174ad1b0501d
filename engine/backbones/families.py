"""What each backbone family is, declared once: the diffusers class its checkpoints name, the tasks its channel
layouts mean, how its config.json maps onto ``MvgenConfig``, its VAE's latent layout, text-encoder outputs,
generation defaults, scheduler and what it implements. Data and small pure functions only (the config reads it);
the code of each family (model, loader, encoders) joins it in ``engine.backbones.registry``.

Nothing else in the engine compares family names: it asks the family's description (``family_of(config)``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

MMDIT_TEXT_LEN = 256  # HunyuanVideo's max_sequence_length: the Llama states after the prompt template is cropped


@dataclass(frozen=True)
class Family:
    name: str
    diffusers_class: str  # the ``_class_name`` of its transformer config.json
    tasks: dict  # (in_channels, out_channels) -> "t2v" | "i2v"
    supported: str  # the words of a refusal: which checkpoints of this family are served
    config_values: Callable[[dict], dict]  # its transformer config.json -> MvgenConfig fields
    check: Callable  # config -> None, or ValueError naming what this family does not implement
    vae_layout: Callable[[dict], dict]  # its VAE config.json -> temporal, spatial, channels, mean, std
    defaults: dict  # generation defaults of its diffusers pipeline
    text_outputs: tuple[str, ...]  # what its text encoder returns for N prompts, each a denoiser input [N, ...]
    condition_doc: str
    text_doc: str
    # the scheduler its pipelines use whatever the request asks (None: the request's), and whether the request's
    # steps become explicit sigmas 1 .. 1/steps (HunyuanVideo's pipelines) or are left to the scheduler (Wan's)
    scheduler: str | None = None
    explicit_sigmas: bool = False
    # HunyuanVideo-I2V's prepare_latents: the initial noise mixed with the first frame's latent (noise weight; None:
    # the noise alone)
    i2v_noise_weight: float | None = None
    # what it implements beyond the base model
    reference_cache: bool = False  # the isolated reference stream's K/V computed once per request
    context_cache: bool = False  # cross-attention K/V of the text/image states once per request
    parallel: bool = False  # sequence/CFG parallel
    plugin_attention: bool = False  # the ONNX attention plugin node (no text stream, no key lengths)
    extra: dict = field(default_factory=dict)

    def condition_channels(self, in_channels: int, out_channels: int) -> int:
        """Channels of the first-frame condition of a transformer of this family: ``in - out`` beside the latents
        (I2V: Wan's 4 mask + 16, the MMDiT's 16 + 1 mask; T2V: 0), or on TI2V 1 + out (a known mask, then the
        first frame's latent), which replace the latents rather than join them."""
        if self.tasks[(in_channels, out_channels)] == "ti2v":
            return out_channels + 1
        return in_channels - out_channels


# keys of a diffusers WanTransformer3DModel config.json that this engine reads
WAN_KEYS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
    "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len",
)
# keys of a diffusers HunyuanVideoTransformer3DModel config.json, and how they map onto this config
MMDIT_KEYS = (
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers", "num_single_layers",
    "num_refiner_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm", "guidance_embeds", "text_embed_dim",
    "pooled_projection_dim", "rope_theta", "rope_axes_dim", "image_condition_type",
)


def _wan_values(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in WAN_KEYS}


def _mmdit_values(config: dict) -> dict:
    """A ``HunyuanVideoTransformer3DModel`` config.json as this config's fields (diffusers' defaults for absent
    keys): the patch becomes (t, h, w), ``text_embed_dim`` the text width, the FFN width ``mlp_ratio`` x dim."""
    from diffusers import HunyuanVideoTransformer3DModel

    defaults = {name: p.default for name, p in inspect.signature(HunyuanVideoTransformer3DModel).parameters.items()
                if p.default is not inspect.Parameter.empty}
    values = {**defaults, **{k: v for k, v in config.items() if k in MMDIT_KEYS}}
    problems = [f"{k} must be a number, got {values[k]!r}" for k in ("patch_size", "patch_size_t", "mlp_ratio",
                                                                     "num_attention_heads", "attention_head_dim")
                if isinstance(values[k], bool) or not isinstance(values[k], (int, float))]
    if problems:
        return {"patch_size": values["patch_size"]}  # the config's type check names it
    p, pt = values.pop("patch_size"), values.pop("patch_size_t")
    inner = values["num_attention_heads"] * values["attention_head_dim"]
    return {**{k: v for k, v in values.items() if k != "text_embed_dim"}, "family": "mmdit",
            "patch_size": [pt, p, p], "text_dim": values["text_embed_dim"], "ffn_dim": int(inner * values["mlp_ratio"]),
            "image_dim": None, "added_kv_proj_dim": None, "eps": 1e-6, "cross_attn_norm": False,
            "text_len": MMDIT_TEXT_LEN, "rope_axes_dim": list(values["rope_axes_dim"])}


def _check_wan(config) -> None:
    if config.qk_norm != "rms_norm_across_heads":
        raise ValueError(f"qk_norm must be 'rms_norm_across_heads' (Wan2.1), got {config.qk_norm!r}")


def _check_mmdit(config) -> None:
    """What the MMDiT denoiser (``engine.backbones.mmdit.model``) implements; everything else is refused by name."""
    if config.qk_norm != "rms_norm":
        raise ValueError(f"an MMDiT (HunyuanVideo) takes qk_norm 'rms_norm', got {config.qk_norm!r}")
    if config.image_condition_type not in (None, "latent_concat"):
        raise ValueError(f"image_condition_type {config.image_condition_type!r} is not served (HunyuanVideo-I2V's "
                         "'token_replace' variant); supported: None (T2V), 'latent_concat'")
    if config.guidance_embeds:
        raise ValueError("guidance-distilled MMDiT checkpoints (guidance_embeds=true) are not served: the loop "
                         "guides with classifier-free guidance (HunyuanVideo-I2V's true CFG)")
    unsupported = [(name, value) for name, value, plain in (
        ("ref_attention", config.ref_attention, config.ref_attention in ("full", "isolated")),
        # M2HVideo's identity adapter is a second image cross-attention beside Wan's: the MMDiT has no
        # cross-attention (its text is a stream of the joint attention), so Eq. 4's fusion has nothing to fuse with
        ("identity", config.identity, not config.identity),
        ("view_logit_scales", config.view_logit_scales, config.view_logit_scales is None)) if not plain]
    if unsupported:
        name, value = unsupported[0]
        raise ValueError(f"{name}={value!r} is not implemented on the MMDiT backbone (ref_attention 'full' or "
                         "'isolated'; of the seed methods' modes, MVAnimate's view_attention='multiview')")


def _wan_vae(vae: dict) -> dict:
    """``AutoencoderKLWan``: its compression, latent channels and per-channel statistics."""
    channels = vae.get("z_dim", 16)
    return {"temporal": vae.get("scale_factor_temporal") or 4, "spatial": vae.get("scale_factor_spatial") or 8,
            "channels": channels, "mean": vae.get("latents_mean", (0.0,) * channels),
            "std": vae.get("latents_std", (1.0,) * channels)}


def _mmdit_vae(vae: dict) -> dict:
    """``AutoencoderKLHunyuanVideo``: one ``scaling_factor``, as mean 0 and std 1 / scaling_factor (``latent *
    scaling_factor``, as its pipelines scale)."""
    channels, scale = vae.get("latent_channels", 16), vae.get("scaling_factor", 0.476986)
    return {"temporal": vae.get("temporal_compression_ratio") or 4,
            "spatial": vae.get("spatial_compression_ratio") or 8, "channels": channels,
            "mean": (0.0,) * channels, "std": (1.0 / scale,) * channels}


# a single-stream DiT (text through cross-attention; MVI2V makes it dual-stream): Wan2.1-T2V/I2V, Wan2.2-I2V-A14B
WAN = Family(
    name="wan", diffusers_class="WanTransformer3DModel",
    # T2V takes the noisy latents alone; I2V 16 latent + 4 mask + 16 first-frame channels; Wan2.2-TI2V-5B the 48
    # channels of its VAE, a first frame (optional) replacing the noisy latents where it is known
    tasks={(16, 16): "t2v", (36, 16): "i2v", (48, 48): "ti2v"},
    supported="Wan2.1-T2V (in_channels 16), Wan2.1-I2V and Wan2.2-I2V-A14B (in_channels 36), each with "
              "out_channels 16; Wan2.2-TI2V-5B (in and out channels 48)",
    config_values=_wan_values, check=_check_wan, vae_layout=_wan_vae,
    # diffusers' WanImageToVideoPipeline defaults (480p checkpoint); a checkpoint may ship mvgen_defaults.json
    defaults={"num_frames": 81, "height": 480, "width": 832, "steps": 50, "guidance_scale": 5.0, "shift": 3.0},
    text_outputs=("text",), condition_doc="4 mask + 16 first-frame channels",
    text_doc="umT5 states padded to 512 tokens",
    reference_cache=True, context_cache=True, parallel=True, plugin_attention=True,
)
# a dual-stream MMDiT with single-stream blocks after (HunyuanVideo; MVI2V makes its dual-stream blocks triple-stream)
MMDIT = Family(
    name="mmdit", diffusers_class="HunyuanVideoTransformer3DModel",
    # HunyuanVideo-I2V's "latent_concat": 16 latent + 16 first-frame + 1 mask channels
    tasks={(16, 16): "t2v", (33, 16): "i2v"},
    supported="HunyuanVideo (in_channels 16) and HunyuanVideo-I2V with image_condition_type 'latent_concat' "
              "(in_channels 33), each with out_channels 16",
    config_values=_mmdit_values, check=_check_mmdit, vae_layout=_mmdit_vae,
    # diffusers' HunyuanVideoImageToVideoPipeline defaults (720p; true_cfg_scale 1: no guidance), its scheduler's shift
    defaults={"num_frames": 129, "height": 720, "width": 1280, "steps": 50, "guidance_scale": 1.0, "shift": 7.0},
    text_outputs=("text", "text_mask", "pooled_text"), condition_doc="16 first-frame + 1 mask channels",
    text_doc="Llama states after the prompt template, 256 tokens",
    scheduler="euler", explicit_sigmas=True, i2v_noise_weight=0.999, reference_cache=True, parallel=True,
)
FAMILIES = {family.name: family for family in (WAN, MMDIT)}
# every text-encoder output any family's denoiser takes
ALL_TEXT_OUTPUTS = tuple(dict.fromkeys(name for f in FAMILIES.values() for name in f.text_outputs))


def family_of(config) -> Family:
    """The description of a config's family (an ``MvgenConfig``, its ``to_dict()``, or a family name)."""
    name = config if isinstance(config, str) else config.get("family", "wan") if isinstance(config, dict) \
        else config.family
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def family_of_class(class_name: str | None) -> Family:
    """The family whose checkpoints name this transformer class (Wan when the config names none)."""
    return next((f for f in FAMILIES.values() if f.diffusers_class == class_name), WAN)
