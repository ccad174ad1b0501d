"""The joint self-attention over a list of streams: one code path for every backbone.

A stream (``StreamQKV``) brings its own queries, keys and values (from its own weights, or the video stream's under
Token-Concat), its token positions and their RoPE table, per-key logit scales (MVAnimate's per-view omega), the QK
norm its weights carry, and a ``role``: ``video``, ``reference`` or ``text``. Roles order the joint sequence
``[video | reference | text]``, give the kernels' stream offsets (``kernels.attention``) and with them the mask
relations: ``ref_attention="isolated"`` lets reference queries see reference keys only, ``prototype`` gives each
video frame its own prototype keys, the text's padding is masked by per-row key lengths. Wan's dual stream is the
[video, reference] case (engine.backbones.wan.model), HunyuanVideo's triple stream the [video, reference, text] one
(engine.backbones.mmdit.model); a reference stream run alone (a cache being built) is the [reference] case.

Each stream goes through the QK prologue (its RMSNorm: Wan's across heads or HunyuanVideo's per head, RoPE at its
positions with the config's bands, the softmax scale into Q, its key scales into K) straight into its slice of the
joint Q/K; then one attention runs on the rotated tensors. Streams a rank holds a shard of (``tokens`` set) go
through the Ulysses all-to-alls of ``engine.runtime.parallel`` first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kernels import LOG2E, attention, kernel_backend, prologue_rope_table, qk_prologue

STREAM_ROLES = ("video", "reference", "text")  # the order of the joint sequence
# the config's qk_norm -> the prologue's RMSNorm layout (Wan: over every head of a token; HunyuanVideo: per head)
QK_NORMS = {"rms_norm_across_heads": "across_heads", "rms_norm": "per_head"}


@dataclass(frozen=True)
class QKNorm:
    """The RMSNorm weights a stream's Q and K take in the prologue (MMDiT text: the ``norm_added_q/k`` pair)."""

    norm_q: nn.Module
    norm_k: nn.Module


@dataclass
class StreamQKV:
    """One stream's share of a joint self-attention: its Q/K/V [B, N, H, Dh] (``q`` None: the stream gives keys
    only), positions [N, 3], per-key logit scales [N] or None, and ``norm``, the module (``norm_q``/``norm_k``) whose
    RMSNorm the QK prologue still applies (None: q/k are normalised already). ``tokens``: under sequence parallel,
    the stream's token count over all ranks when this rank holds a shard (``engine.runtime.parallel``); None when it holds
    the stream whole. ``rope``: the positions' (cos, sin), computed once per call for every layer (CPU path)."""

    q: torch.Tensor | None
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    norm: nn.Module | QKNorm | None = None
    key_scale: torch.Tensor | None = None
    tokens: int | None = None
    rope: tuple | None = None
    role: str = "video"


def stream_offsets(streams: list[StreamQKV], queries: bool) -> tuple[int, int]:
    """Where the reference and the text streams start in the joint queries (or keys): the kernels' offsets. A
    sharded stream counts its whole length (``tokens``): the attention runs after the all-to-all."""
    roles = [s.role for s in streams]
    if sorted(roles, key=STREAM_ROLES.index) != roles or len(set(roles)) != len(roles):
        raise ValueError(f"streams must come one per role in the order {STREAM_ROLES}, got {roles}")
    count = dict.fromkeys(STREAM_ROLES, 0)
    for s in streams:
        t = s.q if queries else s.k
        count[s.role] = 0 if t is None else (s.tokens if s.tokens is not None else t.shape[1])
    return count["video"], count["video"] + count["reference"]


class JointAttention:
    """The joint self-attention of a denoiser (a mixin: the model holds ``config`` and ``sequence_parallel``)."""

    def _attend(self, streams: list[StreamQKV], *, mask: str | None = None, tokens_per_frame: int = 1,
                proto_tokens: int = 1, key_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The attention rows [B, Nq, H, Dh] of the streams' queries, in stream order; ``mask`` defaults to the
        config's ``ref_attention``; ``key_lengths`` [B] masks each row's keys at or past its length (text padding)."""
        mask = mask or self.config.ref_attention
        if self.sequence_parallel is not None and any(s.tokens is not None for s in streams):
            return self._attend_sharded(streams, mask, tokens_per_frame, proto_tokens, key_lengths)
        first = streams[0].k
        b, _, heads, head_dim = first.shape
        n_q = sum(s.q.shape[1] for s in streams if s.q is not None)
        q_all = first.new_empty(b, n_q, heads, head_dim)
        k_all = first.new_empty(b, sum(s.k.shape[1] for s in streams), heads, head_dim)
        q_at = k_at = 0
        for s in streams:
            n_q_s, n_k_s = (0 if s.q is None else s.q.shape[1]), s.k.shape[1]
            self._prologue(s, q_all[:, q_at:q_at + n_q_s], k_all[:, k_at:k_at + n_k_s])
            q_at, k_at = q_at + n_q_s, k_at + n_k_s
        v_all = torch.cat([s.v for s in streams], 1) if len(streams) > 1 else streams[0].v
        return self._rotated_attention(q_all, k_all, v_all, stream_offsets(streams, True),
                                       stream_offsets(streams, False), mask, tokens_per_frame, proto_tokens,
                                       key_lengths)

    def _prologue(self, s: StreamQKV, out_q: torch.Tensor | None, out_k: torch.Tensor) -> None:
        cfg, norm = self.config, s.norm
        qk_prologue(s.q, s.k, s.pos, s.pos, weight_q=None if norm is None else norm.norm_q.weight,
                    weight_k=None if norm is None else norm.norm_k.weight, eps=cfg.eps,
                    q_scale=LOG2E / math.sqrt(s.k.shape[-1]), key_scale=s.key_scale, theta=cfg.rope_theta,
                    out_q=out_q, out_k=out_k, backend=kernel_backend(cfg.attention_backend), q_rope=s.rope,
                    k_rope=s.rope, norm=QK_NORMS[cfg.qk_norm], rope_axes=cfg.rope_axes_dim)

    def _rope(self, pos: torch.Tensor, like: torch.Tensor):
        """``pos``'s RoPE table for every layer of this call (None where the prologue kernel computes angles)."""
        cfg = self.config
        return prologue_rope_table(pos, cfg.attention_head_dim, like, cfg.rope_theta,
                                   kernel_backend(cfg.attention_backend), rope_axes=cfg.rope_axes_dim)

    def _attend_sharded(self, streams, mask, tokens_per_frame, proto_tokens, key_lengths) -> torch.Tensor:
        """Ulysses: each sharded stream's rotated Q/K and V [B, N/sp, H, D] become [B, N, H/sp, D] in one
        all-to-all (a stream held whole gives its keys for this rank's heads), the attention runs over every
        token on H/sp heads, and each query stream's rows go back to token shards [B, N/sp, H, D]."""
        sp = self.sequence_parallel
        queries, keys, values, rows = [], [], [], []
        for s in streams:
            q = None if s.q is None else torch.empty_like(s.q)
            k = torch.empty_like(s.k)
            self._prologue(s, q, k)
            if s.tokens is None:
                if q is not None:
                    raise ValueError("under sequence parallel, a stream every rank holds whole gives keys only")
                keys.append(sp.head_slice(k))
                values.append(sp.head_slice(s.v))
                continue
            parts = sp.tokens_to_heads(torch.stack([k, s.v] if q is None else [q, k, s.v]), s.tokens).unbind(0)
            if q is not None:
                queries.append(parts[0])
                rows.append(s.tokens)
            keys.append(parts[-2])
            values.append(parts[-1])
        attn = self._rotated_attention(torch.cat(queries, 1), torch.cat(keys, 1), torch.cat(values, 1),
                                       stream_offsets(streams, True), stream_offsets(streams, False), mask,
                                       tokens_per_frame, proto_tokens, key_lengths)
        return torch.cat([sp.heads_to_tokens(part, n) for part, n in zip(attn.split(rows, 1), rows)], 1)

    def _rotated_attention(self, q, k, v, q_offsets, k_offsets, mask, tokens_per_frame, proto_tokens,
                           key_lengths) -> torch.Tensor:
        """Attention on the prologue's outputs (``kernels.attention``); the ONNX export's plugin swaps this.
        Deterministic on CUDA, ``auto`` takes the Triton kernel: its tiles never depend on the batch, while SDPA's
        flash kernels may split the keys by batch size (``engine.runtime.batch_invariance``). With
        ``attention_precision="int8"`` the quantisation runs here, after the Ulysses all-to-all: each rank holds
        every token of its heads, so K's smoothing mean is the whole sequence's."""
        backend = self.config.attention_backend
        if backend == "auto" and self.config.deterministic and q.is_cuda:
            backend = "triton"
        return attention(q, k, v, q_offsets=q_offsets, k_offsets=k_offsets, key_lengths=key_lengths, mask=mask,
                         tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens, backend=backend,
                         precision=self.config.attention_precision)
