"""Reference-stream adapters: parse LoRA files in three spellings and merge them once at load.

Spellings understood (all name a module of a Wan block; the LoRA defines the *reference* stream):
- PEFT / diffusers: ``[transformer.|base_model.model.|diffusion_model.]blocks.3.attn1.to_q.lora_A[.default].weight``
- kohya: ``lora_unet_blocks_3_attn1_to_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
- original Wan: ``diffusion_model.blocks.3.self_attn.q.lora_A.weight`` (also with lora_down/lora_up)
Other adapter tensors: ``ref_patch_embedding.{weight,bias}`` and ``view_logit_scales`` [R].
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import load_safetensors, read_json

# our (diffusers) module names inside a block, and the original Wan names for them
BLOCK_LINEARS = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_WAN_TO_OURS = {wan: ours for ours, wan in BLOCK_LINEARS.items()}
_KOHYA_TO_OURS = {
    **{ours.replace(".", "_"): ours for ours in BLOCK_LINEARS},
    **{wan.replace(".", "_"): ours for wan, ours in _WAN_TO_OURS.items()},
}
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.")
_EXTRA_TENSORS = ("ref_patch_embedding.weight", "ref_patch_embedding.bias", "view_logit_scales")
_DOTTED = re.compile(r"^(?:ref_)?blocks\.(\d+)\.(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_DOTTED_ALPHA = re.compile(r"^(?:ref_)?blocks\.(\d+)\.(.+)\.alpha$")
_KOHYA = re.compile(r"^lora_unet_blocks_(\d+)_(.+?)\.(lora_down|lora_up|alpha)(?:\.weight)?$")


class AdapterError(ValueError):
    """An adapter file that cannot define the reference stream (names the offending keys)."""


@dataclass
class LoraPair:
    down: torch.Tensor | None = None  # A [rank, in]
    up: torch.Tensor | None = None  # B [out, rank]
    alpha: float | None = None


@dataclass
class ReferenceAdapter:
    """Parsed adapter: LoRA pairs keyed by ``(block, module)`` plus extra tensors and the file's config."""

    loras: dict[tuple[int, str], LoraPair] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    default_alpha: float | None = None  # PEFT adapter_config.json / mvgen_config.json lora_alpha

    def scale(self, pair: LoraPair, override: float | None) -> float:
        if override is not None:
            return override
        rank = pair.down.shape[0]
        alpha = pair.alpha if pair.alpha is not None else self.default_alpha
        return 1.0 if alpha is None else alpha / rank


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _module_name(name: str) -> str | None:
    if name in BLOCK_LINEARS:
        return name
    return _WAN_TO_OURS.get(name)


def parse_adapter_tensors(tensors: dict[str, torch.Tensor]) -> ReferenceAdapter:
    adapter = ReferenceAdapter()
    unknown = []
    for raw_key, tensor in tensors.items():
        key = _strip_prefix(raw_key)
        if key in _EXTRA_TENSORS:
            adapter.extras[key] = tensor
            continue
        kohya = _KOHYA.match(raw_key)
        dotted = _DOTTED.match(key)
        dotted_alpha = _DOTTED_ALPHA.match(key)
        if kohya:
            block, module, kind = int(kohya.group(1)), _KOHYA_TO_OURS.get(kohya.group(2)), kohya.group(3)
        elif dotted:
            block, module, kind = int(dotted.group(1)), _module_name(dotted.group(2)), dotted.group(3)
        elif dotted_alpha:
            block, module, kind = int(dotted_alpha.group(1)), _module_name(dotted_alpha.group(2)), "alpha"
        else:
            unknown.append(raw_key)
            continue
        if module is None:
            unknown.append(raw_key)
            continue
        pair = adapter.loras.setdefault((block, module), LoraPair())
        if kind in ("lora_A", "lora_down"):
            pair.down = tensor
        elif kind in ("lora_B", "lora_up"):
            pair.up = tensor
        else:
            pair.alpha = float(tensor.reshape(-1)[0])
    if unknown:
        raise AdapterError(
            f"adapter key(s) not understood: {sorted(unknown)[:6]}{' ...' if len(unknown) > 6 else ''} "
            f"({len(unknown)} in all); expected LoRA on block linears {sorted(BLOCK_LINEARS)} or {list(_EXTRA_TENSORS)}"
        )
    incomplete = [f"blocks.{b}.{m}" for (b, m), p in adapter.loras.items() if p.down is None or p.up is None]
    if incomplete:
        raise AdapterError(f"adapter LoRA missing its down/A or up/B half for: {sorted(incomplete)[:6]}")
    return adapter


def read_adapter(path: str | Path) -> ReferenceAdapter:
    """Read a LoRA ``.safetensors`` file or a PEFT adapter directory (safetensors only)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter not found: {path}")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = f" (found {pickles}: pickled weights are never loaded)" if pickles else ""
            raise AdapterError(f"no .safetensors adapter in {path}{hint}")
    elif path.suffix != ".safetensors":
        raise AdapterError(f"adapter must be a .safetensors file or a PEFT directory, got {path.name}")
    else:
        files = [path]
    tensors = {}
    for file in files:
        tensors.update(load_safetensors(file, AdapterError))
    adapter = parse_adapter_tensors(tensors)
    peft_config = folder / "adapter_config.json"
    mvgen_config = folder / "mvgen_config.json"
    if peft_config.exists():
        adapter.default_alpha = _lora_alpha(peft_config, "PEFT adapter config")
    if mvgen_config.exists():
        alpha = _lora_alpha(mvgen_config, "mvgen config")
        adapter.default_alpha = alpha if alpha is not None else adapter.default_alpha
    return adapter


def _lora_alpha(path: Path, what: str) -> float | None:
    alpha = read_json(path, AdapterError, what).get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise AdapterError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    return alpha


def merge_into_reference_stream(
    state: dict[str, torch.Tensor], adapter: ReferenceAdapter, num_layers: int, scale_override: float | None = None
) -> None:
    """``ref_blocks.i.m.weight += scale * B @ A`` in place (float32 math), after shape checks."""
    for (block, module), pair in sorted(adapter.loras.items()):
        if block >= num_layers:
            raise AdapterError(f"adapter targets blocks.{block}.{module} but the model has {num_layers} blocks")
        key = f"ref_blocks.{block}.{module}.weight"
        weight = state[key]
        rank_ok = pair.down.ndim == 2 and pair.up.ndim == 2 and pair.down.shape[0] == pair.up.shape[1]
        if not rank_ok or (pair.up.shape[0], pair.down.shape[1]) != tuple(weight.shape):
            raise AdapterError(
                f"adapter LoRA for blocks.{block}.{module} has A {list(pair.down.shape)} / B {list(pair.up.shape)}, "
                f"which does not fit the weight {list(weight.shape)}"
            )
        delta = adapter.scale(pair, scale_override) * (pair.up.float() @ pair.down.float())
        state[key] = (weight.float() + delta).to(weight.dtype)
