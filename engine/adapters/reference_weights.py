"""The reference stream's weights (``MvgenConfig.ref_weights``): shared with the video stream, or a merged copy.

MVI2V's reference stream is the video stream's blocks plus a LoRA, ``W + scale * B @ A`` (``engine.adapters.lora``).
``"merged"`` gives every reference block its own copy of every tensor with the LoRA merged: 1.88x the base model's
parameters (Wan 14B: ~26B, ~52 GB in bf16). ``"shared"`` (the default) makes each reference block hold the video
block's parameters themselves (the same ``nn.Parameter`` objects, one storage) and turns each Linear whose LoRA
falls on a shared weight into a ``LowRankLinear``, ``x W^T + b + scale * (x A^T) B^T``: two skinny matmuls on the
reference tokens only (and, with ``isolated`` + ``zero``, once per request), ~2% more parameters at rank 64 on
Wan 14B.

A reference block owns a tensor the adapter gives in full (``ref_blocks.3.scale_shift_table``, a norm, a bias, a
fully trained projection); a LoRA on such a weight merges into it, which costs no memory. The reference blocks stay
``StreamBlock`` modules of their own (forward hooks, PEFT injection and the names ``ref_blocks.N.*`` work as in
the merged model); ``state_dict()`` therefore lists a shared tensor under both names: count memory by storage
(``weight_bytes``).

Sharing is exact only when the reference stream is the video stream's final weights plus the reference deltas;
``why_not_shared`` names what breaks that, and ``engine.loading`` then loads the merged stream, saying why.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LowRankDelta, ReferenceAdapter, few_names


class LowRankLinear(nn.Linear):
    """A Linear over another stream's weight and bias (shared) plus its own unmerged LoRA:
    ``y = x W^T + b + scale * (x A^T) B^T``. ``lora_A`` [rank, in] and ``lora_B`` [out, rank] are bias-free
    Linears (PEFT's names) at the weight's dtype; ``scale`` is the one the merge would use (``lora.ScaleRule``)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **like)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **like)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the scale goes on the [N, rank] intermediate, the smallest tensor of the three
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x) * self.scale)

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B @ A`` in float32, cast back: the weight a merged reference stream holds."""
        return LowRankDelta(self.lora_A.weight, self.lora_B.weight, self.scale).merged(self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.out_features}, scale={self.scale:g}"


def why_not_shared(block_pairs: Sequence[tuple[str, str]], ref_keys: Collection[str],
                   adapter: ReferenceAdapter | None, base_loras: Sequence, lora_reference: bool) -> str | None:
    """Why the reference stream cannot share the video stream's weights exactly (None: it can). ``block_pairs``:
    (video blocks, reference blocks) names (a model's ``REFERENCE_BLOCKS``); ``ref_keys``: the reference blocks'
    tensor names (``ref_blocks.N.*``). Every change to a video block must reach the reference stream too, unless
    the reference stream owns that tensor (the adapter gives it in full)."""
    reasons = []
    if adapter is not None:
        own = {k for k in adapter.tensors if k in ref_keys}

        def shared(key: str) -> bool:
            ref = next((f"{r}.{key.removeprefix(v + '.')}" for v, r in block_pairs if key.startswith(f"{v}.")), None)
            return ref in ref_keys and ref not in own

        changed = [k for k in adapter.tensors if shared(k)] + [f"{t}.weight" for t in adapter.loras
                                                                if shared(f"{t}.weight")]
        if changed:
            reasons.append(f"the adapter changes the video stream's {few_names(changed)}, not the reference "
                           f"stream's")
        if adapter.video_lora is not None:
            reasons.append(f"its video_lora {adapter.video_lora.name} changes the video stream only")
    if base_loras and not lora_reference:
        reasons.append(f"base-model LoRA(s) {few_names(str(spec.path) for spec in base_loras)} merge into the "
                       f"video stream only (lora_reference is off)")
    return "; ".join(reasons) or None


def wrap_low_rank(model: nn.Module, targets: Mapping[str, tuple[int, float]]) -> None:
    """Replace each Linear named in ``targets`` (``ref_blocks.3.attn1.to_q`` -> (rank, scale)) by a
    ``LowRankLinear`` over its weight and bias (on a meta model, before the load assigns the tensors)."""
    for target, (rank, scale) in targets.items():
        parent_name, _, leaf = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent.register_module(leaf, LowRankLinear(getattr(parent, leaf), rank, scale))


def reference_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(video blocks, reference blocks) attribute names of the model's block lists whose modules share names
    (Wan: ``blocks``/``ref_blocks``; the MMDiT adds ``single_transformer_blocks``/``ref_single_blocks``); none for a
    model without a reference stream of its own (Token-Concat)."""
    return [(video, ref) for video, ref in model.REFERENCE_BLOCKS if getattr(model, ref, None) is not None]


def share_reference_stream(model: nn.Module, own: Collection[str] = ()) -> None:
    """Make every parameter of the reference blocks the video block's parameter of the same name (the same object:
    ``parameters()`` lists it once), except the names in ``own`` (``ref_blocks.N.*``) and those the video block
    lacks (a ``LowRankLinear``'s A and B)."""
    for video_name, ref_name in reference_pairs(model):
        for i, (block, ref_block) in enumerate(zip(getattr(model, video_name), getattr(model, ref_name))):
            video = dict(block.named_parameters())
            for name, _ in list(ref_block.named_parameters()):
                if name in video and f"{ref_name}.{i}.{name}" not in own:
                    module, _, leaf = name.rpartition(".")
                    setattr(ref_block.get_submodule(module), leaf, video[name])


def holds_shared_weights(model: nn.Module) -> bool:
    """Whether the reference stream shares a tensor with the video stream or applies a LoRA unmerged."""
    for video_name, ref_name in reference_pairs(model):
        video = {id(p) for p in getattr(model, video_name).parameters()}
        ref = getattr(model, ref_name)
        if any(id(p) in video for p in ref.parameters()) or any(isinstance(m, LowRankLinear) for m in ref.modules()):
            return True
    return False


@contextlib.contextmanager
def merged_reference_stream(model: nn.Module):
    """``model`` with a merged reference stream for the duration: each reference block an own copy of its tensors,
    each ``LowRankLinear`` a Linear holding ``merged_weight()``, so a traced graph holds plain weights under the
    names ``ref_blocks.N.*`` as a merged load gives them (the ONNX export, TensorRT refit). Costs one copy of the
    blocks while it lasts; the shared stream is back afterwards."""
    if not holds_shared_weights(model):
        yield model
        return
    shared = {ref_name: getattr(model, ref_name) for _, ref_name in reference_pairs(model)}
    for ref_name, blocks in shared.items():
        setattr(model, ref_name, nn.ModuleList(_merged_block(block) for block in blocks))
    try:
        yield model
    finally:
        for ref_name, blocks in shared.items():
            setattr(model, ref_name, blocks)


def _merged_block(block: nn.Module) -> nn.Module:
    merged = copy.deepcopy(block)  # a fresh memo: every tensor copied, shared ones included
    for name, module in list(merged.named_modules()):
        if isinstance(module, LowRankLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
            linear.bias = module.bias
            parent, _, leaf = name.rpartition(".")
            merged.get_submodule(parent).register_module(leaf, linear)
    return merged


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a loaded model's parameters and buffers, each storage once (a shared reference stream's tensors
    are the video stream's: ``state_dict()`` lists them twice)."""
    storages = {}
    for tensor in model.state_dict().values():
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
