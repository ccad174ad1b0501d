"""The embedded ``tiny`` checkpoints: complete diffusers-layout Wan and HunyuanVideo pipelines plus reference adapters.

``tiny`` is Wan2.1-I2V (CLIP image encoder, first frame required), ``tiny-t2v`` Wan2.1-T2V (no first frame:
Mv2ID's reference-to-video), ``tiny-wan22`` Wan2.2-I2V-A14B's layout (two experts ``transformer`` and
``transformer_2`` switched at ``boundary_ratio`` 0.9, no CLIP, an adapter per expert), ``tiny-mmdit``
HunyuanVideo-I2V's layout (``latent_concat``: the MMDiT backbone, Llama + CLIP text encoders, its causal VAE),
``tiny-wan22-t2v`` Wan2.2-T2V-A14B's (``WanPipeline`` with ``transformer_2``, 16 input channels, boundary_ratio
0.875), ``tiny-standin`` Wan2.1-T2V with Stand-In's identity LoRA as its adapter (drawn in Stand-In's own key
layout and rank 128, then converted by ``engine.adapters.stand_in``).
``tiny-phantom`` Phantom-Wan's (Wan2.1-T2V's components, the fine-tuned transformer as original-name shards with an
index, Token-Concat references with shared positions, the three-row guidance and letterboxed references by default).
Every component is the real class (diffusers ``WanTransformer3DModel`` / ``AutoencoderKLWan`` /
``UniPCMultistepScheduler``, ``HunyuanVideoTransformer3DModel`` / ``AutoencoderKLHunyuanVideo`` /
``FlowMatchEulerDiscreteScheduler``, transformers umT5 / Llama / CLIP text and vision / ByT5 tokenizer) at small
sizes, initialised from fixed seeds, so it exercises every code path of loading and generation with no download.
Its videos are noise. The build is bit-identical across runs and is written atomically (temp dir + rename).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .backbones.families import family_of

TINY_VERSION = "tiny-v2"  # the directory of ``tiny``; the others are ``<name>-v2`` (``tiny-mmdit-v1``)
CACHE_ENV = "MVGEN_CACHE"  # where the tiny checkpoint is built (read by entry points only)
SEED = 20261122

# diffusers WanTransformer3DModel arguments (Wan2.1-I2V layout, 2 heads x 24 = 48 wide, 2 layers)
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=36, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=32, added_kv_proj_dim=48, rope_max_seq_len=1024,
)
VAE_CONFIG = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
)
TEXT_ENCODER_CONFIG = dict(
    vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
IMAGE_ENCODER_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=224, patch_size=14, projection_dim=32,
)
# Wan2.1-I2V-480P's scheduler: UniPC over flow-matching sigmas
SCHEDULER_CONFIG = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
ADAPTER_CONFIG = {
    "ref_mode": "dual_stream", "ref_rope": "decoupled", "max_references": 3, "lora_rank": 4, "lora_alpha": 4,
}
ADAPTER_MODULES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)
# generation defaults a CLI run of the tiny model uses (seconds on 2 CPU cores)
GENERATION_DEFAULTS = {"num_frames": 9, "height": 64, "width": 64, "steps": 4, "guidance_scale": 5.0, "shift": 3.0}
MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "ByT5Tokenizer"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
_NO_CLIP = dict(image_dim=None, added_kv_proj_dim=None)
_NO_IMAGE_ENCODER = {"image_encoder": [None, None], "image_processor": [None, None]}
# Wan2.2's VAE (AutoencoderKLWan with is_residual, 12 = 3 x 2 x 2 patched pixel channels, 48 latent channels)
_TI2V_VAE = dict(base_dim=16, decoder_base_dim=16, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
                 latents_std=[1.0] * 48)


# HunyuanVideo-I2V ("latent_concat": 16 noisy + 16 first-frame + 1 mask channels), 2 heads x 24 = 48 wide, two
# dual-stream and two single-stream blocks; RoPE bands per axis (t, h, w) sum to the head dim
MMDIT_TRANSFORMER_CONFIG = dict(
    in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=24, num_layers=2, num_single_layers=2,
    num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=False,
    text_embed_dim=32, pooled_projection_dim=32, rope_theta=256.0, rope_axes_dim=(8, 8, 8),
    image_condition_type="latent_concat",
)
# HunyuanVideo's causal VAE at its real compression (space /8, time /4) and scaling factor, 8 channels wide
MMDIT_VAE_CONFIG = dict(
    latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
    scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
)
# the Llama whose third-to-last hidden states are the text tokens (hidden_size = text_embed_dim); enough positions
# for the prompt template plus 256 tokens in ByT5's bytes
LLAMA_CONFIG = dict(
    vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048,
)
# CLIP text, whose pooled output (hidden_size = pooled_projection_dim) is taken at ByT5's eos token (id 1)
CLIP_TEXT_CONFIG = dict(
    vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
)
MMDIT_SCHEDULER_CONFIG = dict(shift=7.0)  # HunyuanVideo's FlowMatchEulerDiscreteScheduler
MMDIT_ADAPTER_MODULES = {  # the reference stream's LoRA targets: dual-stream blocks, then single-stream blocks
    "ref_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"),
    "ref_single_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"),
}
# HunyuanVideoPipeline's components (Llama text encoder, no image processor), so that diffusers loads the directory
# whole; HunyuanVideoImageToVideoPipeline's text encoder is a Llava reading the image too, which mvgen does not serve
MMDIT_MODEL_INDEX = {
    "_class_name": "HunyuanVideoPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "LlamaModel"],
    "text_encoder_2": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "ByT5Tokenizer"],
    "tokenizer_2": ["transformers", "ByT5Tokenizer"],
    "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
}


@dataclass(frozen=True)
class Variant:
    """One embedded model: how its transformer(s) and model index differ from ``tiny``'s."""

    directory: str
    transformer: dict  # changes to TRANSFORMER_CONFIG
    model_index: dict  # changes to MODEL_INDEX
    image_encoder: bool = True
    experts: int = 1
    defaults: dict = field(default_factory=dict)  # changes to GENERATION_DEFAULTS
    family: str = "wan"  # engine.backbones.families: which writer (``_WRITERS``) builds it
    vae: dict = field(default_factory=dict)  # changes to VAE_CONFIG
    adapter: str = "mvi2v"  # its bundled adapter: "mvi2v" (a random LoRA and the seed methods') or "stand_in"
    adapters: bool = True  # the reference-stream adapters (a full fine-tune such as Phantom-Wan has none)
    mvgen_config: dict = field(default_factory=dict)  # the root mvgen_config.json of a checkpoint without adapter
    # a fine-tuned transformer in the original Wan key names as this many shards with an index (ORIGINAL_FOLDER),
    # loaded in place of transformer/'s base weights as ``--transformer`` would load it
    original_shards: int = 0


VARIANTS = {
    "tiny": Variant(TINY_VERSION, {}, {}),
    "tiny-t2v": Variant("tiny-t2v-v2", {"in_channels": 16, **_NO_CLIP},
                        {"_class_name": "WanPipeline", **_NO_IMAGE_ENCODER}, image_encoder=False),
    # Wan2.2-I2V-A14B: I2V without CLIP, two experts; 6 steps put the switch after the second (t 937 -> 857)
    "tiny-wan22": Variant("tiny-wan22-v2", dict(_NO_CLIP),
                          {**_NO_IMAGE_ENCODER, "transformer_2": ["diffusers", "WanTransformer3DModel"],
                           "boundary_ratio": 0.9, "expand_timesteps": False},
                          image_encoder=False, experts=2, defaults={"steps": 6}),
    # HunyuanVideo-I2V (latent_concat) with true classifier-free guidance and HunyuanVideo's shift
    # Wan2.2-TI2V-5B: 48 latent channels in and out (its VAE compresses 16x in space, 4x in time: a residual
    # AutoencoderKLWan over 2x2-patched pixels), text- or image-to-video from one checkpoint, per-token timesteps
    "tiny-ti2v": Variant("tiny-ti2v-v1", {"in_channels": 48, "out_channels": 48, **_NO_CLIP},
                         {"_class_name": "WanPipeline", **_NO_IMAGE_ENCODER, "expand_timesteps": True},
                         image_encoder=False, vae=_TI2V_VAE),
    "tiny-mmdit": Variant("tiny-mmdit-v1", {}, {}, image_encoder=False, defaults={"shift": 7.0}, family="mmdit"),
    # Wan2.2-T2V-A14B: text(/reference)-to-video with two experts switched at its boundary_ratio 0.875; 6 steps put
    # the switch after the second (t 937 -> 857)
    "tiny-wan22-t2v": Variant("tiny-wan22-t2v-v1", {"in_channels": 16, **_NO_CLIP},
                              {"_class_name": "WanPipeline", **_NO_IMAGE_ENCODER,
                               "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875,
                               "expand_timesteps": False},
                              image_encoder=False, experts=2, defaults={"steps": 6}),
    # Stand-In on Wan2.1-T2V: one face reference, its sampler's shift 5 (engine.adapters.stand_in)
    "tiny-standin": Variant("tiny-standin-v1", {"in_channels": 16, **_NO_CLIP},
                            {"_class_name": "WanPipeline", **_NO_IMAGE_ENCODER}, image_encoder=False,
                            defaults={"shift": 5.0}, adapter="stand_in"),
    # Phantom-Wan (subject-to-video on Wan2.1-T2V): a full fine-tune in the original Wan names, sharded with an index
    # as Phantom-Wan-14B ships; references letterboxed on white and appended as latent frames after the video
    # (token_concat, shared positions t = F..F+R-1), its three-row guidance and the authors' scales and shift
    "tiny-phantom": Variant("tiny-phantom-v1", {"in_channels": 16, **_NO_CLIP},
                            {"_class_name": "WanPipeline", **_NO_IMAGE_ENCODER}, image_encoder=False, adapters=False,
                            mvgen_config={"ref_mode": "token_concat", "ref_rope": "shared", "max_references": 4},
                            original_shards=3,
                            defaults={"guidance": "phantom", "guidance_scale": 7.5, "guidance_scale_image": 5.0,
                                      "reference_fit": "letterbox", "shift": 5.0}),
}
ORIGINAL_FOLDER = "original"  # where a variant's original-name transformer shards and their index live
ORIGINAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_COMPLETE_MARKER = "model_index.json"
# an adapter per seed method beside ``adapter/`` (its LoRA plus the mode's tensors): ``adapter_<name>/``; "all"
# holds the two that combine (MVAnimate's view attention reads the views that PPA replaces by prototypes)
_PROTOTYPE = {"ref_attention": "prototype"}  # ProFashion PPA
_MULTIVIEW = {"view_attention": "multiview", "view_lambda": 0.5}  # MVAnimate Eq. 2
_IDENTITY = {"identity": True}  # M2HVideo (needs CLIP: I2V with an image encoder)
MODE_ADAPTERS = {"prototype": _PROTOTYPE, "multiview": _MULTIVIEW, "identity": _IDENTITY,
                 "all": {**_PROTOTYPE, **_IDENTITY}}


def default_cache_root(environ: Mapping[str, str]) -> Path:
    """``$MVGEN_CACHE`` when set in ``environ``, else ``~/.cache/mvgen``.

    The environment is passed in: only process entry points (the ``mvgen`` command, a served model's
    ``initialize``) read ``os.environ``, and hand the root down from there.
    """
    return Path(environ.get(CACHE_ENV) or Path.home() / ".cache" / "mvgen")


def is_tiny(model) -> bool:
    return str(model) in VARIANTS


def ensure_tiny(root: Path | str, name: str = "tiny") -> Path:
    """The embedded model ``name``'s pipeline directory under ``root`` (``<root>/tiny-v2`` for ``tiny``), built once."""
    if root is None:  # a caller that forgot to thread the root down: say so rather than guess one
        raise ValueError("the tiny model needs a cache directory to be built in: pass cache_root "
                         f"(the mvgen command takes it from --cache-dir or ${CACHE_ENV})")
    return build_tiny(Path(root) / VARIANTS[name].directory, name)


def resolve_checkpoint(model: str | Path, adapter: str | Path | None, cache_root: Path | str
                       ) -> tuple[Path, Path | None]:
    """``"tiny"`` (or another embedded model) -> its pipeline under ``cache_root`` (built once) with its bundled
    adapter unless ``adapter`` is given; any other ``model`` is a checkpoint directory, returned as is."""
    path, (adapter,) = resolve_experts(model, (adapter,), cache_root)
    return path, adapter


def resolve_experts(model: str | Path, adapters: tuple, cache_root: Path | str) -> tuple[Path, tuple]:
    """``resolve_checkpoint`` for a checkpoint's experts: one adapter per expert (None: an embedded model's own
    ``adapter``, ``adapter_2``; nothing for a checkpoint directory)."""
    if is_tiny(model):
        path = ensure_tiny(cache_root, str(model))
        bundled = (path / "adapter", path / "adapter_2")
        return path, tuple(Path(a) if a is not None else bundled[i] if (bundled[i]).is_dir() else None
                           for i, a in enumerate(adapters))
    return Path(model), tuple(Path(a) if a is not None else None for a in adapters)


def bundled_transformer(model: str | Path, path: Path) -> Path | None:
    """The original-name transformer shards an embedded model loads in place of ``transformer/``'s weights
    (``tiny-phantom``'s index), else None."""
    if not is_tiny(model) or not VARIANTS[str(model)].original_shards:
        return None
    return path / ORIGINAL_FOLDER / ORIGINAL_INDEX


def build_tiny(dest: Path | str, name: str = "tiny") -> Path:
    """Build the embedded model ``name`` into ``dest`` unless it is already there; returns ``dest``."""
    dest = Path(dest)
    if (dest / _COMPLETE_MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        from .files import quiet_hub_progress

        variant = VARIANTS[name]
        writer = _WRITERS[family_of(variant.family).name]
        with torch.random.fork_rng(devices=[]), quiet_hub_progress():
            writer(staging, variant)
        try:
            os.rename(staging, dest)
        except OSError:
            if not (dest / _COMPLETE_MARKER).is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _seeded(offset: int) -> None:
    torch.manual_seed(SEED + offset)


def _write_pipeline(out: Path, variant: Variant) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import ByT5Tokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    config = {**TRANSFORMER_CONFIG, **variant.transformer}
    _seeded(0)
    transformer = WanTransformer3DModel(**config)
    # small shards so that loading goes through the safetensors index, as real checkpoints do
    transformer.save_pretrained(out / "transformer", safe_serialization=True, max_shard_size="200KB")
    _seeded(1)
    AutoencoderKLWan(**{**VAE_CONFIG, **variant.vae}).save_pretrained(out / "vae", safe_serialization=True)
    _seeded(2)
    UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG)).save_pretrained(out / "text_encoder")
    ByT5Tokenizer().save_pretrained(out / "tokenizer")
    if variant.image_encoder:
        _seeded(3)
        CLIPVisionModel(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).save_pretrained(out / "image_encoder")
        _clip_image_processor().save_pretrained(out / "image_processor")
    UniPCMultistepScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    if variant.adapter == "stand_in":
        write_stand_in_adapter(out / "adapter", config, SEED + 4)
    elif variant.adapters:
        _write_adapter(out / "adapter", config, SEED + 4)
        for offset, (name, mode) in enumerate(MODE_ADAPTERS.items()):
            if variant.image_encoder or not mode.get("identity"):
                _write_adapter(out / f"adapter_{name}", config, SEED + 4, mode, mode_seed=SEED + 10 + offset)
    if variant.mvgen_config:
        (out / "mvgen_config.json").write_text(json.dumps(variant.mvgen_config, indent=2) + "\n")
    if variant.original_shards:
        _seeded(7)  # the fine-tune: other weights than transformer/'s base
        write_original_shards(out / ORIGINAL_FOLDER, WanTransformer3DModel(**config).state_dict(),
                              variant.original_shards)
    if variant.experts == 2:  # the low-noise expert: other weights, its own reference adapter
        _seeded(5)
        WanTransformer3DModel(**config).save_pretrained(out / "transformer_2", safe_serialization=True,
                                                       max_shard_size="200KB")
        _write_adapter(out / "adapter_2", config, SEED + 6)
    defaults = {**GENERATION_DEFAULTS, **variant.defaults}
    (out / "mvgen_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (out / _COMPLETE_MARKER).write_text(json.dumps({**MODEL_INDEX, **variant.model_index}, indent=2) + "\n")


def write_original_shards(folder: Path, diffusers_state: dict, shards: int, stem: str = "diffusion_pytorch_model"
                          ) -> Path:
    """A Wan transformer's state in the original Wan names as ``shards`` safetensors files
    (``<stem>-0000i-of-0000n.safetensors``, keys dealt out in sorted order) and their ``<stem>.safetensors.index.json``
    (Wan2.1-14B's layout); returns the index."""
    from safetensors.torch import save_file

    from .backbones.wan.original_names import to_original_wan

    folder.mkdir(parents=True)
    state = to_original_wan(diffusers_state)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        save_file({k: state[k].contiguous() for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = folder / f"{stem}.safetensors.index.json"
    size = sum(t.numel() * t.element_size() for t in state.values())
    index.write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2) + "\n")
    return index


def _write_mmdit_pipeline(out: Path, variant: Variant) -> None:
    """HunyuanVideo-I2V's diffusers layout: transformer, VAE, Llama + CLIP text encoders with their tokenizers,
    the Euler scheduler, and the reference stream's adapter."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    config = {**MMDIT_TRANSFORMER_CONFIG, **variant.transformer}
    _seeded(0)
    HunyuanVideoTransformer3DModel(**config).save_pretrained(out / "transformer", safe_serialization=True,
                                                             max_shard_size="200KB")
    _seeded(1)
    AutoencoderKLHunyuanVideo(**MMDIT_VAE_CONFIG).save_pretrained(out / "vae", safe_serialization=True)
    _seeded(2)
    LlamaModel(LlamaConfig(**LLAMA_CONFIG)).save_pretrained(out / "text_encoder")
    _seeded(3)
    CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_CONFIG)).save_pretrained(out / "text_encoder_2")
    for folder in ("tokenizer", "tokenizer_2"):
        ByT5Tokenizer().save_pretrained(out / folder)
    FlowMatchEulerDiscreteScheduler(**MMDIT_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    _write_mmdit_adapter(out / "adapter", config, SEED + 4)
    defaults = {**GENERATION_DEFAULTS, **variant.defaults}
    (out / "mvgen_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (out / _COMPLETE_MARKER).write_text(json.dumps({**MMDIT_MODEL_INDEX, **variant.model_index}, indent=2) + "\n")


def _write_mmdit_adapter(folder: Path, config: dict, seed: int) -> None:
    """A random rank-4 LoRA on the MMDiT's reference stream (``ref_blocks``, ``ref_single_blocks``: the
    dual- and single-stream blocks' reference copies, engine.backbones.mmdit.model) in PEFT names, with its ``mvgen_config.json``."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = int(dim * config["mlp_ratio"])
    shapes = {"ff.net.0.proj": (ffn, dim), "ff.net.2": (dim, ffn), "proj_mlp": (ffn, dim), "proj_out": (dim, dim + ffn)}
    layers = {"ref_blocks": config["num_layers"], "ref_single_blocks": config["num_single_layers"]}
    targets = [(f"transformer.{stack}.{block}.{module}", shapes.get(module, (dim, dim)))
               for stack, modules in MMDIT_ADAPTER_MODULES.items() for block in range(layers[stack])
               for module in modules]
    _save_lora(folder, targets, seed, ADAPTER_CONFIG)


def _clip_image_processor():
    """CLIP's default image processor; the PIL backend where transformers has one (torchvision is optional)."""
    try:
        from transformers import CLIPImageProcessorPil as processor
    except ImportError:
        from transformers import CLIPImageProcessor as processor
    return processor()


def _write_adapter(folder: Path, config: dict, seed: int, mode: dict | None = None, mode_seed: int = 0) -> None:
    """A random rank-4 LoRA on the reference stream, in PEFT names, with its ``mvgen_config.json``; with a
    seed method's ``mode``, that mode's tensors too (``mode.safetensors``: every parameter the mode adds to the
    denoiser, random) and the mode's keys in the config."""
    from safetensors.torch import save_file

    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config["ffn_dim"]
    shapes = {"ffn.net.0.proj": (ffn, dim), "ffn.net.2": (dim, ffn)}
    targets = [(f"transformer.blocks.{block}.{module}", shapes.get(module, (dim, dim)))
               for block in range(config["num_layers"]) for module in ADAPTER_MODULES]
    _save_lora(folder, targets, seed, {**ADAPTER_CONFIG, **(mode or {})})
    if mode:
        save_file(_mode_tensors(config, mode, mode_seed), folder / "mode.safetensors", metadata={"format": "pt"})


def _save_lora(folder: Path, targets: list[tuple[str, tuple[int, int]]], seed: int, mvgen_config: dict) -> None:
    """A random rank-``lora_rank`` PEFT pair per (module prefix, (out, in)) in ``adapter_model.safetensors``, drawn
    in ``targets``' order from one generator, and ``mvgen_config.json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    rank = ADAPTER_CONFIG["lora_rank"]
    tensors = {}
    for prefix, (out_dim, in_dim) in targets:
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_dim, generator=generator) / in_dim**0.5
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=generator) * 0.1
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "mvgen_config.json").write_text(json.dumps(mvgen_config, indent=2) + "\n")


def stand_in_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random Stand-In LoRA tensors in Stand-In's key layout and rank (``blocks.{i}.self_attn.q_loras.down.weight``
    [128, dim], ``up`` [dim, 128]) for a transformer of ``config``, drawn from one generator; its ``up`` halves are
    not zero (Stand-In initialises them so) so that the LoRA changes the reference stream."""
    from .adapters.stand_in import HALVES, PROJECTIONS, STAND_IN_RANK

    dim = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)
    shapes = {"down": (STAND_IN_RANK, dim), "up": (dim, STAND_IN_RANK)}
    return {f"blocks.{block}.self_attn.{projection}_loras.{half}.weight":
            torch.randn(shapes[half], generator=generator) / STAND_IN_RANK
            for block in range(config["num_layers"]) for projection in PROJECTIONS for half in HALVES}


def write_stand_in_adapter(folder: Path, config: dict, seed: int) -> Path:
    """``stand_in_tensors`` converted as ``mvgen convert stand-in`` converts a released file."""
    from .adapters.stand_in import STAND_IN_RANK, check_stand_in, write_adapter

    tensors = stand_in_tensors(config, seed)
    check_stand_in(tensors, STAND_IN_RANK)
    return write_adapter(tensors, folder, STAND_IN_RANK)


def _mode_tensors(config: dict, mode: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random values for the parameters a seed method's mode adds to the denoiser (those a plain dual-stream
    model of the same transformer lacks), found by building both on the meta device."""
    from .config import MvgenConfig
    from .backbones.wan.model import MultiViewWanTransformer

    with torch.device("meta"):
        plain = MultiViewWanTransformer(MvgenConfig.from_dict({**config, **ADAPTER_CONFIG}))
        moded = MultiViewWanTransformer(MvgenConfig.from_dict({**config, **ADAPTER_CONFIG, **mode}))
    base = plain.state_dict()
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randn(t.shape, generator=generator) * 0.2).contiguous()
               for name, t in sorted(moded.state_dict().items()) if name not in base and t.is_floating_point()}
    if "view_omega" in tensors:  # MVAnimate's weights are positive (a trained one stays near the paper's 0.1-0.25)
        tensors["view_omega"] = tensors["view_omega"].abs() + 0.1
    return tensors


# each family's tiny checkpoint writer
_WRITERS = {"wan": _write_pipeline, "mmdit": _write_mmdit_pipeline}
