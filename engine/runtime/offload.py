"""The denoiser's weights in host memory between uses (``--offload``), moved to the device when a call needs them.

``model`` (diffusers' model CPU offload): the whole denoiser goes to the device when a call first touches it and
back when the model's ``forward`` returns (a reference or context precompute, which ``Denoiser.run`` follows with
the forward, leaves it there until then). ``block`` (diffusers' group offloading at block level, one block per
group): layer i, ``blocks[i]`` with ``ref_blocks[i]``, goes to the device when the model reaches it and back once
``WINDOW`` later layers have been reached, the rest when the forward returns; the embeddings, the timestep
projection and the head (about 2% of Wan 14B's parameters) stay on the device. Weights only ever travel host -> device: the
host copy is kept (pinned on CUDA, so the copies are asynchronous) and "offloading" points each parameter back
at it, so nothing is copied back and no bit changes.

Why not ``diffusers.hooks.apply_group_offloading``: its hooks wrap each block's ``forward``, and our blocks are
never called through ``forward`` (the model calls ``block.modulation``, ``self_attention_stream`` and ``finish``
around the joint attention of several streams, ``engine.backbones.wan.model``). Applied to the tiny model, diffusers
onloaded its top-level group only; every layer's group stayed on the host, which on a GPU is a device mismatch
at the first layer. So a layer is onloaded here when the model *reaches* it: ``blocks`` and ``ref_blocks`` are
swapped for ``OffloadedBlocks`` (an object swap, not a patched method), a ModuleList that onloads layer i when
indexed or iterated to i, whichever code path does it (forward, ``precompute_reference``,
``precompute_context``). ``model`` also onloads at any submodule's forward.

Transfers run on the compute stream (copies from pinned memory are asynchronous for the host, ordered for the
device): they do not overlap compute. Prefetching layer i+1 on a side stream would; not done here.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

log = logging.getLogger("mvgen.offload")

OFFLOAD_MODES = ("none", "model", "block")
# layers on the device at once under ``block``: PPA's reference stream (``_prototype_reference_features``, a
# generator zipped with the video loop) finishes layer i after the video loop has reached layer i + 1
WINDOW = 2


def check_offload(mode: str, device: str | torch.device) -> None:
    """Refuse an unknown mode, and offloading on the CPU: there the weights already live in host memory, so there
    is nothing to move (``apply_offload`` itself runs anywhere: tests drive it with both devices the CPU)."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
    if mode != "none" and torch.device(device).type == "cpu":
        raise ValueError(f"offload {mode!r} moves the denoiser between host memory and an accelerator, and the device "
                         f"is the CPU, where it already is in host memory: use offload 'none' or a CUDA device")


class TensorGroup:
    """The parameters and buffers of some modules, each storage once (a shared reference stream's tensors are the
    video stream's, ``engine.adapters.reference_weights``), movable together between host and device.

    ``host`` holds each tensor's host copy; ``parked`` what a tensor points at while offloaded (its host copy;
    CPU tests point it at poison to catch a weight used while offloaded).
    """

    def __init__(self, modules: list[nn.Module], device: torch.device):
        self.device = device
        self.host: list[torch.Tensor] = []
        self.slots: list[tuple[nn.Module, str, bool, int]] = []  # (owner, name, is a parameter, index into host)
        first: dict[int, int] = {}
        for module in modules:
            for owner in module.modules():
                for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
                    for name, tensor in table.items():
                        if tensor is None:
                            continue
                        if id(tensor) not in first:
                            first[id(tensor)] = len(self.host)
                            self.host.append(_host_copy(tensor, device))
                        self.slots.append((owner, name, is_param, first[id(tensor)]))
        self.parked = list(self.host)
        self.offload()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def onload(self) -> None:
        self._point_at([t.to(self.device, non_blocking=True) for t in self.host])

    def offload(self) -> None:
        self._point_at(self.parked)

    def _point_at(self, tensors: list[torch.Tensor]) -> None:
        for owner, name, is_param, i in self.slots:
            if is_param:
                owner._parameters[name].data = tensors[i]
            else:
                owner._buffers[name] = tensors[i]


class Offload:
    """The hooks of one offloaded denoiser: which layers are on the device, the moves, and their counts.

    ``groups``: one per layer (``block``) or one for the whole model (``model``). ``onloads`` counts group
    transfers to the device, ``peak_resident`` the most groups on the device at once (under ``block`` at most
    ``window``): on a GPU the latter bounds the denoiser's weight memory at ``peak_resident`` layers plus the rest.
    """

    def __init__(self, model: nn.Module, mode: str, device: str | torch.device, window: int = WINDOW):
        if mode not in OFFLOAD_MODES[1:]:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES[1:])} to apply, got {mode!r}")
        self.mode, self.window = mode, window
        self.device = torch.device(device)
        lists = [name for name, child in model.named_children() if isinstance(child, nn.ModuleList)]
        if mode == "model":
            self.groups = [TensorGroup([model], self.device)]
        else:
            members = [list(getattr(model, name)) for name in lists]
            depth = max(map(len, members), default=0)
            self.groups = [TensorGroup([blocks[i] for blocks in members if i < len(blocks)], self.device)
                           for i in range(depth)]
            _move_rest(model, lists, self.device)
        self.recent: OrderedDict[int, None] = OrderedDict()  # resident groups, least recently reached first
        self.onloads = 0
        self.peak_resident = 0
        for name in lists:
            setattr(model, name, OffloadedBlocks(getattr(model, name), self))
        model.register_forward_hook(lambda *_: self.release(), always_call=True)
        if mode == "model":  # whatever the call uses first, a submodule's forward or a block
            for module in model.modules():
                module.register_forward_pre_hook(lambda *_: self.reach(0))

    def reach(self, layer: int) -> None:
        """The model is about to use ``layer`` (``model``: anything): put it on the device, and under ``block``
        send the layer reached ``window`` layers ago back."""
        group = 0 if self.mode == "model" else layer
        if group in self.recent:
            self.recent.move_to_end(group)
            return
        self.groups[group].onload()
        self.onloads += 1
        self.recent[group] = None
        while len(self.recent) > self.window:
            self.groups[self.recent.popitem(last=False)[0]].offload()
        self.peak_resident = max(self.peak_resident, len(self.recent))

    def release(self) -> None:
        """The call is over: every group back to the host. Under ``model`` the freed blocks also leave PyTorch's
        CUDA cache, so the other processes on the GPU (the server's VAE and encoders) can use them between calls;
        under ``block`` the next layer reuses them within this process."""
        released = bool(self.recent)
        while self.recent:
            self.groups[self.recent.popitem(last=False)[0]].offload()
        if released and self.mode == "model" and self.device.type == "cuda":
            torch.cuda.empty_cache()


class OffloadedBlocks(nn.ModuleList):
    """``blocks``/``ref_blocks`` of an offloaded model: the same modules under the same names (``state_dict``
    keys unchanged), with layer i put on the device whenever the model indexes or iterates to it."""

    def __init__(self, blocks: nn.ModuleList, offload: Offload):
        super().__init__(list(blocks))
        self._offload = offload  # not a Module: no submodule, no state

    def __getitem__(self, index):
        if isinstance(index, slice):
            raise TypeError("an offloaded model's blocks are indexed or iterated one at a time, not sliced")
        index = index + len(self) if index < 0 else index
        self._offload.reach(index)
        return super().__getitem__(index)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def apply_offload(model: nn.Module, mode: str, device: str | torch.device) -> Offload | None:
    """Offload ``model`` (loaded in host memory) for calls on ``device``; None for ``"none"`` (the model was
    loaded onto the device)."""
    if mode == "none":
        return None
    offload = Offload(model, mode, device)
    sizes = [group.nbytes for group in offload.groups]
    log.info("offload %s: %d group(s), %.2f GiB in host memory, at most %d on %s at once (%.2f GiB)", mode,
             len(sizes), sum(sizes) / 2**30, min(offload.window, len(sizes)), offload.device,
             sum(sorted(sizes)[-offload.window:]) / 2**30)
    return offload


def _host_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor in host memory, pinned when the copies go to CUDA (so they can be asynchronous)."""
    host = tensor.detach().to("cpu")
    return host.pin_memory() if device.type == "cuda" else host


def _move_rest(model: nn.Module, lists: list[str], device: torch.device) -> None:
    """Everything but the block lists onto the device for good: embeddings, head, tables, mode modules."""
    for name, child in model.named_children():
        if name not in lists:
            child.to(device)
    for table in (model._parameters, model._buffers):
        for name, tensor in table.items():
            if tensor is None:
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.to(device)
            else:
                table[name] = tensor.to(device)
