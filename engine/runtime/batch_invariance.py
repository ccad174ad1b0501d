"""Batch invariance: a request's bits do not depend on which other requests share its denoiser batch.

Two layers of it:

- ``batch_invariant`` (always on): the layers whose GEMM has M = batch rows (the timestep MLP, the modulation
  tables, the patch convolution) run on zero-padded blocks of ``ROW_BLOCK`` rows. GEMM libraries pick their
  kernel by M, and for small M the kernels differ in their last bits (measured on this project's CPUs: M = 1
  and M = 2 of the same row differ), so without the blocks a request's timestep embedding would depend on how
  many rows share its batch. Cheap: these layers are a few hundred rows at most.
- ``BatchInvariantOps`` (``--deterministic``, the config's ``deterministic``): every other op whose reduction
  order could depend on the rows of the batch runs with tiles and splits chosen without looking at the batch.
  On the CPU each batch row of a token-wise linear or convolution is its own call (M = that row's tokens, the
  same alone or batched); on CUDA the linears run ``kernels.batch_invariant_linear`` (a persistent Triton
  matmul whose tiles depend on N and K only, no split-K) and the attention runs the Triton kernel (its tiles are
  keyed on token counts, never on the batch; SDPA's flash kernels may split keys by batch size). Norms reduce
  within a token and attention within a (row, head) on every path, so they need nothing.

The mode is a ``TorchFunctionMode`` entered around one denoiser call (the documented way to swap the kernels
of ``F.linear`` for a region of code; SGLang and ``batch_invariant_ops`` register library overrides instead,
which would change every model of the process).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kernels import batch_invariant_linear

ROW_BLOCK = 8


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
        if func in _ROWWISE and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if func is F.linear and x.is_cuda:
                # one launch: the kernel's tiles and K order depend on N and K only (kernels.batch_invariant)
                return batch_invariant_linear(x, *args[1:], **kwargs)
            if func is F.linear and x.dim() >= 3 and x.shape[0] > 1:  # [B, tokens, K]: one GEMM per row
                return _rowwise_linear(x, *args[1:], **kwargs)
            if func is not F.linear and x.shape[0] > 1:  # a convolution's batch: one call per row
                return torch.cat([func(row, *args[1:], **kwargs) for row in x.split(1)])
        return func(*args, **kwargs)


def _rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with each row of x [B, ..., K] its own GEMM (M = that row's tokens), written in place."""
    k, n = x.shape[-1], weight.shape[0]
    out = x.new_empty(*x.shape[:-1], n)
    for row, dest in zip(x, out):
        rows, target = row.reshape(-1, k), dest.view(-1, n)
        if bias is None:
            torch.mm(rows, weight.t(), out=target)
        else:
            torch.addmm(bias, rows, weight.t(), out=target)
    return out


def batch_invariant_ops(enabled: bool):
    """The ``BatchInvariantOps`` mode when ``enabled`` (the config's ``deterministic``), else nothing."""
    return BatchInvariantOps() if enabled and not torch.compiler.is_exporting() else contextlib.nullcontext()
