"""Reference K/V caches of the requests in flight, keyed by request, bounded in bytes.

A reference stream that sees neither the video nor the step (``isolated`` + ``zero``) has the same K/V at
every step, so the denoiser computes it at a request's first step and reuses it until the request ends.
The in-process pipeline and the server's denoiser model keep them here; the generation loop drops its
entry when the request finishes, fails or is cancelled, and the byte bound drops the least recently used
entry first (a request whose entry was dropped gets ``ReferenceCacheMiss`` and sends its references again).
One store belongs to one denoiser, which runs one batch at a time, so no lock is needed.
"""
from __future__ import annotations

from collections import OrderedDict

from .caches import ReferenceCache


def expand_rows(cache: ReferenceCache, rows: int) -> ReferenceCache:
    """A one-row cache as ``rows`` rows, views of the one row (no copy): a reference stream that reads no prompt
    (``MvgenConfig.shares_reference_rows``) is stored once per request and serves each guidance row."""
    if cache.rows != 1:
        raise ValueError(f"only a one-row reference cache serves several rows, this one holds {cache.rows}")
    grow = (lambda t: t.expand(rows, *t.shape[1:]))  # noqa: E731
    return ReferenceCache([grow(k) for k in cache.keys], [grow(v) for v in cache.values], *cache.layout)


class ReferenceCacheStore:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"the reference cache bound must be > 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.builds = 0  # caches stored since start (a metric: one per request unless evicted)
        self._entries: OrderedDict[str, ReferenceCache] = OrderedDict()

    def get(self, key: str) -> ReferenceCache | None:
        cache = self._entries.get(key)
        if cache is not None:
            self._entries.move_to_end(key)
        return cache

    def put(self, key: str, cache: ReferenceCache) -> None:
        """Keep ``cache`` under ``key``; older entries go until the total fits (the new one always stays)."""
        self._entries[key] = cache
        self._entries.move_to_end(key)
        self.builds += 1
        while self.nbytes > self.max_bytes and len(self._entries) > 1:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> bool:
        return self._entries.pop(key, None) is not None

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries
