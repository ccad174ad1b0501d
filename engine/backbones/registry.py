"""The backbones' code, one entry per family (``engine.backbones.families`` describes each): the denoiser module,
its loader, text encoder and VAE. ``backbone(config)`` is the one dispatch on the family."""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..adapters.base_lora import LoraSpec
from ..checkpoint import Checkpoint
from ..loading import denoiser_config, find_transformer_dir
from .backbone import Backbone
from .families import MMDIT, WAN, family_of

# each family's code: the module of its folder that holds its ``BACKBONE``, imported on first use so that a process
# serving one family (a server's stub, a worker) never imports another's dependencies (the MMDiT's diffusers modules)
CODE = {WAN.name: "engine.backbones.wan.backbone", MMDIT.name: "engine.backbones.mmdit.backbone"}


def backbone(config) -> Backbone:
    """The code of a config's family (an ``MvgenConfig``, its ``to_dict()`` or a family name)."""
    return import_module(CODE[family_of(config).name]).BACKBONE


def text_encoder_class(checkpoint: Checkpoint) -> type:
    """The family's text encoder: umT5 (Wan) or HunyuanVideo's Llama + CLIP."""
    return backbone(checkpoint.config).text_encoder


def vae_class(checkpoint: Checkpoint) -> type:
    """The family's VAE: Wan's or HunyuanVideo's."""
    return backbone(checkpoint.config).vae


def load_denoiser(
    path: str | Path,
    adapter: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    lora_scale: float | None = None,
    *,
    folder: str = "transformer",
    weights_file: str | Path | None = None,
    loras: Sequence[LoraSpec] = (),
    lora_reference: bool = False,
    **config_overrides,
) -> nn.Module:
    """Build one denoiser (its family's module: ``Backbone.model``) from a diffusers pipeline dir (its ``folder``: ``transformer``, or Wan2.2's
    ``transformer_2``) or a transformer dir.

    ``weights_file`` replaces the folder's weights by a single-file transformer (original Wan / ComfyUI key
    names, converted by diffusers); the folder still gives the config. Without an adapter the reference stream
    is a copy of the base blocks (MVI2V's initialisation). ``adapter`` (a ``.safetensors`` file or a folder;
    format in ``engine.adapters.lora``) then replaces tensors by its full ones (the reference stream, the video stream,
    a mode's modules) and merges its LoRA pairs on top, ``W + scale * B @ A`` with the scale its convention gives
    (``lora_scale``: that scale outright), and its ``video_lora`` into the video stream; one INFO line on logger
    ``mvgen.loading`` says what it merged at which scale. ``loras`` (base-model LoRAs, any spelling diffusers
    reads) merge last into the video stream, in order, and into the reference stream too when
    ``lora_reference``. ``mvgen_config.json`` beside the adapter (or in ``path``) sets the multi-view options;
    keyword overrides win over both. The config's ``quantize`` then holds the block linears in 8 bits
    (``engine.runtime.fp8``; an FP8 single file's weights reach them as the file stores them, never passing through
    16 bits: ``engine.backbones.assembly``).

    With ``ref_weights="shared"`` (the config's default) the reference stream holds no copy: it shares the video
    stream's final weights, owns what the adapter gives in full, and applies the LoRA pairs on shared weights
    unmerged (``engine.adapters.reference_weights``). Where that is not exact (the video stream changes and the reference
    stream does not) the reference stream is merged as with ``"merged"``, the model's config says so, and one INFO
    line on ``mvgen.loading`` says why.
    """
    transformer_dir = find_transformer_dir(path, folder)
    config = denoiser_config(path, adapter, folder, **config_overrides)
    return backbone(config).load(transformer_dir, config, adapter, dtype, device, lora_scale, weights_file=weights_file,
                                 loras=loras, lora_reference=lora_reference)
