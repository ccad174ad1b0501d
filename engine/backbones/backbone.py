"""What a backbone family's code provides (each family's folder declares one ``BACKBONE``; ``registry`` finds it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .families import Family


@dataclass(frozen=True)
class Backbone:
    family: Family
    model: type[nn.Module]  # the multi-view denoiser built from an ``MvgenConfig`` of this family
    # (transformer_dir, config, adapter, dtype, device, lora_scale, *, weights_file, loras, lora_reference) -> model
    load: Callable
    text_encoder: type  # a served part built from a ``Checkpoint``; returns ``family.text_outputs``
    vae: type
