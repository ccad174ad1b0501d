"""Adapters: the weights MVI2V's training adds to or changes in a base Wan checkpoint, and how they merge at load.

An adapter is a ``.safetensors`` file, or a folder whose ``*.safetensors`` files are all read (PEFT's
``adapter_model.safetensors``, a mode's ``mode.safetensors``, ...; not the ``video_lora`` file, below), with an
optional ``mvgen_config.json`` and PEFT ``adapter_config.json`` beside it. Pickles are never loaded.

Key rules. One prefix ``base_model.model.``, ``transformer.``, ``diffusion_model.`` or ``model.`` is dropped from a
key; then the key is exactly one of:

1. **A LoRA tensor** of a block linear (``BLOCK_LINEARS``, in diffusers' or original Wan's module names):
   - PEFT / diffusers: ``blocks.3.attn1.to_q.lora_A[.default].weight`` / ``lora_B``, or ``ref_blocks.3...``
   - kohya: ``lora_unet_blocks_3_attn1_to_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
   - original Wan: ``blocks.3.self_attn.q.lora_A.weight`` (also ``lora_down`` / ``lora_up`` / ``.alpha``)
   A pair named ``ref_blocks.N`` changes the reference stream. A pair named ``blocks.N`` changes the reference
   stream too (an adapter trained on MVI2V's copy of the base blocks, saved under the base names) unless
   ``mvgen_config.json`` says ``"blocks_lora": "video"``: then it changes the video stream, and a PEFT adapter
   trained on this model's two streams loads under its own names. Two pairs for one target are refused; so is
   a LoRA on any other module (that belongs in the ``video_lora`` file).
2. **A full tensor**, named as the denoiser's parameter or buffer whose value it is: ``ref_blocks.N.<param>``
   (a fully trained reference stream: its own ``scale_shift_table``, ``norm2``, ``attn1.norm_q``, biases,
   projections), ``blocks.N.<param>`` and the top-level names of the base (``patch_embedding.weight``,
   ``proj_out.bias``: the video stream where training changed it), and what a mode adds to the model
   (``ref_patch_embedding.weight/bias``, whose shape sets that embedding's input channels; ``view_logit_scales``;
   a pose encoder; identity projections; ...). It replaces the value the base checkpoint (or, in the reference
   stream, its copy) would give; a name the built model lacks, or a shape it does not have, is refused.
LoRA pairs merge on top of whatever full weight their target ends with; with ``ref_weights="shared"`` (the default,
``engine.adapters.reference_weights``) a reference-stream pair on a weight the reference stream shares with the video stream
stays unmerged, applied with the same scale. Every parameter the base checkpoint
lacks (its copy in the reference stream aside; ``view_logit_scales``, which the config gives otherwise) must come
from the adapter, or the load is refused naming the tensors and the mode that adds them (``engine.loading``).

``mvgen_config.json`` keys about the adapter (its other keys configure the model: ``MvgenConfig``):
- ``"video_lora": "video_delta.safetensors"``: a file of the adapter folder holding the video stream's changes as
  a base-model LoRA in any spelling ``engine.adapters.base_lora`` reads (diffusers, kohya/musubi, original Wan, ComfyUI,
  LightX2V with bias deltas, LoRAs on any module), merged by ``merge_base_loras`` at diffusers' scale for that
  file (its alpha / r; 1 without alphas, which is MVI2V's alpha 1); ``lora_convention`` does not apply to it;
- ``"blocks_lora": "reference" | "video"``, above;
- ``"lora_convention"``, ``"lora_alpha"``, ``"lora_rank"`` (``MvgenConfig`` fields, so ``load_denoiser`` overrides
  reach them): the scale of the adapter's own pairs, below.

LoRA scale: ``W + scale * B @ A`` (float32), per pair, by ``ScaleRule``:
- ``"lora_convention": "alpha_over_rank"`` (default; PEFT's, kohya's and diffusers'): scale = alpha / r
  (alpha / sqrt(r) where PEFT's config says ``use_rslora``);
- ``"lora_convention": "mvi2v"``: MVI2V's ``W + alpha * B @ A`` (Sec. 4.2; App. C: rank 64, alpha 1): scale = alpha,
  never divided by r.
alpha is ``lora_alpha`` when the config sets it, else the file's (the module's kohya ``.alpha``, else PEFT's
``lora_alpha`` / ``alpha_pattern`` from diffusers' ``lora_adapter_metadata`` or, for ``adapter_model.safetensors``,
``adapter_config.json``, which beside a LoRA file of another name is refused as ambiguous); with none,
alpha = r under ``alpha_over_rank`` (scale 1, as PEFT and diffusers) and alpha = 1 under ``mvi2v``. ``lora_rank``,
when set, must be every pair's rank. ``load_denoiser``'s ``lora_scale`` replaces the scale outright. What each pair
got, and where its alpha came from, is logged once per adapter (logger ``mvgen.loading``).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import load_safetensors, read_json
from ..errors import AdapterError

# the block linears of Wan in our (diffusers) module names, and original Wan's names for them (an alias an adapter
# may use; the MMDiT's adapters use diffusers' names only)
BLOCK_LINEARS = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
ORIGINAL_WAN_NAMES = {wan: ours for ours, wan in BLOCK_LINEARS.items()}
LORA_CONVENTIONS = ("alpha_over_rank", "mvi2v")
BLOCKS_LORA = ("reference", "video")
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.")
_DOTTED = re.compile(r"^(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_DOTTED_ALPHA = re.compile(r"^(.+)\.alpha$")
_KOHYA = re.compile(r"^lora_unet_(.+?)\.(lora_down|lora_up|alpha)(?:\.weight)?$")
_LORA_LIKE = re.compile(r"lora")  # a key of some LoRA spelling, never a full tensor's
_SHOWN = 6  # names listed in one error


@dataclass
class LoraPair:
    down: torch.Tensor | None = None  # A [rank, in]
    up: torch.Tensor | None = None  # B [out, rank]
    alpha: float | None = None  # kohya's per-module ``.alpha``
    peft: object | None = None  # the PEFT LoraConfig of the file the pair came from
    name: str = ""  # the module as the file names it (PEFT's rank/alpha patterns match on it)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class ReferenceAdapter:
    """A parsed adapter: LoRA pairs by the module they change (``ref_blocks.3.attn1.to_q``, or ``blocks.3...``
    with ``blocks_lora: video``), full tensors by the model name they replace, and its folder's settings."""

    loras: dict[str, LoraPair] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    video_lora: Path | None = None
    blocks_lora: str = "reference"

    @property
    def reference_loras(self) -> dict[str, LoraPair]:
        return {target: pair for target, pair in self.loras.items() if target.startswith("ref_")}


@dataclass(frozen=True)
class AdapterNaming:
    """Where a backbone lets an adapter's LoRA pairs go: the linears of its block lists, by list and by name inside
    a block, and which list is the reference stream's copy of which. Derived from a built (meta) model, so every
    backbone reads adapters with the one parser below."""

    linears: dict[str, frozenset[str]]  # block list -> the linear modules inside one of its blocks
    blocks: dict[str, int]  # block list -> its number of blocks
    reference_of: dict[str, str]  # video block list -> the reference stream's list ("blocks" -> "ref_blocks")
    aliases: dict[str, str] = field(default_factory=dict)  # other names of a module inside a block -> ours

    @classmethod
    def of(cls, model, aliases: dict[str, str] | None = None) -> "AdapterNaming":
        """From a model with ``REFERENCE_BLOCKS`` ((video list, reference list) pairs). A reference list the model
        lacks (Token-Concat) takes its video list's modules: its pairs parse, and the loader refuses them by name."""
        linears: dict[str, set[str]] = {}
        counts: dict[str, int] = {}
        for video, ref in model.REFERENCE_BLOCKS:
            for name in (video, ref):
                blocks = getattr(model, name, None)
                if blocks is None:
                    continue
                counts[name] = len(blocks)
                linears[name] = {module for module, sub in blocks[0].named_modules()
                                 if isinstance(getattr(sub, "weight", None), torch.Tensor) and sub.weight.ndim == 2}
            if ref not in linears:
                linears[ref], counts[ref] = linears[video], counts[video]
        return cls({k: frozenset(v) for k, v in linears.items()}, counts,
                   {video: ref for video, ref in model.REFERENCE_BLOCKS}, dict(aliases or {}))

    def target(self, path: str, underscored: bool = False) -> tuple[str, int, str | None, bool] | None:
        """(block list, block, our module name or None, named under the reference stream) of a module path
        ``ref_blocks.3.attn1.to_q`` (kohya's ``blocks_3_attn1_to_q`` when ``underscored``); None when it names no
        block of this model."""
        sep = "_" if underscored else "."
        for name in sorted(self.linears, key=len, reverse=True):
            head = f"{name}{sep}"
            if not path.startswith(head):
                continue
            index, found, module = path[len(head):].partition(sep)
            if not index.isdigit() or not found:
                continue
            spellings = {m: m for m in self.linears[name]} | {a: o for a, o in self.aliases.items()
                                                               if o in self.linears[name]}
            if underscored:
                spellings = {k.replace(".", "_"): v for k, v in spellings.items()}
            return name, int(index), spellings.get(module), name not in self.reference_of
        return None


@dataclass(frozen=True)
class ScaleRule:
    """How the adapter's pairs scale (module docstring): a convention, the config's alpha and rank, and
    ``load_denoiser``'s outright ``lora_scale``."""

    convention: str = "alpha_over_rank"
    alpha: float | None = None
    rank: int | None = None
    override: float | None = None

    @classmethod
    def from_config(cls, config, override: float | None = None) -> "ScaleRule":
        if config.lora_convention not in LORA_CONVENTIONS:
            raise AdapterError(f"lora_convention must be one of {LORA_CONVENTIONS}, got {config.lora_convention!r}")
        if config.lora_rank is not None and config.lora_rank < 1:
            raise AdapterError(f"lora_rank must be >= 1, got {config.lora_rank}")
        return cls(config.lora_convention, config.lora_alpha, config.lora_rank, override)

    def scale(self, target: str, pair: LoraPair) -> tuple[float, str]:
        """(scale, how it was found) of one pair."""
        r = pair.rank
        if self.rank is not None and r != self.rank:
            raise AdapterError(f"adapter LoRA for {target} ({pair.name}) has rank {r}, the config's lora_rank is "
                               f"{self.rank}")
        alpha, source, rslora = self._alpha(target, pair)  # checks a PEFT config's rank even when overridden
        if self.override is not None:
            return self.override, "lora_scale given at load (replaces the file's)"
        if self.convention == "mvi2v":
            if rslora:
                raise AdapterError(f"adapter LoRA for {target}: lora_convention 'mvi2v' (alpha not divided by the "
                                   f"rank) contradicts its PEFT config's use_rslora")
            alpha = 1.0 if alpha is None else alpha
            return alpha, f"alpha {alpha:g}, not divided by rank {r} (mvi2v; alpha from {source or 'the default, 1'})"
        if alpha is None:
            return 1.0, f"alpha = rank {r} (alpha_over_rank; no alpha given)"
        if rslora:
            return alpha / math.sqrt(r), f"alpha {alpha:g} / sqrt(rank {r}) (rsLoRA; alpha from {source})"
        return alpha / r, f"alpha {alpha:g} / rank {r} (alpha_over_rank; alpha from {source})"

    def _alpha(self, target: str, pair: LoraPair) -> tuple[float | None, str | None, bool]:
        """(alpha, where from, rsLoRA) by the module docstring's precedence."""
        peft_alpha, rslora = _peft_alpha(target, pair) if pair.peft is not None else (None, False)
        if self.alpha is not None:
            return self.alpha, "the config's lora_alpha", rslora
        if pair.alpha is not None:
            return pair.alpha, "the kohya .alpha tensor", rslora
        if peft_alpha is not None:
            return peft_alpha, "the PEFT config", rslora
        return None, None, rslora


def _peft_alpha(target: str, pair: LoraPair) -> tuple[float, bool]:
    """PEFT's alpha for the pair's module (its alpha/rank patterns, else ``lora_alpha``/``r``), after checking the
    rank it states; and whether it scales by sqrt(r) (rsLoRA)."""
    from peft.utils.other import get_pattern_key

    config = pair.peft
    ranks, alphas = config.rank_pattern or {}, config.alpha_pattern or {}
    r = ranks.get(get_pattern_key(ranks.keys(), pair.name), config.r)
    if r != pair.rank:
        raise AdapterError(f"adapter LoRA for {target} ({pair.name}) has rank {pair.rank}, its PEFT config says {r}")
    return alphas.get(get_pattern_key(alphas.keys(), pair.name), config.lora_alpha), bool(config.use_rslora)


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _lora_part(raw_key: str, key: str, naming: AdapterNaming):
    """(block list, block, our module or None, named under the reference stream, A/B/alpha kind, module as named)
    of a LoRA key, or None for a key that is no LoRA of a block (a ``.alpha`` of no block linear may be a full
    tensor)."""
    kohya = _KOHYA.match(raw_key)
    if kohya:
        found = naming.target(kohya[1], underscored=True)
        return None if found is None else (*found, kohya[2], raw_key.split(".")[0])
    dotted = _DOTTED.match(key)
    if dotted:
        found = naming.target(dotted[1])
        return None if found is None else (*found, dotted[2], dotted[1])
    alpha = _DOTTED_ALPHA.match(key)
    found = naming.target(alpha[1]) if alpha else None
    if found is not None and found[2] is not None:
        return (*found, "alpha", alpha[1])
    return None


def parse_adapter_tensors(tensors: dict[str, torch.Tensor], adapter: ReferenceAdapter, naming: AdapterNaming,
                          peft=None) -> None:
    """Sort one file's tensors into ``adapter``'s LoRA pairs and full tensors (its ``blocks_lora`` routes the
    pairs named after a video block list, ``blocks.N``); ``peft``: the file's PEFT LoraConfig, if any."""
    unknown, duplicate = [], []
    earlier, seen = set(adapter.loras), set()  # pairs of other files; (target, A/B/alpha) of this one
    for raw_key, tensor in tensors.items():
        key = _strip_prefix(raw_key)
        part = _lora_part(raw_key, key, naming)
        if part is None and not _LORA_LIKE.search(key):
            if key in adapter.tensors:
                duplicate.append(key)
            adapter.tensors[key] = tensor
            continue
        if part is None or part[2] is None:  # no block, or no linear of one
            unknown.append(raw_key)
            continue
        blocks, block, module, ref_named, kind, name = part
        if not ref_named and adapter.blocks_lora == "reference":
            blocks = naming.reference_of[blocks]
        target = f"{blocks}.{block}.{module}"
        kind = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(kind, kind)
        if target in earlier or (target, kind) in seen:
            duplicate.append(target)
        seen.add((target, kind))
        pair = adapter.loras.setdefault(target, LoraPair(peft=peft, name=name))
        if kind == "lora_A":
            pair.down = tensor
        elif kind == "lora_B":
            pair.up = tensor
        else:
            pair.alpha = float(tensor.reshape(-1)[0])
    if unknown:
        raise AdapterError(
            f"adapter LoRA key(s) not understood: {few_names(unknown)}; a LoRA in an adapter must be on a block linear "
            f"{sorted(set().union(*naming.linears.values()))} (PEFT, kohya{' or original' if naming.aliases else ''} "
            f"names); LoRAs on other modules of the video stream go in the file mvgen_config.json names as video_lora"
        )
    if duplicate:
        video, ref = next(iter(naming.reference_of.items()))
        why = (f" (LoRA pairs named {video}.N change {ref}.N unless mvgen_config.json says "
               "\"blocks_lora\": \"video\")" if adapter.blocks_lora == "reference" else "")
        raise AdapterError(f"adapter gives these twice: {few_names(set(duplicate))}{why}")


def read_adapter(path: str | Path, naming: AdapterNaming, read_tensors=None) -> ReferenceAdapter:
    """Read a ``.safetensors`` adapter file or an adapter folder (safetensors only), with the settings its
    ``mvgen_config.json`` and PEFT config give (module docstring), for a backbone that names its linears as
    ``naming`` says; ``read_tensors(file)``: another spelling's file read into this format's names (Stand-In's)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter not found: {path}")
    folder = path if path.is_dir() else path.parent
    adapter = _settings(folder)
    if path.is_dir():
        files = sorted(f for f in path.glob("*.safetensors") if f != adapter.video_lora)
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = f" (found {pickles}: pickled weights are never loaded)" if pickles else ""
            raise AdapterError(f"no .safetensors adapter in {path}{hint}")
    elif path.suffix != ".safetensors":
        raise AdapterError(f"adapter must be a .safetensors file or a folder of them, got {path.name}")
    else:
        files = [path]
    for file in files:
        before = set(adapter.loras)
        tensors = read_tensors(file) if read_tensors is not None else load_safetensors(file, AdapterError)
        parse_adapter_tensors(tensors, adapter, naming, _peft_config(file))
        _check_peft_config_applies(file, set(adapter.loras) - before)
    halves = [target for target, pair in adapter.loras.items() if pair.down is None or pair.up is None]
    if halves:
        raise AdapterError(f"adapter LoRA missing its down/A or up/B half for: {few_names(halves)}")
    return adapter


def _settings(folder: Path) -> ReferenceAdapter:
    """An empty adapter with the settings of the folder's ``mvgen_config.json`` (and PEFT's lora_alpha)."""
    adapter = ReferenceAdapter()
    mvgen_config = folder / "mvgen_config.json"
    if not mvgen_config.is_file():
        return adapter
    values = read_json(mvgen_config, AdapterError, "mvgen config")
    adapter.blocks_lora = values.get("blocks_lora", "reference")
    if adapter.blocks_lora not in BLOCKS_LORA:
        raise AdapterError(f"{mvgen_config}: blocks_lora must be one of {BLOCKS_LORA}, got {adapter.blocks_lora!r}")
    video_lora = values.get("video_lora")
    if video_lora is not None:
        if not isinstance(video_lora, str) or not video_lora.endswith(".safetensors"):
            raise AdapterError(f"{mvgen_config}: video_lora must name a .safetensors file of the adapter folder, "
                               f"got {video_lora!r}")
        adapter.video_lora = folder / video_lora
        if not adapter.video_lora.is_file():
            raise AdapterError(f"{mvgen_config}: video_lora {video_lora!r} is not a file in {folder}")
    return adapter


def _peft_config(file: Path):
    """The file's PEFT LoraConfig (diffusers' header metadata, or PEFT's adapter_config.json beside
    adapter_model.safetensors): the same reading as the base-LoRA merge, DoRA refused."""
    from .base_lora import _adapter_config

    return _adapter_config(file)


def _check_peft_config_applies(file: Path, new_pairs: set[str]) -> None:
    """PEFT writes adapter_config.json for adapter_model.safetensors; beside a LoRA of another name it is
    ambiguous which alpha the pairs have, so say so rather than guess."""
    beside = file.parent / "adapter_config.json"
    if new_pairs and beside.is_file() and file.name != "adapter_model.safetensors":
        raise AdapterError(f"{beside} describes adapter_model.safetensors (PEFT's name), and {file.name} holds LoRA "
                           f"pairs: rename it adapter_model.safetensors, or state lora_alpha in mvgen_config.json "
                           f"and remove adapter_config.json")


@dataclass(frozen=True)
class LowRankDelta:
    """One adapter pair, checked and scaled: ``W + scale * B @ A``. Merged into a weight at load, or applied unmerged
    on a weight the reference stream shares with the video stream (``engine.adapters.reference_weights``)."""

    down: torch.Tensor  # A [rank, in]
    up: torch.Tensor  # B [out, rank]
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + scale * B @ A`` in float32, cast back to the weight's dtype."""
        delta = self.scale * (self.up.float() @ self.down.float())
        return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def adapter_deltas(adapter: ReferenceAdapter, rule: ScaleRule, shapes: dict[str, torch.Size],
                   naming: AdapterNaming) -> tuple[dict[str, LowRankDelta], dict[str, Counter]]:
    """Every pair by its target module, checked against the shape of the weight it changes (``shapes``: the model's
    tensor shapes by name) and scaled by ``rule``; and the scales used, counted per stream
    (``{"reference"|"video": Counter({(scale, how): modules})}``) for the log."""
    deltas, used = {}, {}
    for target, pair in sorted(adapter.loras.items()):
        blocks, block = target.split(".")[:2]
        if int(block) >= naming.blocks[blocks]:
            raise AdapterError(f"adapter targets {target} but the model has {naming.blocks[blocks]} blocks")
        if f"{target}.weight" not in shapes:
            raise AdapterError(f"adapter LoRA for {target}: this model has no such linear (a CLIP image projection on "
                               f"a checkpoint without CLIP?)")
        shape = tuple(shapes[f"{target}.weight"])
        rank_ok = pair.down.ndim == 2 and pair.up.ndim == 2 and pair.down.shape[0] == pair.up.shape[1]
        if not rank_ok or (pair.up.shape[0], pair.down.shape[1]) != shape:
            raise AdapterError(
                f"adapter LoRA for {target} has A {list(pair.down.shape)} / B {list(pair.up.shape)}, "
                f"which does not fit the weight {list(shape)}"
            )
        scale, how = rule.scale(target, pair)
        deltas[target] = LowRankDelta(pair.down, pair.up, scale)
        stream = "video" if blocks in naming.reference_of else "reference"
        used.setdefault(stream, Counter())[(scale, how)] += 1
    return deltas, used


def merge_deltas(state: dict[str, torch.Tensor], deltas: dict[str, LowRankDelta]) -> None:
    """``W += scale * B @ A`` for each target's weight in ``state`` (entries are replaced)."""
    for target, delta in deltas.items():
        state[f"{target}.weight"] = delta.merged(state[f"{target}.weight"])


def describe_scales(used: dict[str, Counter]) -> list[str]:
    """One phrase per stream: ``reference-stream LoRA on 20 modules: scale 2 = alpha 8 / rank 4 (...)``."""
    return [f"{stream}-stream LoRA on {sum(counts.values())} module(s): "
            + ", ".join(f"scale {scale:.6g} = {how}" + (f" on {n}" if len(counts) > 1 else "")
                        for (scale, how), n in sorted(counts.items()))
            for stream, counts in sorted(used.items())]


def few_names(names) -> str:
    """The first few of ``names``, sorted, and how many there are (for one line of an error)."""
    names = sorted(names)
    return f"{names[:_SHOWN]}{' ...' if len(names) > _SHOWN else ''} ({len(names)} in all)"
