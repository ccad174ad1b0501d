"""3-axis rotary embedding computed from integer positions (the reference formulation): Wan's and
HunyuanVideo's.

head_dim d splits into three bands (t, h, w): Wan's t: d - 4*(d//6), h: 2*(d//6), w: 2*(d//6) (``axes=None``),
or band sizes given explicitly (``axes``, e.g. HunyuanVideo's ``rope_axes_dim=(16, 56, 56)`` at d=128). In a
band of n channels pair j rotates by ``pos * theta**(-2j/n)``. Pairs are interleaved (x[2j], x[2j+1]) as in
diffusers. Angles are computed from positions (no table), so negative and large positions work; a token at
(0, 0, 0) is not rotated, which is how ``ref_rope="none"`` is expressed.
"""
from __future__ import annotations

import torch


def rope_bands(head_dim: int, axes: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """Channels of the (t, h, w) bands: ``axes`` if given (three even positive ints summing to head_dim), else
    Wan's split."""
    if axes is not None:
        axes = tuple(axes)
        if (len(axes) != 3 or not all(isinstance(n, int) and n > 0 and n % 2 == 0 for n in axes)
                or sum(axes) != head_dim):
            raise ValueError(f"rope axes must be three even positive ints summing to head_dim {head_dim}, got {axes}")
        return axes
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for Wan RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_inv_freq(head_dim: int, theta: float = 10000.0, axes: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Per-pair inverse frequency [head_dim // 2] (float64)."""
    parts = []
    for n in rope_bands(head_dim, axes):
        parts.append(theta ** (-torch.arange(0, n, 2, dtype=torch.float64) / n))
    return torch.cat(parts)


def rope_pair_axis(head_dim: int, axes: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Which position column (0=t, 1=h, 2=w) each rotation pair uses, [head_dim // 2] int64."""
    bands = rope_bands(head_dim, axes)
    return torch.cat([torch.full((n // 2,), axis, dtype=torch.long) for axis, n in enumerate(bands)])


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype=torch.float32,
                axes: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Rotation angles [N, head_dim // 2] for integer positions ``pos`` [N, 3].

    The product is formed in ``dtype`` (float32 at run time, which is also what the Triton kernel and the
    exported graph do; float64 for the oracle).
    """
    inv_freq = rope_inv_freq(head_dim, theta, axes).to(device=pos.device, dtype=dtype)
    axis = rope_pair_axis(head_dim, axes).to(pos.device)
    return pos.to(dtype).index_select(1, axis) * inv_freq


def rope_table(pos: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype=torch.float32,
               axes: tuple[int, int, int] | None = None):
    """(cos, sin) [N, head_dim // 2] of the angles of ``pos`` [N, 3]: what a caller that rotates several tensors
    at the same positions (Q and K of every layer) computes once."""
    angles = rope_angles(pos, head_dim, theta, dtype, axes)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, angles: torch.Tensor | None = None, table=None) -> torch.Tensor:
    """Rotate x [B, N, H, D] by angles [N, D/2] (or their ``rope_table``); math in the angles' dtype, result in
    x's dtype."""
    cos, sin = table if table is not None else (angles.cos(), angles.sin())
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x0, x1 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)
