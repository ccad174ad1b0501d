"""MVAnimate's multi-view attention (Sec. IV-B, Eq. 2) and its alignment with the main attention, as
``view_attention="multiview"``.

The paper (MVAnimate, Sec. IV-B a), Eq. 2), for a query token q_t of the main view and the (key, value)
pairs {k_t^(m), v_t^(m)} of the M guided views at that token::

    v_hat_t = sum_m alpha_t^(m) v_t^(m),
    alpha_t^(m) = exp(omega^(m) <q_t, k_t^(m)>) / sum_j exp(omega^(j) <q_t, k_t^(j)>)              (2)

"where omega^(m) > 0 are learned per-view importance weights (Sec. IV-C)". Sec. IV-C initialises that
tensor (omega_mv) "with [0.25, 0.25, 0.1, ..., 0.1]": the two front views higher (``paper_view_omega``).
Here view m is the m-th reference of the request, so the first two references start at 0.25. The denoiser
holds omega as the buffer ``view_omega`` [max_references] (an adapter tensor of that name replaces the
paper's values); a request's ``view_omega`` [B, M] overrides it row by row.
The attention alignment (Sec. IV-B c), Fig. 3 (b), from Eq. 3's energy):
``A_joint = (A_temp + lambda * A_mv) / (1 + lambda)``.

What this module computes, and what was adapted from the paper's SVD U-Net to the Wan DiT:

- Scaling: Eq. 2's logit is ``omega^(m) <q, k^(m)>`` with *no* 1/sqrt(d); we follow it, so omega also
  carries the softmax temperature (omega = 1/sqrt(Dh) would be the usual dot-product scaling). The softmax
  runs over the M views only, per token and per head (the paper's block is multi-head).
- Which q, k, v: the layer's own. q is the video token's query ``norm_q(to_q(.))`` of the video block; k^(m),
  v^(m) are the reference stream's key and value of view m (the same tensors the joint attention uses, or the
  ``ReferenceCache`` of an isolated stream, which stores exactly them). The paper's separate MV block (its own
  projections, AdaLIN, a cross-attention) has no weights in a Wan checkpoint; the only new tensor is omega.
- RoPE: q and k enter the view dot product RMS-normalised and *not rotated*. The position is fixed by the
  alignment below, so a rotation adds no positional information; it would only add a view-dependent bias
  (under RD-RoPE view m sits at t = -(m+1), so <R q, R k^(m)> rotates each view's key by a different offset)
  that competes with omega, the one quantity Eq. 2 means to weight views by.
- Alignment (``aligned_cells``): the video token at latent cell (h, w) reads, in every view, the reference
  cell containing the same *relative* image location: ``(floor((h + 1/2) hr / H), floor((w + 1/2) wr / W))``,
  the centre-to-centre nearest mapping (``nearest-exact`` resampling of the reference grid onto the video's).
  A reference is a whole image of the person seen from another view, resized to its own resolution, so its
  grid spans the same image extent as a video frame, whatever its size; a proportional map is what keeps
  "the same place of the picture" (the identity when the grids agree). Centring a smaller grid without
  scaling (as RD-RoPE places positions) would pair the video's border with nothing. The paper's views are
  videos (k_t^(m) at time t); ours are single images, so every frame reads the same reference cell.
- Alignment with the main attention: the U-Net's temporal attention becomes the DiT's joint self-attention,
  the one attention that mixes across frames (and with the references). Per layer and head, on the video
  rows before the output projection: ``(A_joint + lambda * A_mv) / (1 + lambda)``, the maps applied to the
  values (the alignment's update applied to z). The reference rows keep the joint attention's output.
- Cost: the reference K/V are gathered onto the video's spatial grid once per layer ([B, M, H*W, heads, Dh],
  M/F of the video K's size, shared by all frames) and each video token takes M dot products:
  O(Nv * M * D) work and O(Nv * M) logits, never an Nv x (M * T) matrix.
- ``view_lambda = 0`` returns the joint attention bit for bit: ``(A + 0 * X) / (1 + 0)`` is exact in floating
  point for a finite X, so the term is computed and weighted rather than skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Sec. IV-C: omega_mv "is initiated with [0.25, 0.25, 0.1, ..., 0.1]" (the front views higher)
FRONT_OMEGA, OTHER_OMEGA, FRONT_VIEWS = 0.25, 0.1, 2


def paper_view_omega(num_views: int) -> torch.Tensor:
    """MVAnimate's initial per-view weights, float32 [num_views] on the CPU (whatever the default device, so a
    model built on ``meta`` still holds the numbers): 0.25 for the first two views, 0.1 for the others."""
    values = [FRONT_OMEGA if m < FRONT_VIEWS else OTHER_OMEGA for m in range(num_views)]
    return torch.tensor(values, dtype=torch.float32, device="cpu")


def fill_paper_omega(module, state_dict, prefix, *_):
    """``load_state_dict`` pre-hook: a state without ``view_omega`` (a base checkpoint, an adapter without it)
    gets the paper's initialisation, so a strict load succeeds and omega means "the adapter's, else the paper's"."""
    device = next((t.device for t in state_dict.values() if torch.is_tensor(t)), torch.device("cpu"))
    state_dict.setdefault(prefix + "view_omega", paper_view_omega(module.config.max_references).to(device))


def aligned_cells(video_hw: tuple[int, int], ref_hw: tuple[int, int], device=None) -> torch.Tensor:
    """Index [H*W] (video raster order) of each video cell's aligned cell in one reference's hr*wr grid:
    ``floor((y + 1/2) * hr / H)`` by rows, likewise columns, in integers (no float rounding at the edges)."""
    (h, w), (hr, wr) = video_hw, ref_hw
    rows = ((2 * torch.arange(h, device=device) + 1) * hr) // (2 * h)
    cols = ((2 * torch.arange(w, device=device) + 1) * wr) // (2 * w)
    return (rows[:, None] * wr + cols[None, :]).reshape(-1)


def resolve_omega(view_omega: torch.Tensor | None, model_omega: torch.Tensor, batch: int, num_views: int,
                  device) -> torch.Tensor:
    """Per-row omegas [B, M] float32: the request's ``view_omega`` [B, M] where given, else the model's."""
    if view_omega is None:
        if num_views > model_omega.shape[0]:
            raise ValueError(f"{num_views} references but the model has view_omega for {model_omega.shape[0]} "
                             f"(max_references)")
        return model_omega[:num_views].to(device, torch.float32).expand(batch, num_views)
    if tuple(view_omega.shape) != (batch, num_views):
        raise ValueError(f"view_omega must be [batch, references] = [{batch}, {num_views}], "
                         f"got {list(view_omega.shape)}")
    return view_omega.to(device, torch.float32)


def multiview_attention(q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, omega: torch.Tensor,
                        video_fhw: tuple[int, int, int], ref_hw: tuple[int, int], first_token: int = 0) -> torch.Tensor:
    """Eq. 2 for every video token: softmax over the views of ``omega_m <q, k_m>`` at the aligned cell.

    q [B, N, heads, Dh] the queries (normalised, not rotated) of video tokens ``first_token`` .. + N in raster
    order (all F*H*W of them, or a sequence-parallel rank's shard); k_ref, v_ref [B, M*hr*wr, heads, Dh] the
    references' keys (normalised, not rotated) and values; omega [B, M]. Returns float32 [B, N, heads, Dh]
    (the caller rounds once, after the alignment).
    """
    _, h, w = video_fhw
    b, n, heads, dh = q.shape
    # a shard that starts or ends inside a frame is padded to whole frames, so every frame shares one gather
    lead = first_token % (h * w)
    frames = -(-(lead + n) // (h * w))
    qf = q.float()
    if lead or frames * h * w != n:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, 0, lead, frames * h * w - lead - n))
    cells = aligned_cells((h, w), ref_hw, q.device)
    # the references resampled onto the video's spatial grid: [B, M, H*W, heads, Dh], shared by all F frames
    k = k_ref.unflatten(1, (-1, ref_hw[0] * ref_hw[1]))[:, :, cells].float()
    v = v_ref.unflatten(1, (-1, ref_hw[0] * ref_hw[1]))[:, :, cells].float()
    qf = qf.unflatten(1, (frames, h * w))  # [B, F, H*W, heads, Dh]
    logits = torch.einsum("bfnhd,bmnhd->bfnhm", qf, k) * omega[:, None, None, None, :]  # no 1/sqrt(d): Eq. 2
    alpha = logits.softmax(dim=-1)  # over the M views only
    out = torch.einsum("bfnhm,bmnhd->bfnhd", alpha, v).reshape(b, frames * h * w, heads, dh)
    return out[:, lead:lead + n]


def align_attention(a_joint: torch.Tensor, a_mv: torch.Tensor, view_lambda: float) -> torch.Tensor:
    """``(A_joint + lambda * A_mv) / (1 + lambda)`` in float32, rounded once to A_joint's dtype; exact at 0."""
    return ((a_joint.float() + view_lambda * a_mv) / (1.0 + view_lambda)).to(a_joint.dtype)


@dataclass(frozen=True)
class ViewAttention:
    """One forward's Eq. 2 settings, applied layer by layer to the video rows of the joint attention."""

    omega: torch.Tensor  # [B, M] float32
    view_lambda: float
    video_fhw: tuple[int, int, int]  # the video's token grid
    ref_hw: tuple[int, int]  # one reference's token grid

    @classmethod
    def for_call(cls, model_omega: torch.Tensor | None, view_omega: torch.Tensor | None, view_lambda: float,
                 batch: int, num_views: int, video_fhw, ref_hw, device) -> "ViewAttention | None":
        """None when the model has no multi-view attention or the call has no view: with R = 0 the denoiser
        stays its base model (an empty softmax would otherwise scale A_joint by 1 / (1 + lambda))."""
        if model_omega is None or num_views == 0:
            return None
        return cls(resolve_omega(view_omega, model_omega, batch, num_views, device), view_lambda, tuple(video_fhw),
                   tuple(ref_hw))

    def __call__(self, a_joint: torch.Tensor, q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor,
                 first_token: int = 0):
        """a_joint, q [B, N, heads, Dh] (the joint attention's video rows, the video queries before RoPE) of
        video tokens ``first_token`` .. + N; k_ref, v_ref [B, M*hr*wr, heads, Dh] (before RoPE, every view's)
        -> the aligned video rows [B, N, heads, Dh]."""
        a_mv = multiview_attention(q, k_ref, v_ref, self.omega, self.video_fhw, self.ref_hw, first_token)
        return align_attention(a_joint, a_mv, self.view_lambda)
