"""ProFashion's Pose-aware Prototype Aggregator (PPA, Sec. 3.4, Eqs. 5-10) as ``ref_attention="prototype"``.

Per latent frame i and layer j, the references are folded into one *prototype* of T tokens (T = one
reference's token count), weighted by how well each reference token's pose matches frame i's pose; video
queries of frame i then attend to all video keys plus prototype i. The joint attention therefore costs
``Nv * (Nv + T)`` query-key pairs whatever the number of references R (``attention_flops``).

Pose inputs (the contract with the generation loop, ``engine.generation.frame_pose_per_latent_frame``):
``frame_pose`` [B, F, Cp, H, W] holds one rendered pose image per *latent* frame on the latent grid
(pixel size / 8), values in [-1, 1]: latent frame 0 takes pixel frame 0 and latent frame i > 0 pixel frame
4i, the last pixel frame of Wan's causal group of 4 (the pose that latent frame ends on). ``ref_pose``
[B, R, Cp, Hr, Wr] holds each reference's pose image on that reference's latent grid.

Pieces and the decisions behind them:
- Pose encoder (``pose_encoder``): a linear patch embedding Cp -> ``POSE_DIM`` on the video's 1x2x2 patch
  grid, so pose token n of a frame (of a reference) sits where video (reference) token n sits. It runs as a
  token-wise GEMM over the patches rather than a convolution: same numbers, and a token-wise GEMM (unlike a
  convolution's algorithm) does not change with the batch (see ``engine.runtime.batch_invariance.batch_invariant``).
  ``POSE_DIM`` = 64 is the pose dim the Triton PPA kernel's GPU tiles were chosen for (no spills at d = 64).
- Pose selector per layer (``selectors.<layer>``, Eqs. 5-6): ``q = to_q(GN_q(x_frame + P))``,
  ``k = to_k(GN_k(x_ref + P))``. P is the 2-D sinusoidal encoding over (h, w) (half the channels sin/cos
  of h, half of w, MAE-style); reference grids are centred on the video grid (as RD-RoPE centres them), so
  a smaller reference lines up by centre. GN is GroupNorm with ``POSE_GROUPS`` = 32 groups (the diffusion
  U-Nets' GroupNorm(32) that ProFashion builds on) over each image on its own: each frame for the queries,
  each reference for the keys. The paper computes one selection map and interpolates it to every U-Net
  block; a DiT has one resolution throughout, and a selector per layer contains that design (load the same
  weights into every layer) while letting each layer select for its own features.
- Selection map and fine-grained prototype (Eqs. 7-8): ``kernels.prototype_aggregate``:
  ``m_i = mean over frame i's queries of softmax(q k^T / sqrt(d))``, the softmax over all R*T reference
  tokens (so m_i sums to 1 over (r, t): a prototype token is a weighted *average*, about 1/T of a feature's
  scale, exactly as Eq. 7 defines it), then ``z_R^i[t] = sum_r z_r[t] * m_i[r, t]``. Mind the scale: with
  Wan's own (frozen) video projections, a prototype's K/V at T = 1560 tokens (480p) are mostly the
  projections' biases; the adapter's training has to live with that (the paper trains the whole denoiser).
- Which z, and in which order (Eq. 10, ``cross_attn(z, z (+) z_R)``): z_r is the reference stream's
  self-attention input at that layer (norm1 + the reference stream's modulation), the counterpart of the
  video's attention input, as Animate Anyone / ProFashion concatenate the reference net's normed hidden
  states into the denoiser's attention. Eq. 10 projects the concatenation with the *video* block's attention,
  so the prototype's keys are ``norm_k(to_k(z_R))`` and values ``to_v(z_R)``. Aggregating the references'
  finished K/V instead would not be the same: Wan's RMSNorm on K is nonlinear (an average of unit-RMS keys
  is shorter than a unit-RMS key, which would cool every prototype logit), and the biases would be weighted
  by ``sum_r m[r, t]`` (not 1). What *is* exact is to aggregate the bias-free projections ``W z_r``, then add
  the bias and RMS-normalise: ``to_k(sum_r m z_r) = sum_r m (W_k z_r) + b_k``. That order projects R*T
  reference tokens per layer instead of F*T prototype tokens (R < F in practice; the reference stream
  already spends far more on those tokens), and it is what makes the reference side cacheable below.
- RoPE positions of prototype i's tokens (``prototype_positions``): frame i's time index t = i on the
  reference grid, centred on the video grid under ``decoupled`` (as RD-RoPE places references), at the
  origin under ``shared``, unrotated under ``none``. RoPE logits depend on position differences; with
  t = i every frame sees its own prototype at temporal offset 0, so prototype i relates to frame i exactly as
  prototype j to frame j (any fixed t would make later frames see their prototype further away, a bias the
  per-frame prototypes of Eq. 10 do not have). A prototype key shares positions with frame i's video keys;
  only frame i's queries see it, and Eq. 10's concatenation is spatial within the frame anyway.
- Global prototype (Eq. 9) is *not* built. Eq. 9 weights each reference's CLIP features x_r by the view
  scores ``sum_t m_i[r, t]`` (``prototype_aggregate``'s third output) for the semantic cross-attention. This
  engine's denoiser contract carries CLIP states of the first frame only (Wan2.1-I2V's image context, which
  must keep conditioning on the given first frame) and none on T2V or Wan2.2; there are no per-reference CLIP
  states to weight, and feeding other features (e.g. pooled reference tokens) into the CLIP path's
  ``image_embedder`` / ``add_k_proj`` would be a path no weights were trained for. The image context
  therefore stays Wan's; a ``ref_image_context`` [B, R, 257, image_dim] input would make Eq. 9 one einsum.
- The reference stream runs isolated (reference queries see only reference keys), so it depends on neither
  the video nor, with ``ref_timestep="zero"``, on the step: its per-layer ``W_k z_r`` / ``W_v z_r`` are
  cached per request (``MultiViewWanTransformer.precompute_reference``, same size as the isolated mode's
  K/V cache); each step then runs only the selectors and the aggregation on the cache. (The pipeline asks
  ``MvgenConfig.caches_reference``, which still names ``isolated`` alone.)

Parameters (only on a ``ref_attention="prototype"`` model, under ``MultiViewWanTransformer.prototype``):
``prototype.pose_encoder.{weight [POSE_DIM, Cp, ph, pw], bias [POSE_DIM]}`` and, for each layer j,
``prototype.selectors.<j>.{norm_q, to_q, norm_k, to_k}.{weight, bias}`` ([POSE_DIM] norms, [POSE_DIM,
POSE_DIM] linears).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels import kernel_backend, prototype_aggregate

from ..streams.positions import grid_positions

POSE_DIM = 64
POSE_GROUPS = 32


class PoseTokens(NamedTuple):
    """Encoded poses with their positional encoding added: frames [B, F, h*w, d], references [B, R, T, d]."""

    frames: torch.Tensor
    refs: torch.Tensor


def sincos_2d(pos_hw: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sinusoidal encoding P [N, dim] (float32) of integer (h, w) positions [N, 2]:
    ``[sin(h w_k), cos(h w_k), sin(w w_k), cos(w w_k)]`` with ``w_k = 10000**(-k / (dim/4))``."""
    quarter = dim // 4
    omega = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32, device=pos_hw.device) / quarter)
    h = pos_hw[:, 0:1].float() * omega
    w = pos_hw[:, 1:2].float() * omega
    return torch.cat([h.sin(), h.cos(), w.sin(), w.cos()], dim=-1)


def centred_offset(video_hw: tuple[int, int], ref_hw: tuple[int, int]) -> tuple[int, int]:
    """Where a reference grid starts so that its centre meets the video grid's (RD-RoPE's placement)."""
    return (video_hw[0] - ref_hw[0]) // 2, (video_hw[1] - ref_hw[1]) // 2


def prototype_positions(ref_rope: str, video_fhw: tuple[int, int, int], ref_hw: tuple[int, int],
                        device=None) -> torch.Tensor:
    """RoPE positions [F*T, 3] of the prototype tokens (frame-major): prototype i at t = i on the reference grid,
    centred on the video grid (``decoupled``), at the origin (``shared``), or all zeros (``none``)."""
    frames, hr, wr = video_fhw[0], *ref_hw
    if ref_rope == "none":
        return torch.zeros(frames * hr * wr, 3, dtype=torch.long, device=device)
    h0, w0 = centred_offset(video_fhw[1:], ref_hw) if ref_rope == "decoupled" else (0, 0)
    return grid_positions(frames, hr, wr, 0, h0, w0, device=device)


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of each image's tokens x [N, L, C] (channels last), in float32 whatever the dtype."""
    y = F.group_norm(x.float().transpose(1, 2), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    return y.transpose(1, 2).to(x.dtype)


class PosePatchEmbedding(nn.Module):
    """Rendered pose images -> pose tokens on the 1x2x2 patch grid; weights in convolution layout."""

    def __init__(self, channels: int, dim: int, patch: tuple[int, int]):
        super().__init__()
        self.patch = patch
        self.weight = nn.Parameter(torch.empty(dim, channels, *patch))
        self.bias = nn.Parameter(torch.empty(dim))
        # nn.Conv2d's initialisation, so an un-loaded model is not degenerate
        bound = 1 / math.sqrt(channels * math.prod(patch))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        # pose [B, N, Cp, H, W] -> patches [B, N, h*w, Cp*ph*pw] in (Cp, ph, pw) order -> tokens [B, N, h*w, d]
        b, n, c, height, width = pose.shape
        ph, pw = self.patch
        patches = pose.reshape(b, n, c, height // ph, ph, width // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
        patches = patches.reshape(b, n, (height // ph) * (width // pw), c * ph * pw)
        return F.linear(patches.to(self.weight.dtype), self.weight.flatten(1), self.bias)


class PoseSelector(nn.Module):
    """One layer's pose-aware selector (Eqs. 5-6): query and key projections of the encoded poses."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.norm_q = nn.GroupNorm(groups, dim, eps=eps)
        self.to_q = nn.Linear(dim, dim)
        self.norm_k = nn.GroupNorm(groups, dim, eps=eps)
        self.to_k = nn.Linear(dim, dim)

    def query(self, frames: torch.Tensor) -> torch.Tensor:
        """Eq. 5: frames [B, F, Q, d] (P added) -> pose queries [B, F, Q, d], GroupNorm per frame."""
        return self.to_q(_group_norm(self.norm_q, frames.flatten(0, 1)).unflatten(0, frames.shape[:2]))

    def key(self, refs: torch.Tensor) -> torch.Tensor:
        """Eq. 6: references [B, R, T, d] (P added) -> pose keys [B, R*T, d], GroupNorm per reference."""
        return self.to_k(_group_norm(self.norm_k, refs.flatten(0, 1)).unflatten(0, refs.shape[:2])).flatten(1, 2)


class PrototypeAggregator(nn.Module):
    """ProFashion PPA for a DiT: the pose encoder and a pose selector per layer (see the module docstring; the
    MMDiT's layers are its dual-stream blocks, then its single-stream blocks)."""

    def __init__(self, cfg, pose_dim: int = POSE_DIM, groups: int = POSE_GROUPS, layers: int | None = None):
        super().__init__()
        pt, ph, pw = cfg.patch_size
        if pt != 1:
            raise ValueError(f"ref_attention='prototype' needs one latent frame per token frame (patch_size[0] 1), "
                             f"got patch_size {cfg.patch_size}")
        self.pose_channels = cfg.pose_channels
        self.patch = (ph, pw)
        self.backend = kernel_backend(cfg.attention_backend)
        self.pose_encoder = PosePatchEmbedding(cfg.pose_channels, pose_dim, (ph, pw))
        self.selectors = nn.ModuleList(PoseSelector(pose_dim, groups, cfg.eps)
                                       for _ in range(cfg.num_layers if layers is None else layers))

    def encode_poses(self, frame_pose, ref_pose, video_fhw, num_refs: int, ref_hw) -> PoseTokens:
        """Pose tokens plus P of every latent frame and every reference; checks the two pose inputs first."""
        self._check_poses(frame_pose, ref_pose, video_fhw, num_refs, ref_hw)
        device, dim = frame_pose.device, self.pose_encoder.weight.shape[0]
        _, h, w = video_fhw
        video_hw = grid_positions(1, h, w, device=device)[:, 1:]  # [h*w, 2]
        ref_grid = grid_positions(1, *ref_hw, 0, *centred_offset((h, w), ref_hw), device=device)[:, 1:]
        dtype = self.pose_encoder.weight.dtype
        frames = self.pose_encoder(frame_pose) + sincos_2d(video_hw, dim).to(dtype)
        refs = self.pose_encoder(ref_pose) + sincos_2d(ref_grid, dim).to(dtype)
        return PoseTokens(frames, refs)

    def _check_poses(self, frame_pose, ref_pose, video_fhw, num_refs, ref_hw) -> None:
        if frame_pose is None or ref_pose is None:
            missing = [name for name, t in (("frame_pose", frame_pose), ("ref_pose", ref_pose)) if t is None]
            raise ValueError(f"a prototype (ProFashion PPA) denoiser with references needs {' and '.join(missing)}: "
                             "a pose image per latent frame and one per reference, on the latent grids")
        ph, pw = self.patch
        f, h, w = video_fhw
        for name, t, want in (("frame_pose", frame_pose, (f, self.pose_channels, h * ph, w * pw)),
                              ("ref_pose", ref_pose, (num_refs, self.pose_channels, ref_hw[0] * ph, ref_hw[1] * pw))):
            if t.dim() != 5 or tuple(t.shape[1:]) != want:
                raise ValueError(f"{name} must be [B, {', '.join(map(str, want))}] for these latents, "
                                 f"got {list(t.shape)}")

    @staticmethod
    def reference_features(z: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor]:
        """The bias-free projections ``W_k z``, ``W_v z`` [B, R*T, D] of the references' attention input z by
        the video block's attention ``attn`` (what the prototype aggregates; the reference cache holds them)."""
        return F.linear(z, _weight(attn.to_k, z.dtype)), F.linear(z, _weight(attn.to_v, z.dtype))

    def prototype_kv(self, layer: int, poses: PoseTokens, k_feats, v_feats, attn):
        """Eqs. 5-8 at ``layer``, then Eq. 10's projection: prototype keys and values [B, F*T, H, Dh].

        ``k_feats``/``v_feats`` [B, R*T, D] are ``reference_features`` of this layer; ``attn`` is the video
        block's self-attention: its ``to_k``/``to_v`` biases and its ``key_value_heads`` (the key RMSNorm, across
        heads on Wan, per head on the MMDiT, and the split into heads) finish the projection of the aggregate."""
        selector = self.selectors[layer]
        num_refs, tokens = poses.refs.shape[1:3]
        feats = torch.cat([k_feats, v_feats], dim=-1).unflatten(1, (num_refs, tokens))  # [B, R, T, 2D]
        proto, _, _ = prototype_aggregate(selector.query(poses.frames), selector.key(poses.refs), feats,
                                          backend=self.backend)  # [B, F, T, 2D]
        k, v = proto.flatten(1, 2).chunk(2, dim=-1)  # [B, F*T, D] each
        # sum_r m[r, t] is not 1 per position, so the biases join after the aggregation (see the docstring)
        return attn.key_value_heads(k + attn.to_k.bias, v + attn.to_v.bias)


def _weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A projection's weight in ``dtype``: an 8-bit linear's dequantised (``engine.runtime.fp8``), else its own."""
    dequantized = getattr(linear, "dequantized_weight", None)
    return linear.weight if dequantized is None else dequantized(dtype)


def attention_flops(config, frames: int, height: int, width: int, num_refs: int,
                    ref_hw: tuple[int, int]) -> dict[str, int]:
    """FLOPs per layer and batch row of the attention in ``full`` and ``prototype`` modes.

    Sizes are latent (as the denoiser takes them): ``frames`` x ``height`` x ``width`` video, ``num_refs``
    references of ``ref_hw``. Only query-key pairs the mask allows are counted, each costing 4*D FLOPs
    (q.k and p.v over all heads, D = heads * head_dim). Keys:
      ``full``:       the joint attention over [video | references]: (Nv + R*T)^2 pairs;
      ``prototype``:  the joint attention of the video queries over [video | own frame's prototype]:
                      Nv * (Nv + T) pairs, independent of R;
      ``prototype_reference``: the isolated reference stream's own attention, (R*T)^2 pairs, once per
                      request when it is cached (``ref_timestep="zero"``), else every step;
      ``prototype_selector``: Eq. 7's pose logits (2*d per frame query x reference token) and Eq. 8's
                      weighted sums (2 per frame x reference token x channel, K and V: 2D channels).
    """
    _, ph, pw = config.patch_size
    tokens_per_frame = (height // ph) * (width // pw)
    n_video = frames * tokens_per_frame
    tokens = (ref_hw[0] // ph) * (ref_hw[1] // pw)
    per_pair = 4 * config.inner_dim
    pose_dim = POSE_DIM
    return {
        "full": per_pair * (n_video + num_refs * tokens) ** 2,
        "prototype": per_pair * n_video * (n_video + tokens),
        "prototype_reference": per_pair * (num_refs * tokens) ** 2,
        "prototype_selector": 2 * pose_dim * n_video * num_refs * tokens
        + 2 * frames * num_refs * tokens * 2 * config.inner_dim,
    }
