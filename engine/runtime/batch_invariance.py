"""Batch invariance: a request's bits do not depend on which other requests share its denoiser batch.

Two layers of it:

- ``batch_invariant`` (always on): the layers whose GEMM has M = batch rows (the timestep MLP, the modulation
  tables, the patch convolution) run on zero-padded blocks of ``ROW_BLOCK`` rows. GEMM libraries pick their
  kernel by M, and for small M the kernels differ in their last bits (measured on this project's CPUs: M = 1
  and M = 2 of the same row differ), so without the blocks a request's timestep embedding would depend on how
  many rows share its batch. Cheap: these layers are a few hundred rows at most.
- ``BatchInvariantOps`` (``--deterministic``, the config's ``deterministic``): every other op whose reduction
  order could depend on the rows of the batch runs with tiles and splits chosen without looking at the batch.
  On the CPU every linear runs as GEMMs of a fixed ``TOKEN_BLOCK`` rows (a row's kernel then depends on neither
  its batch nor its sequence-parallel shard) and each batch row of a convolution is its own call; on CUDA the linears run ``kernels.batch_invariant_linear`` (a persistent Triton
  matmul whose tiles depend on N and K only, no split-K) and the attention runs the Triton kernel (its tiles are
  keyed on token counts, never on the batch; SDPA's flash kernels may split keys by batch size). Norms reduce
  within a token and attention within a (row, head) on every path, so they need nothing. Two elementwise ops
  do on the CPU: ATen's fused ``gelu(approximate="tanh")`` and ``silu`` kernels give a few elements other bits
  depending on where they sit in the tensor (measured on the AVX2 EPYC: 13-14 of ~40k elements differ between a
  tensor and its rows computed alone; ``tanh``, ``exp``, erf ``gelu`` and plain arithmetic never do), so a
  request's rows would depend on its batch and on its sequence-parallel shard (SDPA's Q.K^T GEMMs likewise take
  their M from the query rows: it runs on blocks of ``TOKEN_BLOCK`` queries). In the mode they are composed
  from those position-invariant ops: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` and ``x / (1 +
  exp(-x))``, the same functions to float32 rounding.

The mode is a ``TorchFunctionMode`` entered around one denoiser call (the documented way to swap the kernels
of ``F.linear`` for a region of code; SGLang and ``batch_invariant_ops`` register library overrides instead,
which would change every model of the process).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kernels import batch_invariant_linear

ROW_BLOCK = 8
# rows of every GEMM of a token-wise linear under the mode on the CPU: the CPU's GEMM picks its kernel by M
# (measured on the AVX2 EPYC: of a row computed in M = 25 rows and in M = 9, 7, 2 or 1, some differ), so a fixed M
# is what makes a token's bits independent of its batch and of the shard sequence parallel gives its rank
TOKEN_BLOCK = 64


def batch_invariant(fn, *tensors: torch.Tensor, block: int = ROW_BLOCK) -> torch.Tensor:
    """``fn`` over the rows of ``tensors`` (the same rows of each: ``fn(*tensors)``) in zero-padded blocks of
    ``block`` rows, so every GEMM inside sees the same M whatever the batch (module docstring). The token-wise
    layers have M = rows x tokens, where the default kernels measured row-invariant; ``--deterministic``
    guarantees it (``BatchInvariantOps``). Skipped in graph export (TensorRT chooses its own kernels)."""
    rows = tensors[0].shape[0]
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or rows == block:
        return fn(*tensors)
    padded = [torch.cat([t, t.new_zeros(-rows % block, *t.shape[1:])]) for t in tensors]
    return torch.cat([fn(*chunk) for chunk in zip(*(t.split(block) for t in padded))])[:rows]


_ROWWISE = {F.linear, F.conv1d, F.conv2d, F.conv3d}


class BatchInvariantOps(TorchFunctionMode):
    """Inside this mode a batched linear or convolution computes each row with the same kernel, tiles and
    reduction order it would use if the row were alone (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _POSITIONAL and args and isinstance(args[0], torch.Tensor) and not args[0].is_cuda:
            return _POSITIONAL[func](*args, **kwargs)
        if func in _ROWWISE and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if func is F.linear and x.is_cuda:
                # one launch: the kernel's tiles and K order depend on N and K only (kernels.batch_invariant)
                return batch_invariant_linear(x, *args[1:], **kwargs)
            if func is F.linear:  # [..., K]: GEMMs of a fixed number of rows
                return _blocked_linear(x, *args[1:], **kwargs)
            if func is not F.linear and x.shape[0] > 1:  # a convolution's batch: one call per row
                return torch.cat([func(row, *args[1:], **kwargs) for row in x.split(1)])
        return func(*args, **kwargs)


def _gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate != "tanh":  # erf's kernel is position-invariant
        return F.gelu(x, approximate=approximate)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _silu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def _blocked_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA with the queries in blocks of exactly ``TOKEN_BLOCK`` rows (the last zero-padded, its padded rows
    allowed every key): the CPU kernels' Q.K^T GEMMs take their M from the query rows, so a token's attention
    would depend on how many query rows its rank holds (Wan's cross-attention on a sequence-parallel shard)."""
    n = q.shape[-2]
    if is_causal or dropout_p or n == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
    pad = -n % TOKEN_BLOCK
    per_row = attn_mask is not None and attn_mask.shape[-2] == n and n > 1
    if pad:
        q = torch.cat([q, q.new_zeros(*q.shape[:-2], pad, q.shape[-1])], -2)
        if per_row:
            fill = attn_mask.new_ones if attn_mask.dtype == torch.bool else attn_mask.new_zeros
            attn_mask = torch.cat([attn_mask, fill(*attn_mask.shape[:-2], pad, attn_mask.shape[-1])], -2)
    outs = [F.scaled_dot_product_attention(
        block, k, v, attn_mask[..., start:start + TOKEN_BLOCK, :] if per_row else attn_mask, scale=scale, **kwargs)
        for start, block in zip(range(0, q.shape[-2], TOKEN_BLOCK), q.split(TOKEN_BLOCK, -2))]
    return torch.cat(outs, -2)[..., :n, :]


# CPU kernels whose bits depend on an element's (a query's) place in the tensor, composed of ones whose do not
_POSITIONAL = {F.gelu: _gelu, F.silu: _silu, F.scaled_dot_product_attention: _blocked_attention}


def _blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` over the rows of x [..., K] as GEMMs of exactly ``TOKEN_BLOCK`` rows (the last zero-padded), so
    every row goes through the same kernel whatever its batch, its sequence-parallel shard or its place."""
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k)
    count = rows.shape[0]
    padded = torch.cat([rows, rows.new_zeros(-count % TOKEN_BLOCK, k)]) if count % TOKEN_BLOCK else rows
    out = x.new_empty(padded.shape[0], n)
    for block, dest in zip(padded.split(TOKEN_BLOCK), out.split(TOKEN_BLOCK)):
        if bias is None:
            torch.mm(block, weight.t(), out=dest)
        else:
            torch.addmm(bias, block, weight.t(), out=dest)
    return out[:count].reshape(*x.shape[:-1], n)


def batch_invariant_ops(enabled: bool):
    """The ``BatchInvariantOps`` mode when ``enabled`` (the config's ``deterministic``), else nothing."""
    return BatchInvariantOps() if enabled and not torch.compiler.is_exporting() else contextlib.nullcontext()
