"""Integer (t, h, w) positions of video and reference tokens, and the RD-RoPE reference placement."""
from __future__ import annotations

import torch


def grid_positions(frames: int, height: int, width: int, t0=0, h0=0, w0=0, device=None) -> torch.Tensor:
    """Positions [frames*height*width, 3] of a token grid in (t, h, w) raster order, offset by (t0, h0, w0)."""
    t = torch.arange(frames, device=device) + t0
    h = torch.arange(height, device=device) + h0
    w = torch.arange(width, device=device) + w0
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def rd_rope_positions(
    scheme: str, num_refs: int, ref_hw: tuple[int, int], video_fhw: tuple[int, int, int], t_stride: int = 1,
    device=None,
) -> torch.Tensor:
    """Positions [num_refs*hr*wr, 3] of reference tokens under ``ref_rope`` ``scheme``.

    - ``shared``: reference k is frame ``F + k`` of the video (frame-append / Token-Concat style);
    - ``decoupled`` (Mv2ID RD-RoPE): reference k sits at ``t = -(k+1)*t_stride`` on its own grid centred on
      the video grid, so it never collides with a video token and does not depend on the video length;
    - ``none``: all zeros, i.e. the tokens are not rotated.
    """
    hr, wr = ref_hw
    f, h, w = video_fhw
    k = torch.arange(num_refs, device=device)
    if scheme == "none":
        return torch.zeros(num_refs * hr * wr, 3, dtype=torch.long, device=device)
    if scheme == "shared":
        t, h0, w0 = k + f, 0, 0
    elif scheme == "decoupled":
        t, h0, w0 = -(k + 1) * t_stride, (h - hr) // 2, (w - wr) // 2
    else:
        raise ValueError(f"ref_rope must be one of ('shared', 'decoupled', 'none'), got {scheme!r}")
    spatial = grid_positions(1, hr, wr, 0, h0, w0, device=device)  # [hr*wr, 3] with t = 0
    pos = spatial[None].repeat(num_refs, 1, 1)
    pos[..., 0] = t[:, None]
    return pos.reshape(-1, 3)
