"""What a denoiser keeps of a request between its steps: every block's cross-attention keys and values
(``ContextCache``) and the isolated reference stream's per-layer K/V (``ReferenceCache``), with the row
slicing and stacking that batching needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CrossKV:
    """One block's cross-attention keys and values [B, L, H, Dh]: text, image (I2V; None without CLIP) and
    identity (M2HVideo; None without an identity image)."""

    text: tuple[torch.Tensor, torch.Tensor]
    image: tuple[torch.Tensor, torch.Tensor] | None = None
    identity: tuple[torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in (self.text, self.image, self.identity) if pair is not None for t in pair]

    def map(self, fn) -> "CrossKV":
        """The same keys and values through ``fn`` (row selection, padding, concatenation helpers)."""
        def pair(p):
            return None if p is None else (fn(p[0]), fn(p[1]))

        return CrossKV(pair(self.text), pair(self.image), pair(self.identity))


@dataclass
class ContextCache:
    """Per layer, each stream's cross-attention keys and values (``CrossKV``) of one call's rows: what the text,
    CLIP image and identity states give, computed once per request (``precompute_context``) instead of at every
    step, where they never change. ``reference`` is None when the model has no reference stream of its own."""

    video: list[CrossKV]
    reference: list[CrossKV] | None

    @property
    def rows(self) -> int:
        return self.video[0].text[0].shape[0]

    @property
    def nbytes(self) -> int:
        layers = [*self.video, *(self.reference or [])]
        return sum(t.numel() * t.element_size() for kv in layers for t in kv.tensors())

    def map(self, fn) -> "ContextCache":
        return ContextCache([kv.map(fn) for kv in self.video],
                            None if self.reference is None else [kv.map(fn) for kv in self.reference])

    def rows_slice(self, start: int, count: int) -> "ContextCache":
        """Rows ``start`` .. ``start + count`` (past the last row, row 0 repeats: a padded batch)."""
        return self.map(lambda t: _pad_rows(t, start + count)[start:start + count])

    @classmethod
    def cat(cls, caches: list["ContextCache"], pad_to: int = 0) -> "ContextCache":
        """Several requests' caches stacked along the batch (rows padded by repeating row 0)."""
        if len(caches) == 1 and pad_to <= caches[0].rows:
            return caches[0]

        def stack(kvs: list[CrossKV]) -> CrossKV:
            def pair(pairs):
                return None if pairs[0] is None else tuple(_pad_rows(torch.cat(ts), pad_to) for ts in zip(*pairs))

            return CrossKV(pair([kv.text for kv in kvs]), pair([kv.image for kv in kvs]),
                           pair([kv.identity for kv in kvs]))

        video = [stack(list(layer)) for layer in zip(*(c.video for c in caches))]
        reference = (None if caches[0].reference is None
                     else [stack(list(layer)) for layer in zip(*(c.reference for c in caches))])
        return cls(video, reference)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t[:1].expand(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


@dataclass
class ReferenceCache:
    """Per-layer reference K/V (before RoPE) of an ``isolated`` + ``zero``-timestep reference stream (``prototype``
    mode: the references' attention input projected by the video blocks' K/V weights, ``engine.modes.prototype``)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_refs: int
    ref_hw: tuple[int, int]
    video_fhw: tuple[int, int, int]

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def layout(self) -> tuple:
        """What must agree for caches to share a batch: references, their grid and the video grid."""
        return self.num_refs, self.ref_hw, self.video_fhw

    def rows_slice(self, start: int, count: int) -> "ReferenceCache":
        """Rows ``start`` .. ``start + count`` of the batch (past the last row, row 0 repeats: a padded batch)."""
        def rows(t):
            if start + count > t.shape[0]:
                t = torch.cat([t, t[:1].expand(start + count - t.shape[0], *t.shape[1:])])
            return t[start:start + count]

        return ReferenceCache([rows(k) for k in self.keys], [rows(v) for v in self.values], *self.layout)

    @classmethod
    def cat(cls, caches: list["ReferenceCache"], pad_to: int = 0) -> "ReferenceCache":
        """The caches of several requests stacked along the batch (rows padded by repeating row 0)."""
        if len(caches) == 1 and pad_to <= caches[0].rows:
            return caches[0]
        if len({c.layout for c in caches}) != 1:
            raise ValueError(f"reference caches of different layouts cannot share a batch: {[c.layout for c in caches]}")

        def stack(tensors):
            out = torch.cat(tensors)
            return torch.cat([out, out[:1].expand(pad_to - out.shape[0], *out.shape[1:])]) if pad_to > out.shape[0] else out

        keys = [stack(list(layer)) for layer in zip(*(c.keys for c in caches))]
        values = [stack(list(layer)) for layer in zip(*(c.values for c in caches))]
        return cls(keys, values, *caches[0].layout)
