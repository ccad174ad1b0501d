"""The one block driver of the Wan denoiser: every layer runs the video stream and one reference source through one
joint attention, whatever the mode.

A call's streams are data. The video rows (``VideoRows``) are absent when a reference stream runs alone (a cache
being built, PPA's reference features). The reference source is one of
- ``LiveReference``: the reference tokens run beside the video (MVI2V dual stream, Token-Concat), queries and keys;
- ``CachedReference``: per-layer keys/values a request computed once (``isolated`` + ``zero`` timestep);
- ``PrototypeReference``: ProFashion PPA's per-frame prototypes, aggregated per layer from reference features;
- ``IsolatedReference``: the reference stream alone, keeping each layer's normalised, unrotated K/V (or PPA's
  features of its attention input) for one of the two above.
Modes that change what the video rows read are hooks on the block (``ViewAttentionHook``: MVAnimate's Eq. 2);
M2HVideo's identity rides in the cross-attention context. Sequence parallel enters through each stream's
``tokens`` (the joint attention's all-to-alls), the step cache around the whole stack (``MultiViewWanTransformer``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from .joint_attention import StreamQKV


@dataclass
class VideoRows:
    """The video tokens a rank holds [B, n_local, D] and what their blocks read: positions [n_local, 3], their RoPE
    table, the whole stream's token count under sequence parallel (None: held whole), the modulation input
    ``tproj`` [B, 6, D] and the cross-attention context (``engine.backbones.wan.model.Context``)."""

    x: torch.Tensor
    pos: torch.Tensor
    rope: tuple | None
    tokens: int | None
    tproj: torch.Tensor
    context: object


class ReferenceSource(Protocol):
    attention: dict  # the joint attention's mask arguments for this source ({}: the config's ref_attention)

    def layer(self, i: int, video_block) -> StreamQKV | None:
        """This layer's reference stream in the joint attention (None: none this layer)."""

    def attends(self, i: int) -> bool:
        """Whether the attention runs at layer i when there is no video stream."""

    def advance(self, i: int, rows: torch.Tensor) -> None:
        """The reference stream's own attention rows [B, n_ref, H, Dh] of layer i -> its next layer's tokens."""

    def view_keys(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every view's normalised, unrotated keys and values of layer i (MVAnimate's Eq. 2 reads them)."""


@dataclass
class LiveReference:
    """The reference tokens r [B, n_ref_local, D] run beside the video (each rank a shard under sequence parallel)
    through ``blocks`` (the reference stream's own, or the video's under Token-Concat)."""

    blocks: object  # i -> the reference stream's block of layer i
    r: torch.Tensor
    pos: torch.Tensor
    key_scale: torch.Tensor
    rope: tuple | None
    tokens: int | None
    tproj: torch.Tensor
    context: object
    num_layers: int
    sequence_parallel: object = None
    attention: dict = field(default_factory=dict)

    def layer(self, i: int, video_block) -> StreamQKV:
        block = self.blocks(i)
        self._mod = block.modulation(self.tproj)
        self._qkv = block.self_attention_stream(self.r, self._mod, self.pos, self.key_scale, tokens=self.tokens,
                                                rope=self.rope, role="reference")
        return self._qkv

    def attends(self, i: int) -> bool:
        return True

    def advance(self, i: int, rows: torch.Tensor) -> None:
        if i < self.num_layers - 1:  # the reference stream's last output is never read
            block = self.blocks(i)
            self.r = block.finish(self.r, rows, self._mod, self.context.kv(i, block))

    def view_keys(self, i: int):
        _, k = self.blocks(i).attn1.normed(self._qkv.q, self._qkv.k)
        v, sp = self._qkv.v, self.sequence_parallel
        if sp is not None:  # every view's keys and values, for this rank's video tokens
            k, v = sp.gather(k, self.tokens), sp.gather(v, self.tokens)
        return k, v


@dataclass
class CachedReference:
    """Per-layer reference K/V [B, n_ref, H, Dh] (before RoPE) of a ``ReferenceCache``, held whole by every rank."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: torch.Tensor
    key_scale: torch.Tensor
    rope: tuple | None
    attention: dict = field(default_factory=dict)

    def layer(self, i: int, video_block) -> StreamQKV:
        return StreamQKV(None, self.keys[i], self.values[i], self.pos, key_scale=self.key_scale, rope=self.rope,
                         role="reference")

    def attends(self, i: int) -> bool:
        return True

    def advance(self, i: int, rows: torch.Tensor) -> None:
        pass

    def view_keys(self, i: int):
        return self.keys[i], self.values[i]  # the cache holds exactly what Eq. 2 reads


@dataclass
class PrototypeReference:
    """ProFashion PPA (``engine.modes.prototype``): per layer, each frame's T prototype tokens aggregated from that
    layer's reference features (``features`` yields (k, v) [B, R*T, D] per layer: a cache, or an
    ``IsolatedReference`` advancing beside the video); video queries of frame i see every video key plus frame
    i's prototypes (held whole by every rank under sequence parallel)."""

    prototype: object  # PrototypeAggregator
    poses: object
    features: Iterator
    pos: torch.Tensor
    rope: tuple | None
    attention: dict

    def layer(self, i: int, video_block) -> StreamQKV:
        k_ref, v_ref = next(self.features)
        k_proto, v_proto = self.prototype.prototype_kv(i, self.poses, k_ref, v_ref, video_block.attn1)
        return StreamQKV(None, k_proto, v_proto, self.pos, rope=self.rope, role="reference")  # [B, F*T, H, Dh]

    def attends(self, i: int) -> bool:
        return True

    def advance(self, i: int, rows: torch.Tensor) -> None:
        pass

    def view_keys(self, i: int):
        raise ValueError("MVAnimate's multi-view attention reads the views, which PPA replaces by prototypes")


@dataclass
class IsolatedReference:
    """The reference stream run alone: each layer's attention input z, and its normalised, unrotated Q/K/V (the
    cache keeps K/V: ``kept``), at every layer (``keep_last``) or where its attention still runs."""

    blocks: object
    r: torch.Tensor
    pos: torch.Tensor
    key_scale: torch.Tensor
    tproj: torch.Tensor
    context: object
    num_layers: int
    keep_last: bool
    attention: dict = field(default_factory=dict)
    z: torch.Tensor | None = None
    kept: tuple | None = None

    def layer(self, i: int, video_block) -> StreamQKV | None:
        block = self.blocks(i)
        self._mod = block.modulation(self.tproj)
        self.z = block.attention_input(self.r, self._mod)
        if i == self.num_layers - 1 and not self.keep_last:
            self.kept = None
            return None
        q, k, v = block.attn1.project_qkv(self.z, self.z)
        self.kept = (k, v)
        return StreamQKV(q, k, v, self.pos, key_scale=self.key_scale, role="reference")

    def attends(self, i: int) -> bool:
        return i < self.num_layers - 1  # the reference stream's last output is never read

    def advance(self, i: int, rows: torch.Tensor) -> None:
        if self.attends(i):
            block = self.blocks(i)
            self.r = block.finish(self.r, rows, self._mod, self.context.kv(i, block))

    def view_keys(self, i: int):
        raise ValueError("a reference stream run alone has no video rows to align")


@dataclass
class ViewAttentionHook:
    """MVAnimate's Eq. 2 (``engine.modes.view_attention``) on the video rows of each layer: it reads the normalised,
    unrotated video queries and every view's keys/values at the aligned cells."""

    views: object  # ViewAttention
    first_token: int

    def __call__(self, i: int, block, rows: torch.Tensor, video: StreamQKV, reference: ReferenceSource):
        q, _ = block.attn1.normed(video.q, video.k)
        k_ref, v_ref = reference.view_keys(i)
        return self.views(rows, q, k_ref, v_ref, self.first_token)


def run_layers(model, video: VideoRows | None, reference: ReferenceSource | None, hooks=()) -> Iterator[int]:
    """Layer by layer (yielding each index once done): the video's and the reference source's streams in one joint
    attention, the hooks on the video rows, then each stream's output projection, cross-attention and FFN.
    ``video.x`` (and a live reference's ``r``) advance in place."""
    for i, block in enumerate(model.blocks):
        streams = []
        if video is not None:
            mod = block.modulation(video.tproj)
            video_qkv = block.self_attention_stream(video.x, mod, video.pos, tokens=video.tokens, rope=video.rope)
            streams.append(video_qkv)
        ref = reference.layer(i, block) if reference is not None else None
        if ref is not None:
            streams.append(ref)
        if video is None and not reference.attends(i):
            yield i
            continue
        attn = model._attend(streams, **(reference.attention if reference is not None else {}))
        n_video = 0
        if video is not None:
            n_video = video.x.shape[1]
            rows = attn[:, :n_video]
            for hook in hooks:
                rows = hook(i, block, rows, video_qkv, reference)
            video.x = block.finish(video.x, rows, mod, video.context.kv(i, block))
        if reference is not None:
            reference.advance(i, attn[:, n_video:])
        yield i
