"""``engine.runtime.reference_cache.ReferenceCacheStore`` (bounded, least recently used first) and ``ReferenceCache.cat``."""
from __future__ import annotations

import pytest
import torch

from engine.runtime.caches import ReferenceCache
from engine.runtime.reference_cache import ReferenceCacheStore
from engine.errors import MISS_PREFIX, ReferenceCacheMiss

LAYOUT = (2, (4, 6), (2, 4, 6))  # num_refs, ref_hw, video_fhw


def _cache(gen: torch.Generator, rows: int = 2, layers: int = 2, tokens: int = 3, dim: int = 4,
           dtype=torch.float32, layout=LAYOUT) -> ReferenceCache:
    """A real cache of ``layers`` K and V tensors [rows, tokens, 2 heads, dim]: rows*tokens*8*dim*layers elements."""
    t = lambda: torch.randn(rows, tokens, 2, dim, generator=gen).to(dtype)  # noqa: E731
    return ReferenceCache([t() for _ in range(layers)], [t() for _ in range(layers)], *layout)


def _of_bytes(gen: torch.Generator, nbytes: int) -> ReferenceCache:
    """A float32 cache of exactly ``nbytes`` (a multiple of 64)."""
    cache = _cache(gen, rows=1, layers=1, tokens=nbytes // 64, dim=4)
    assert cache.nbytes == nbytes
    return cache


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(hash(request.node.name) % 2**31)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,layers,tokens", [(1, 1, 1), (2, 3, 5)])
def test_nbytes_counts_every_key_and_value(gen, dtype, rows, layers, tokens):
    cache = _cache(gen, rows, layers, tokens, dtype=dtype)
    tensors = [*cache.keys, *cache.values]
    assert cache.nbytes == sum(t.untyped_storage().nbytes() for t in tensors) == \
        2 * layers * rows * tokens * 2 * 4 * torch.finfo(dtype).bits // 8


def test_least_recently_used_goes_first(gen):
    store = ReferenceCacheStore(max_bytes=3 * 640)
    caches = {key: _of_bytes(gen, 640) for key in "abcd"}
    for key in "abc":
        store.put(key, caches[key])
    assert len(store) == 3 and store.nbytes == 3 * 640
    assert store.get("a") is caches["a"]  # a is now the most recently used: b is the oldest
    store.put("d", caches["d"])
    assert [k in store for k in "abcd"] == [True, False, True, True]
    assert store.get("b") is None
    assert store.builds == 4


def test_the_newest_stays_even_when_it_alone_exceeds_the_bound(gen):
    store = ReferenceCacheStore(max_bytes=1000)
    store.put("small", _of_bytes(gen, 640))
    big = _of_bytes(gen, 1280)
    store.put("big", big)
    assert "small" not in store and store.get("big") is big and store.nbytes == 1280
    store.put("small", _of_bytes(gen, 640))  # the big one is now the oldest and goes
    assert "big" not in store and len(store) == 1


@pytest.mark.parametrize("seed", range(4))
def test_random_puts_gets_and_drops_keep_the_most_recent_that_fit(seed):
    """After every put: the newest is held, the bound holds (unless the newest alone exceeds it), the held keys are
    the most recently used ones, and the most recent key that was let go would not have fitted."""
    gen = torch.Generator().manual_seed(seed)
    bound = 64 * 20
    store = ReferenceCacheStore(bound)
    recency: list[str] = []  # every key ever put or got, least recent first (dropped ones removed)
    sizes: dict[str, int] = {}
    for _ in range(200):
        key = f"k{torch.randint(0, 8, (), generator=gen).item()}"
        action = torch.randint(0, 4, (), generator=gen).item()
        if action == 0:
            was_held = key in store
            assert store.drop(key) == was_held and key not in store
            recency = [k for k in recency if k != key]
            continue
        if action == 1:
            if store.get(key) is not None:
                recency = [k for k in recency if k != key] + [key]
            continue
        sizes[key] = 64 * int(torch.randint(1, 12, (), generator=gen))
        store.put(key, _of_bytes(gen, sizes[key]))
        recency = [k for k in recency if k != key] + [key]
        held = [k for k in recency if k in store]
        assert held[-1] == key
        assert store.nbytes == sum(sizes[k] for k in held)
        assert store.nbytes <= bound or len(store) == 1
        assert held == recency[len(recency) - len(held):], "a less recent key outlived a more recent one"
        let_go = recency[:len(recency) - len(held)]
        if let_go:
            assert store.nbytes + sizes[let_go[-1]] > bound, "a key was dropped that would have fitted"
        recency = held


def test_drop_and_bad_bound(gen):
    store = ReferenceCacheStore(1 << 20)
    store.put("a", _cache(gen))
    assert store.drop("a") and not store.drop("a") and len(store) == 0 and store.nbytes == 0
    for bound in (0, -1):
        with pytest.raises(ValueError, match="> 0 bytes"):
            ReferenceCacheStore(bound)
    miss = ReferenceCacheMiss("req-1")
    assert str(miss).startswith(MISS_PREFIX) and "req-1" in str(miss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(2, 2), (1, 2), (2, 1, 2)])
@pytest.mark.parametrize("pad", [0, "exact", 3])  # none, to the rows there are, 3 rows more
def test_cat_stacks_every_layer_and_pads_with_row_zero(gen, dtype, rows, pad):
    caches = [_cache(gen, r, layers=3, dtype=dtype) for r in rows]
    total = sum(rows)
    pad_to = {0: 0, "exact": total, 3: total + 3}[pad]
    out = ReferenceCache.cat(caches, pad_to)
    assert out.layout == LAYOUT and out.rows == max(total, pad_to)
    for name in ("keys", "values"):
        for layer in range(3):
            want = torch.cat([getattr(c, name)[layer] for c in caches])
            got = getattr(out, name)[layer]
            assert torch.equal(got[:total], want)
            for row in range(total, pad_to):
                assert torch.equal(got[row], want[0])


def test_cat_of_one_unpadded_cache_is_that_cache_and_layouts_must_agree(gen):
    cache = _cache(gen)
    assert ReferenceCache.cat([cache]) is cache and ReferenceCache.cat([cache], cache.rows) is cache
    padded = ReferenceCache.cat([cache], 5)
    assert padded.rows == 5 and torch.equal(padded.keys[1][4], cache.keys[1][0])
    other = _cache(gen, layout=(1, (4, 6), (2, 4, 6)))
    with pytest.raises(ValueError, match="different layouts"):
        ReferenceCache.cat([cache, other])
