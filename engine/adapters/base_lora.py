"""Base-model LoRAs (style, identity, LightX2V/CausVid distillation) merged into the Wan weights once at load.

The spellings are those diffusers' Wan loader reads, converted by diffusers' own functions
(``WanLoraLoaderMixin.lora_state_dict`` dispatches on the keys' prefix):
- diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B`` (PEFT's ``base_model.model.``
  prefix is read as ``transformer.``); scale alpha/r from the adapter config diffusers stores in the file
  (``lora_adapter_metadata``) or PEFT's ``adapter_config.json`` beside ``adapter_model.safetensors``, else 1;
- kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
- original Wan, ComfyUI, LightX2V: ``diffusion_model.blocks.0.self_attn.q.lora_A|lora_down.weight`` /
  ``lora_B|lora_up`` / ``.alpha``, with ``diff_b`` bias deltas and ``head.head.diff`` (diffusers folds alpha/rank
  into A and B and turns ``diff_b`` into a LoRA bias).

diffusers leaves part of some files unapplied without an error: the converter drops norm deltas (``norm3.diff``),
every ``.diff``/``.diff_b`` it has no rule for (``blocks.N.diff_m``, ``patch_embedding.diff``, full deltas of
linears), ``time_projection`` keys without their weights and DoRA scales, logging at most a warning; PEFT then
skips targets the model lacks with a warning. Here every tensor of the file is accounted for: the conversion is
traced (``_Provenance``), so each converted tensor names the file keys it was computed from, and a key that
reaches no merged weight (nor was read as an alpha) is an error unless it is all zeros (dropping zeros changes
nothing, and LightX2V files carry zeroed norm deltas).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..files import load_safetensors, read_json
from ..errors import LoraError

_PEFT_PREFIX, _DIFFUSERS_PREFIX = "base_model.model.", "transformer."
_SPELLINGS = ("transformer.<module>.lora_A/lora_B (diffusers), lora_unet_* (kohya/musubi) or diffusion_model.* "
              "(Wan/ComfyUI/LightX2V) keys")
# what diffusers' conversion leaves per LoRA'd module (only keys under "transformer." reach the model)
_CONVERTED = re.compile(r"^transformer\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")
_LORA_KEY = re.compile(r"lora|\.diff(_b)?$")  # some tensor of any LoRA spelling has this in its key
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_SHOWN = 6  # keys named in one error
# how a converter reads a tensor as a number (diffusers reads alphas with .item() and folds them into A and B)
_READS = (torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.tolist)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge: a ``.safetensors`` file (or a PEFT adapter folder) and the user's strength."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``PATH[:SCALE]``. A path may hold ':' itself, so a last ':' part that reads as a path (has a '/', or
        ends in ``.safetensors``) belongs to the path; any other last part must be the scale."""
        head, colon, tail = text.rpartition(":")
        if not colon or "/" in tail or tail.endswith(".safetensors"):
            head, tail = text, None
        if not head:
            raise LoraError(f"LoRA {text!r}: expected PATH[:SCALE], the path is empty")
        if tail is None:
            return cls(Path(head))
        try:
            scale = float(tail)
        except ValueError:
            raise LoraError(f"LoRA {text!r}: scale {tail!r} is not a number (expected PATH[:SCALE], e.g. "
                            f"style.safetensors:0.8; a path with ':' in its last part takes an explicit scale, "
                            f"PATH:1)") from None
        if not math.isfinite(scale):
            raise LoraError(f"LoRA {text!r}: scale must be a finite number, got {tail!r}")
        return cls(Path(head), scale)

    def resolved(self) -> "LoraSpec":
        """The same LoRA with an absolute path (for a process whose working directory differs)."""
        return LoraSpec(self.path.resolve(), self.scale)

    def __str__(self) -> str:
        # the scale is always written, so a path ending in ':<number>' still parses back to itself
        return f"{self.path}:{self.scale!r}"


def merge_base_loras(state: dict[str, torch.Tensor], loras: Sequence[LoraSpec], prefix: str = "",
                     prepare: Callable[[dict[str, torch.Tensor], set[str]], None] | None = None) -> None:
    """Merge each LoRA, in order, into ``state`` (diffusers ``WanTransformer3DModel`` names, each with ``prefix``
    before it): ``W += scale * B @ A`` and ``b += scale * diff_b`` in float32, cast back to the weight's dtype;
    entries are replaced. ``scale`` is what diffusers applies (alpha/rank, or the adapter config's) times the
    spec's. With a ``prefix`` only ``blocks.`` targets exist under it (a reference-stream copy), so others are
    left to the unprefixed merge.

    Every file is read and checked before the first weight changes: a bad second LoRA must not leave the first
    merged into a state the caller may still hold. ``prepare(state, keys)`` is then called once with the weight keys
    the merges will change (an FP8 file's weights are dequantised there: ``engine.backbones.assembly``).
    """
    targets = set()
    for spec in loras:
        targets.update(update.weight for update in _plan(spec, state, prefix) if update.weight is not None)
    if prepare is not None:
        prepare(state, targets)
    for spec in loras:
        for update in _plan(spec, state, prefix):
            update.apply(state)


@dataclass
class _ModuleUpdate:
    """One linear's LoRA, checked against the state: ``weight``/``bias`` are the state keys it changes."""

    weight: str | None
    bias: str | None
    down: torch.Tensor | None  # A [rank, in]
    up: torch.Tensor | None  # B [out, rank]
    bias_delta: torch.Tensor | None  # [out]
    scale: float

    def apply(self, state: dict[str, torch.Tensor]) -> None:
        if self.weight is not None:
            target = state[self.weight]
            delta = (self.up.to(target.device) @ self.down.to(target.device)) * self.scale
            state[self.weight] = (target.float() + delta).to(target.dtype)
        if self.bias is not None:
            target = state[self.bias]
            state[self.bias] = (target.float() + self.bias_delta.to(target.device) * self.scale).to(target.dtype)


class _Provenance(TorchFunctionMode):
    """Records, for every tensor computed while active, which source tensors (by file key) it derives from, and
    which sources were read as Python numbers (alphas). Results are kept alive so that no other tensor gets
    the ``id`` of a traced one while tracing."""

    def __init__(self, sources: dict[str, torch.Tensor]):
        super().__init__()
        self._origin = {id(tensor): {key} for key, tensor in sources.items()}
        self._alive = list(sources.values())
        self.read: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = set().union(*(self._origin.get(id(a), ()) for a in tree_leaves((args, kwargs))
                               if isinstance(a, torch.Tensor)))
        if inputs and func in _READS:
            self.read |= inputs
        elif inputs and isinstance(result, torch.Tensor):
            self._origin.setdefault(id(result), set()).update(inputs)  # in-place ops return their input
            self._alive.append(result)
        return result

    def keys_of(self, tensor: torch.Tensor) -> set[str]:
        return self._origin.get(id(tensor), set())


def _plan(spec: LoraSpec, state: dict[str, torch.Tensor], prefix: str) -> list[_ModuleUpdate]:
    """Read, convert and check one LoRA against ``state``; the updates it makes (nothing is changed here)."""
    file = _weights_file(Path(spec.path))
    tensors = load_safetensors(file, LoraError)
    if not any(_LORA_KEY.search(key) for key in tensors):  # e.g. a full checkpoint given as a LoRA
        raise LoraError(f"{file}: no LoRA in this file (no lora/diff tensors among {_listing(list(tensors))}); "
                        f"expected {_SPELLINGS}")
    config = _adapter_config(file)
    converted, trace = _convert(file, tensors)
    reached = set().union(trace.read, *(trace.keys_of(t) for t in converted.values()))
    dropped = [key for key in tensors if key not in reached and torch.count_nonzero(tensors[key])]
    if dropped:
        raise LoraError(f"{file}: diffusers' Wan LoRA conversion drops {_listing(dropped)} without applying them; "
                        f"refusing a half-applied LoRA")
    modules, foreign = _group(converted)
    if foreign:
        raise LoraError(f"{file}: key(s) in none of the LoRA spellings read: "
                        f"{_listing(_sources(foreign, converted, trace))}; expected {_SPELLINGS}")
    if not modules:
        raise LoraError(f"{file}: no LoRA in this file (nothing left once diffusers converted it)")
    halves = [m for m, parts in sorted(modules.items()) if ("lora_A.weight" in parts) != ("lora_B.weight" in parts)]
    if halves:
        raise LoraError(f"{file}: LoRA with its A/down or B/up half only for {halves[:_SHOWN]}: "
                        f"{_listing(_sources(halves, modules, trace))}")
    # under a prefix only the blocks exist (a reference-stream copy); the unprefixed merge applies the rest
    modules = {m: parts for m, parts in sorted(modules.items()) if not prefix or m.startswith("blocks.")}
    absent = [m for m, parts in modules.items() if any(k not in state for k in _targets(prefix + m, parts) if k)]
    if absent:
        raise LoraError(f"{file}: LoRA for {absent[:_SHOWN]}, which this model does not have: "
                        f"{_listing(_sources(absent, modules, trace))}")
    return [_module_update(file, module, parts, state, prefix, config, spec.scale) for module, parts in modules.items()]


def _targets(name: str, parts: dict[str, torch.Tensor]) -> tuple[str | None, str | None]:
    """The state keys a module's LoRA changes: its weight (with A and B) and its bias (with a bias delta)."""
    return (name + ".weight" if "lora_A.weight" in parts else None, name + ".bias" if "lora_B.bias" in parts else None)


def _weights_file(path: Path) -> Path:
    if path.is_dir():  # a PEFT adapter folder (save_pretrained)
        return path / "adapter_model.safetensors"
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: a LoRA must be a .safetensors file or a PEFT adapter folder (pickled weights are "
                        f"never loaded)")
    return path


def _adapter_config(file: Path):
    """The PEFT ``LoraConfig`` that sets alpha/r for diffusers-spelled LoRAs: diffusers' ``lora_adapter_metadata``
    in the file's header (its keys under ``transformer.``), else PEFT's ``adapter_config.json`` beside
    ``adapter_model.safetensors``; None when neither (then alpha = rank, scale 1, as in diffusers)."""
    from peft import LoraConfig
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        raw = (handle.metadata() or {}).get(_METADATA_KEY)
    peft_config = file.parent / "adapter_config.json"
    if raw is not None:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as error:
            raise LoraError(f"{file}: its {_METADATA_KEY} is not JSON ({error.msg})") from None
        if not isinstance(packed, dict):
            raise LoraError(f"{file}: its {_METADATA_KEY} is not a JSON object")
        fields = {k.removeprefix(_DIFFUSERS_PREFIX): v for k, v in packed.items() if k.startswith(_DIFFUSERS_PREFIX)}
        where = f"{file}: {_METADATA_KEY}"
    elif file.name == "adapter_model.safetensors" and peft_config.is_file():
        fields, where = read_json(peft_config, LoraError, "PEFT adapter config"), str(peft_config)
    else:
        return None
    if not fields:
        return None
    try:
        config = LoraConfig(**fields)
    except (TypeError, ValueError) as error:
        raise LoraError(f"{where} is not a PEFT LoRA config ({error})") from None
    if config.use_dora:
        raise LoraError(f"{where}: DoRA adapters (use_dora) cannot be merged as W + B @ A")
    return config


def _convert(file: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], _Provenance]:
    """diffusers' conversion of the file to ``transformer.{module}.lora_A.weight`` / ``lora_B.weight`` /
    ``lora_B.bias`` (keys it has no rule for are passed through), traced back to the file's keys."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    # float32 before diffusers folds alpha/rank into A and B, so that fold is float32 math too
    sources = {key: t.float() if t.is_floating_point() else t for key, t in tensors.items()}
    renamed = {_DIFFUSERS_PREFIX + key.removeprefix(_PEFT_PREFIX) if key.startswith(_PEFT_PREFIX) else key: t
               for key, t in sources.items()}
    with _Provenance(sources) as trace:
        try:
            converted = WanLoraLoaderMixin.lora_state_dict(renamed)
        except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as error:
            # the converters index the keys they expect (a missing half or alpha is a KeyError naming it)
            message = str(error) if len(str(error)) <= 300 else str(error)[:300] + " ..."
            raise LoraError(f"{file}: diffusers' Wan LoRA converter cannot read this file "
                            f"({type(error).__name__}: {message})") from None
        # what diffusers' load_lora_adapter does next: old diffusers names ("lora.down") to PEFT's
        converted = convert_unet_state_dict_to_peft(converted)
    return converted, trace


def _group(converted: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """``{module: {part: tensor}}`` of the converted keys, and those that are no LoRA part of a transformer module
    (diffusers' loader ignores keys outside ``transformer.``)."""
    modules, foreign = {}, []
    for key, tensor in converted.items():
        match = _CONVERTED.match(key)
        if match is None:
            foreign.append(key)
        else:
            modules.setdefault(match["module"], {})[match["part"]] = tensor
    return modules, foreign


def _module_update(file: Path, module: str, parts: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   prefix: str, config, user_scale: float) -> _ModuleUpdate:
    down, up, bias = parts.get("lora_A.weight"), parts.get("lora_B.weight"), parts.get("lora_B.bias")
    weight_key, bias_key = _targets(prefix + module, parts)
    if down is not None:
        weight = state[weight_key]
        if not (down.ndim == up.ndim == 2 and up.shape[1] == down.shape[0]
                and (up.shape[0], down.shape[1]) == tuple(weight.shape)):
            raise LoraError(f"{file}: the LoRA for {module} (A {list(down.shape)}, B {list(up.shape)}) does not fit "
                            f"its weight {list(weight.shape)}")
    if bias is not None and bias.shape != state[bias_key].shape:
        raise LoraError(f"{file}: the bias delta for {module} {list(bias.shape)} does not fit its bias "
                        f"{list(state[bias_key].shape)}")
    rank = down.shape[0] if down is not None else None
    scale = user_scale * (_config_scale(file, config, module, rank) if config is not None else 1.0)
    return _ModuleUpdate(weight_key, bias_key, down, up, bias, scale)


def _config_scale(file: Path, config, module: str, rank: int | None) -> float:
    """PEFT's scaling for ``module`` under ``config``: its rank/alpha patterns, else ``r`` and ``lora_alpha``."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.rank_pattern or {}, config.alpha_pattern or {}
    r = ranks.get(get_pattern_key(ranks.keys(), module), config.r)
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.lora_alpha)
    if rank is not None and rank != r:
        raise LoraError(f"{file}: the LoRA for {module} has rank {rank}, its adapter config says {r}")
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _sources(names: list[str], found_in: dict, trace: _Provenance) -> list[str]:
    """The file keys behind converted keys or modules (``found_in`` maps each name to a tensor, or to a module's
    ``{part: tensor}``); a converted name stands in where a tensor came from no file key."""
    tensors = [t for name in names for t in (found_in[name].values() if isinstance(found_in[name], dict)
                                               else [found_in[name]])]
    return sorted(set().union(*(trace.keys_of(t) for t in tensors))) or list(names)


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    more = " ..." if len(keys) > _SHOWN else ""
    return f"{keys[:_SHOWN]}{more} ({len(keys)} key{'s' if len(keys) != 1 else ''})"
