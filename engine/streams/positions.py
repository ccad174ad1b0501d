"""Integer (t, h, w) positions of video and reference tokens, and the reference placements (``ref_rope``)."""
from __future__ import annotations

import torch

# the reference position schemes (``MvgenConfig.ref_rope``), declared here once
REF_ROPES = ("shared", "decoupled", "past_grid", "none")


def grid_positions(frames: int, height: int, width: int, t0=0, h0=0, w0=0, device=None) -> torch.Tensor:
    """Positions [frames*height*width, 3] of a token grid in (t, h, w) raster order, offset by (t0, h0, w0)."""
    t = torch.arange(frames, device=device) + t0
    h = torch.arange(height, device=device) + h0
    w = torch.arange(width, device=device) + w0
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def reference_offset(scheme: str, k: torch.Tensor, ref_hw: tuple[int, int], video_fhw: tuple[int, int, int],
                     t_stride: int = 1) -> tuple[torch.Tensor, int, int]:
    """(dt per reference [R], dh, dw): where reference k's token grid starts under ``scheme``.

    - ``shared``: frame ``F + k`` of the video's grid (frame-append / Token-Concat style);
    - ``decoupled`` (Mv2ID RD-RoPE): ``t = -(k+1)*t_stride`` on its own grid centred on the video grid, so it never
      collides with a video token and does not depend on the video length;
    - ``past_grid`` (Stand-In): ``t = -(k+1)*t_stride`` with h and w starting right past the video's token grid,
      ``(dh, dw) = (H, W)``: Stand-In's one face image sits at ``t = -1``, ``h = H .. H+hr-1``, ``w = W .. W+wr-1``
      (its RoPE table starts at position -1 so that index 0 is t = -1 and index ``H + 1`` is h = H).
    """
    hr, wr = ref_hw
    f, h, w = video_fhw
    if scheme == "shared":
        return k + f, 0, 0
    if scheme == "decoupled":
        return -(k + 1) * t_stride, (h - hr) // 2, (w - wr) // 2
    if scheme == "past_grid":
        return -(k + 1) * t_stride, h, w
    raise ValueError(f"ref_rope must be one of {REF_ROPES}, got {scheme!r}")


def rd_rope_positions(
    scheme: str, num_refs: int, ref_hw: tuple[int, int], video_fhw: tuple[int, int, int], t_stride: int = 1,
    device=None,
) -> torch.Tensor:
    """Positions [num_refs*hr*wr, 3] of reference tokens under ``ref_rope`` ``scheme`` (``reference_offset``;
    ``none``: all zeros, i.e. the tokens are not rotated)."""
    hr, wr = ref_hw
    if scheme == "none":
        return torch.zeros(num_refs * hr * wr, 3, dtype=torch.long, device=device)
    t, h0, w0 = reference_offset(scheme, torch.arange(num_refs, device=device), ref_hw, video_fhw, t_stride)
    spatial = grid_positions(1, hr, wr, 0, h0, w0, device=device)  # [hr*wr, 3] with t = 0
    pos = spatial[None].repeat(num_refs, 1, 1)
    pos[..., 0] = t[:, None]
    return pos.reshape(-1, 3)
