"""PyTorch reference of the batch-invariant linear: the test oracle and the CPU path.

    y = x @ weight^T + bias        x [..., K], weight [N, K] (nn.Linear's layout), bias [N] or None

Each row's bits must not depend on the rows computed with it (``--deterministic`` serving batches requests).
A BLAS picks its kernel by the number of rows M, so a plain ``x @ w.T`` gives a row other bits alone than in a
batch, even in float64. Here every product has the same shape: the rows go through the BLAS in zero-padded
blocks of ``ROW_BLOCK``, in float64 (products of 16- and 32-bit inputs are exact there, and the sums' errors lie
far below the output's precision), plus the bias, then one rounding to x's dtype. The tests check the invariance
bit for bit with rows prepended and appended.
"""
from __future__ import annotations

import math

import torch

ROW_BLOCK = 32


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """One-line ValueErrors for the shapes: x [..., K], weight [N, K], bias [N] or None."""
    if x.dim() < 1:
        raise ValueError(f"x must be [..., K] (at least one dim), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, K] with K = x's last dim {x.shape[-1]}, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}] (N, weight's rows), got shape {tuple(bias.shape)}")


def batch_invariant_linear_reference(x, weight, bias=None, *, out=None):
    """``x @ weight.T + bias`` in x's dtype (or written to ``out``), each row computed the same way whatever
    the other rows: float64 products of ``ROW_BLOCK``-row blocks, one rounding at the end."""
    check_linear(x, weight, bias)
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(math.prod(x.shape[:-1]), k)
    w = weight.to(torch.float64).T  # [K, N]
    b = None if bias is None else bias.to(device=x.device, dtype=torch.float64)
    blocks = []
    for block in rows.split(ROW_BLOCK):
        padded = torch.zeros(ROW_BLOCK, k, dtype=torch.float64, device=x.device)
        padded[:len(block)] = block
        y = padded @ w  # [ROW_BLOCK, N]: the same BLAS call for every block
        if b is not None:
            y = y + b
        blocks.append(y[:len(block)].to(x.dtype))
    result = torch.cat(blocks) if blocks else x.new_empty(0, n)
    result = result.reshape(*x.shape[:-1], n)
    return result if out is None else out.copy_(result)
