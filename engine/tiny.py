"""The embedded ``tiny`` checkpoint: a complete diffusers-layout Wan2.1-I2V pipeline plus a reference adapter.

Every component is the real class (diffusers ``WanTransformer3DModel`` / ``AutoencoderKLWan`` /
``UniPCMultistepScheduler``, transformers umT5 / CLIP vision / ByT5 tokenizer) at small sizes, initialised
from fixed seeds, so it exercises every code path of loading and generation with no download. Its videos
are noise. The build is bit-identical across runs and is written atomically (temp dir + rename).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

TINY_VERSION = "tiny-v1"
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
_COMPLETE_MARKER = "model_index.json"


def default_cache_root(environ: Mapping[str, str]) -> Path:
    """``$MVGEN_CACHE`` when set in ``environ``, else ``~/.cache/mvgen``.

    The environment is passed in: only process entry points (the ``mvgen`` command, a served model's
    ``initialize``) read ``os.environ``, and hand the root down from there.
    """
    return Path(environ.get(CACHE_ENV) or Path.home() / ".cache" / "mvgen")


def ensure_tiny(root: Path | str) -> Path:
    """The tiny pipeline directory ``<root>/tiny-v1``, built once."""
    if root is None:  # a caller that forgot to thread the root down: say so rather than guess one
        raise ValueError("the tiny model needs a cache directory to be built in: pass cache_root "
                         f"(the mvgen command takes it from --cache-dir or ${CACHE_ENV})")
    return build_tiny(Path(root) / TINY_VERSION)


def resolve_checkpoint(model: str | Path, adapter: str | Path | None, cache_root: Path | str
                       ) -> tuple[Path, Path | None]:
    """``"tiny"`` -> the tiny pipeline under ``cache_root`` (built once) with its bundled adapter unless
    ``adapter`` is given; any other ``model`` is a checkpoint directory, returned as is."""
    if str(model) == "tiny":
        path = ensure_tiny(cache_root)
        return path, Path(adapter) if adapter is not None else path / "adapter"
    return Path(model), Path(adapter) if adapter is not None else None


def build_tiny(dest: Path | str) -> Path:
    """Build the tiny pipeline into ``dest`` unless it is already there; returns ``dest``."""
    dest = Path(dest)
    if (dest / _COMPLETE_MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        from .components import quiet_hub_progress

        with torch.random.fork_rng(devices=[]), quiet_hub_progress():
            _write_pipeline(staging)
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


def _write_pipeline(out: Path) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import ByT5Tokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    _seeded(0)
    transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    # small shards so that loading goes through the safetensors index, as real checkpoints do
    transformer.save_pretrained(out / "transformer", safe_serialization=True, max_shard_size="200KB")
    _seeded(1)
    AutoencoderKLWan(**VAE_CONFIG).save_pretrained(out / "vae", safe_serialization=True)
    _seeded(2)
    UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG)).save_pretrained(out / "text_encoder")
    ByT5Tokenizer().save_pretrained(out / "tokenizer")
    _seeded(3)
    CLIPVisionModel(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).save_pretrained(out / "image_encoder")
    _clip_image_processor().save_pretrained(out / "image_processor")
    UniPCMultistepScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    _write_adapter(out / "adapter")
    (out / "mvgen_defaults.json").write_text(json.dumps(GENERATION_DEFAULTS, indent=2) + "\n")
    (out / _COMPLETE_MARKER).write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")


def _clip_image_processor():
    """CLIP's default image processor; the PIL backend where transformers has one (torchvision is optional)."""
    try:
        from transformers import CLIPImageProcessorPil as processor
    except ImportError:
        from transformers import CLIPImageProcessor as processor
    return processor()


def _write_adapter(folder: Path) -> None:
    """A random rank-4 LoRA on the reference stream, in PEFT names, with its ``mvgen_config.json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(SEED + 4)
    dim, ffn, rank = 48, TRANSFORMER_CONFIG["ffn_dim"], ADAPTER_CONFIG["lora_rank"]
    shapes = {"ffn.net.0.proj": (ffn, dim), "ffn.net.2": (dim, ffn)}
    tensors = {}
    for block in range(TRANSFORMER_CONFIG["num_layers"]):
        for module in ADAPTER_MODULES:
            out_dim, in_dim = shapes.get(module, (dim, dim))
            prefix = f"transformer.blocks.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_dim, generator=generator) / in_dim**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=generator) * 0.1
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "mvgen_config.json").write_text(json.dumps(ADAPTER_CONFIG, indent=2) + "\n")
