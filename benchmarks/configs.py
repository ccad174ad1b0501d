"""The model sizes and input shapes the engine benchmarks (``mvgen bench denoiser|pipeline``) run at.

- ``tiny``: the embedded checkpoint's transformer (``engine.tiny``, 2 layers of 2 x 24 heads), seconds on a CPU.
- ``cpu``: a CPU-sized Wan2.1-I2V transformer, 4 layers of 12 x 64 heads (768 wide, FFN 3072) with Wan's real
  context widths (umT5 4096, CLIP 1280), random weights from a fixed seed.
- ``wan-1.3b``, ``wan-14b``: the Wan2.1 1.3B (12 x 128 heads, FFN 8960) and 14B (40 x 128, FFN 13824) widths in
  the I2V layout with only ``layers`` layers (GPU); per-step figures are extrapolated to the real depth
  (30 and 40 layers) as ``t * depth / layers`` and labelled so.

Every built transformer is diffusers' ``WanTransformer3DModel`` saved with ``save_pretrained`` under the cache
root, so the engine (``engine.loading``) and diffusers (``from_pretrained``) load the same file.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

SEED = 20261201
# diffusers WanTransformer3DModel arguments shared by every Wan2.1-I2V size (patch 1x2x2, 36 input channels)
_WAN_I2V = dict(patch_size=(1, 2, 2), in_channels=36, out_channels=16, text_dim=4096, freq_dim=256,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280,
                rope_max_seq_len=1024)
# latent frames tried, in order, when laying out a token count (Wan: 81, 49, 17, 9, 5, 1 frames)
LATENT_FRAMES = (21, 13, 5, 3, 2, 1)
MAX_ASPECT = 2.0  # the latent grid's width / height at most
WAN_ASPECT = 832 / 480  # the preferred width / height (Wan's 480p)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark size: ``transformer`` (WanTransformer3DModel arguments; None: the embedded tiny's),
    ``depth`` (the real model's layers when ``layers`` is a cut of it, else None)."""

    name: str
    description: str
    transformer: dict | None
    layers: int | None  # default layers built (None: the checkpoint's own)
    depth: int | None
    tokens: tuple[int, ...]  # default video token counts
    gpu: bool = False  # too big for a CPU run

    def wan_config(self, layers: int | None) -> dict:
        heads = self.transformer["num_attention_heads"]
        width = heads * self.transformer["attention_head_dim"]
        return {**_WAN_I2V, **self.transformer, "added_kv_proj_dim": width, "num_layers": layers or self.layers}


CONFIGS = {
    "tiny": BenchConfig("tiny", "the embedded tiny checkpoint (2 layers, 2 x 24 heads)", None, None, None, (48, 192)),
    "cpu": BenchConfig("cpu", "CPU-sized Wan2.1-I2V: 4 layers, 12 x 64 heads, FFN 3072",
                       dict(num_attention_heads=12, attention_head_dim=64, ffn_dim=3072), 4, None, (320, 1280)),
    "wan-1.3b": BenchConfig("wan-1.3b", "Wan2.1 1.3B widths (12 x 128 heads, FFN 8960), I2V layout",
                            dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960), 2, 30,
                            (8190, 32760), gpu=True),
    "wan-14b": BenchConfig("wan-14b", "Wan2.1 14B widths (40 x 128 heads, FFN 13824), I2V layout",
                           dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824), 2, 40,
                           (8190, 32760), gpu=True),
}


def transformer_dir(config: BenchConfig, layers: int | None, cache_root: Path) -> Path:
    """The diffusers transformer directory of ``config`` (built once under ``cache_root/bench``, seeded)."""
    if config.transformer is None:
        from engine.tiny import ensure_tiny

        return ensure_tiny(cache_root) / "transformer"
    wan = config.wan_config(layers)
    digest = hashlib.sha1(json.dumps({**wan, "seed": SEED}, sort_keys=True).encode()).hexdigest()[:10]
    dest = Path(cache_root) / "bench" / f"{config.name}-{wan['num_layers']}l-{digest}"
    if not (dest / "config.json").is_file():
        build_transformer(wan, dest)
    return dest


def build_transformer(wan: dict, dest: Path) -> Path:
    """A random (seeded) ``WanTransformer3DModel`` saved at ``dest`` atomically (temp dir, then rename)."""
    import torch
    from diffusers import WanTransformer3DModel

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            WanTransformer3DModel(**wan).save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tmp.rename(dest)
    except OSError:
        if not (dest / "config.json").is_file():  # not another process's finished build
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def latent_grid(tokens: int) -> tuple[int, int, int] | None:
    """A video latent grid (frames, height, width) whose 1x2x2 patches make ``tokens`` tokens: the first of
    ``LATENT_FRAMES`` that divides it, with the spatial layout (aspect 1 to ``MAX_ASPECT``) closest to Wan's
    480p aspect; None when there is none."""
    for frames in LATENT_FRAMES:
        if tokens % frames:
            continue
        per_frame = tokens // frames
        layouts = [(rows, per_frame // rows) for rows in range(1, math.isqrt(per_frame) + 1)
                   if per_frame % rows == 0 and per_frame // rows <= MAX_ASPECT * rows]
        if layouts:
            rows, cols = min(layouts, key=lambda hw: abs(math.log(hw[1] / hw[0] / WAN_ASPECT)))
            return frames, 2 * rows, 2 * cols
    return None


def pixel_size(grid: tuple[int, int, int]) -> str:
    """The video a latent grid comes from: ``frames x height x width`` in pixels (Wan VAE: time /4, space /8)."""
    f, h, w = grid
    return f"{4 * (f - 1) + 1}x{8 * h}x{8 * w}"
