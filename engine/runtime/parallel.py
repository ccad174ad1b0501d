"""Ulysses sequence parallel and CFG parallel over torch.distributed process groups (NCCL on GPUs, gloo on CPU).

Layout of a world of ``sp`` x (2 with CFG parallel) ranks: rank = cfg_rank * sp + sp_rank. The ``sp`` ranks of
one CFG group hold a token shard of every sharded stream; around each joint attention one all-to-all trades
the token shard of the prologue's rotated Q/K and of V for a head shard of the full sequence, attention runs
over all tokens on ``heads / sp`` heads, and a second all-to-all returns the rows (DeepSpeed-Ulysses).
Everything else in a block is token-local. With CFG parallel the batch rows (cond | uncond) are split between
the two groups and gathered after the call; rows never interact in the denoiser, so this is exact.

Process groups are objects built from a store (``connect``), never torch's default group: a server that has
lost a worker drops its groups and builds new ones without process-wide state.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from ..errors import CollectiveError


@dataclass(frozen=True)
class ParallelLayout:
    """How one denoiser call is split: ``sp`` sequence-parallel ranks, times two with ``cfg_parallel``."""

    sp: int = 1
    cfg_parallel: bool = False

    def __post_init__(self):
        if not isinstance(self.sp, int) or self.sp < 1:
            raise ValueError(f"sp (sequence-parallel ranks) must be a positive integer, got {self.sp!r}")

    @property
    def world_size(self) -> int:
        return self.sp * (2 if self.cfg_parallel else 1)

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def check_heads(self, heads: int) -> None:
        """Ulysses gives each rank ``heads / sp`` heads: refused when they do not divide."""
        if heads % self.sp:
            raise ValueError(f"sequence parallel over sp={self.sp} ranks needs the head count to be divisible by "
                             f"sp; this model has {heads} heads (choose sp among "
                             f"{[d for d in range(1, heads + 1) if heads % d == 0]})")


class Collectives:
    """One process group with the three collectives the denoiser needs, counting the bytes this rank sends."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.bytes_sent = 0

    def _wait(self, work, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as error:  # gloo/NCCL report peers' failures as RuntimeError (or its subclasses)
            raise CollectiveError(f"{what} over {self.size} ranks: {str(error).splitlines()[0][:300]}") from None

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk j of dim 0 (of ``size`` equal chunks) goes to rank j; chunk j of the result came from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._wait(self.group.alltoall_base(out, x, [], [], dist.AllToAllOptions()), "all-to-all")
        self.bytes_sent += x.numel() * x.element_size() * (self.size - 1) // self.size
        return out

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.size)]
        self._wait(self.group.allgather([out], [x]), "all-gather")
        self.bytes_sent += x.numel() * x.element_size()
        return out

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the ranks (all ranks get it): small tensors, e.g. a step cache's statistics."""
        return torch.stack(self.all_gather(x)).sum(0)

    def broadcast(self, x: torch.Tensor, root: int = 0) -> torch.Tensor:
        """In place on every rank (``x`` must have the root's shape and dtype)."""
        options = dist.BroadcastOptions()
        options.rootRank = root
        self._wait(self.group.broadcast([x], options), "broadcast")
        return x


def _chunk_len(tokens: int, size: int) -> int:
    return -(-tokens // size)


class SequenceParallel:
    """The token shards of one CFG group and the all-to-alls of Ulysses attention over them."""

    def __init__(self, comm: Collectives):
        self.comm = comm

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def first_token(self, tokens: int) -> int:
        """Index of this rank's first token in a stream of ``tokens`` (its shard is contiguous)."""
        return self.rank * _chunk_len(tokens, self.size)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous share of ``x`` along ``dim``, zero-padded to ceil(N / sp) (the padding is
        computed like any token and dropped by ``tokens_to_heads`` and ``gather``)."""
        n = x.shape[dim]
        chunk = _chunk_len(n, self.size)
        pad = chunk * self.size - n
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim)
        return x.narrow(dim, self.rank * chunk, chunk).contiguous()

    def gather(self, x: torch.Tensor, tokens: int, dim: int = 1) -> torch.Tensor:
        """Every rank's shard of a sharded tensor joined along ``dim`` and cut to its ``tokens`` real tokens."""
        return torch.cat(self.comm.all_gather(x), dim).narrow(dim, 0, tokens)

    def tokens_to_heads(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """[..., N/sp, H, D] token shard -> [..., N, H/sp, D] head shard of the whole sequence (padding cut)."""
        *lead, chunk, heads, dim = x.shape
        sp = self.size
        parts = x.reshape(*lead, chunk, sp, heads // sp, dim).movedim(-3, 0)  # [sp(to), ..., chunk, H/sp, D]
        got = self.comm.all_to_all(parts)  # [sp(from), ..., chunk, H/sp, D]: rank r's tokens r*chunk...
        return got.movedim(0, -4).reshape(*lead, sp * chunk, heads // sp, dim).narrow(-3, 0, tokens)

    def heads_to_tokens(self, y: torch.Tensor, tokens: int) -> torch.Tensor:
        """Inverse of ``tokens_to_heads``: [..., N, H/sp, D] -> [..., N/sp (padded), H, D]."""
        *lead, n, heads_local, dim = y.shape
        sp = self.size
        chunk = _chunk_len(tokens, sp)
        if chunk * sp > n:
            y = torch.cat([y, y.new_zeros(*lead, chunk * sp - n, heads_local, dim)], -3)
        parts = y.reshape(*lead, sp, chunk, heads_local, dim).movedim(-4, 0)  # [sp(to), ..., chunk, H/sp, D]
        got = self.comm.all_to_all(parts)  # [sp(from: head group), ..., chunk, H/sp, D]
        return got.movedim(0, -3).reshape(*lead, chunk, sp * heads_local, dim)

    def head_slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a replicated [..., N, H, D] tensor (a stream every rank holds whole)."""
        heads = x.shape[-2] // self.size
        return x.narrow(-2, self.rank * heads, heads)


class CfgParallel:
    """The batch rows split between the two CFG groups (cond | uncond) and gathered after the call."""

    def __init__(self, comm: Collectives):
        self.comm = comm

    def rows(self, batch: int) -> tuple[int, int]:
        """(start, count) of this group's rows; an odd batch is padded by one row (repeating row 0)."""
        half = _chunk_len(batch, 2)
        return self.comm.rank * half, half

    def split(self, batch: int, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.dim() == 0 or t.shape[0] != batch:
            return t  # absent mode inputs travel empty
        start, count = self.rows(batch)
        if start + count > batch:
            t = torch.cat([t, t[:1].expand(start + count - batch, *t.shape[1:])])
        return t[start:start + count]

    def gather(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        return torch.cat(self.comm.all_gather(y))[:batch]


@dataclass
class ParallelRuntime:
    """This rank's view of a connected world: its layout, rank, and the groups it belongs to."""

    layout: ParallelLayout
    rank: int
    world: Collectives
    sp: SequenceParallel | None
    cfg: CfgParallel | None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def forward(self, model, inputs: dict, ref_cache=None, context_cache=None, step_cache=None) -> torch.Tensor:
        """``model(**inputs, ...)`` with this rank's CFG rows; every rank returns the whole output. A step cache
        decides over every rank's real rows and tokens (its sums are reduced over the world)."""
        if step_cache is not None:
            step_cache.reduce = self.world.sum
        if self.cfg is None:
            return model(**inputs, ref_cache=ref_cache, context_cache=context_cache, step_cache=step_cache)
        batch = inputs["latents"].shape[0]
        mine = {name: self.cfg.split(batch, t) for name, t in inputs.items()}
        start, count = self.cfg.rows(batch)
        ref_cache, context_cache = (None if c is None else c.rows_slice(start, count) for c in (ref_cache, context_cache))
        if step_cache is not None:  # this group's real rows of the batch's (the rest pad it)
            real = batch if step_cache.real_rows is None else step_cache.real_rows
            step_cache.real_rows = max(0, min(count, real - start))
        out = model(**mine, ref_cache=ref_cache, context_cache=context_cache, step_cache=step_cache)
        return self.cfg.gather(out, batch)


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _group(backend: str, store, rank: int, size: int, timeout: datetime.timedelta):
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def connect(layout: ParallelLayout, rank: int, store, device: torch.device | str = "cpu",
            timeout_s: float = 300.0) -> ParallelRuntime:
    """Build this rank's process groups over ``store`` (a ``torch.distributed.Store`` every rank shares): the
    world, its CFG group's sequence-parallel ranks, and its CFG peer. ``timeout_s`` bounds every collective: a
    dead or hung peer fails the call instead of blocking forever."""
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} outside a world of {layout.world_size}")
    backend, timeout = backend_for(device), datetime.timedelta(seconds=timeout_s)
    world = Collectives(_group(backend, dist.PrefixStore("world", store), rank, layout.world_size, timeout), rank,
                        layout.world_size)
    cfg_rank, sp_rank = divmod(rank, layout.sp)
    sp = cfg = None
    if layout.sp > 1:
        group = _group(backend, dist.PrefixStore(f"sp{cfg_rank}", store), sp_rank, layout.sp, timeout)
        sp = SequenceParallel(Collectives(group, sp_rank, layout.sp))
    if layout.cfg_parallel:
        group = _group(backend, dist.PrefixStore(f"cfg{sp_rank}", store), cfg_rank, 2, timeout)
        cfg = CfgParallel(Collectives(group, cfg_rank, 2))
    return ParallelRuntime(layout, rank, world, sp, cfg)
