"""M2HVideo's distribution-aware adapter (Sec. III-C, Eq. 3) as ``identity=True``: an identity cross-attention
whose output is re-normalised to the statistics of the CLIP image branch before it joins the cross-attention sum.

The paper, in each spatial attention block i of its UNet, cross-attends the latent to the pose-aware identity
embedding (z_pi) and to the CLIP clothing embedding (z_clip), then aligns the first to the second:

    z̄_pi = (z_pi - mu_pi) / sigma_pi * sigma_clip + mu_clip                                           (Eq. 3)

"where mu and sigma denote the mean and standard deviation of the corresponding feature embeddings", and adds
z̄_pi to z_clip. Here, in every Wan block's cross-attention ``attn2`` (video stream):

    q     = attn2's queries (shared by the text, image and identity branches)
    z_b   = SDPA(q, norm_added_k(add_k_proj(I)), add_v_proj(I))          Wan's CLIP image branch (z_clip)
    z_a   = SDPA(q, identity.norm_added_k(identity.add_k_proj(J)), identity.add_v_proj(J))   (z_pi)
    cross = to_out(z_text + lerp(z_b, z_b + z̄_a, gate)) = to_out(z_text + z_b + gate * z̄_a)

with I the embedded image context, J the embedded identity context and z̄_a Eq. 3 with a = z_a, b = z_b.

Adapted from the paper's UNet to the DiT, and why:
- Where: every block's ``attn2`` (a DiT block has one cross-attention over all frames' tokens, where the UNet
  has per-frame spatial blocks followed by temporal layers). The text branch is untouched; z_clip is Wan's CLIP
  image branch (the image context, I2V's first frame); the three branches share attn2's queries and output
  projection, so Eq. 3 acts on the heads' concatenated outputs [B, N, C = H * Dh] before ``to_out``, where
  Wan sums its text and image branches.
- What is attended: the paper's f_pi comes from its pose-aware head encoder, which this engine does not have;
  the identity is the identity image's CLIP penultimate states (``identity_context`` [B, L, image_dim], the
  checkpoint's own image encoder), embedded by the checkpoint's ``condition_embedder.image_embedder`` (the map
  from CLIP states into the DiT's width that the image branch's K/V were trained on), once per forward. The
  adapter owns only per-block K/V projections and a key RMSNorm, as Wan's image branch has.
- Statistics axis: the paper does not say. Here mu, sigma are per token over its C channels (all heads), biased
  variance, ``sigma = sqrt(var + eps)`` (eps = the config's, 1e-6: Eq. 3 divides by an unguarded sigma_pi).
  Per token because (1) a DiT block has no per-frame spatial layer; the UNet's per-frame statistics become a
  reduction over other tokens here, which makes a token's output depend on its neighbours and, with Ulysses
  sequence parallelism (tokens sharded across ranks outside attention), costs a cross-rank reduction per block,
  where per-token statistics stay on the token; (2) the alignment Eq. 3 is for (the identity branch added at
  the CLIP branch's scale and offset, so neither dominates the sum) is then made at every token: a face token
  gets the scale of the CLIP branch at that token; (3) it is the axis of the DiT's own normalisations (LayerNorm
  and RMSNorm across heads, per token) and of the fused kernel ``kernels.distribution_fusion``, which computes
  ``z_b + z̄_a`` in one pass over the rows.
- Gate (not in the paper): Eq. 3 is scale-invariant in z_a and adds mu_b whatever z_a is (z̄_a's per-token mean
  is always mu_b). A zero value projection gives z_a = 0, so z̄_a = mu_b (not 0): no choice of K/V weights makes
  the branch vanish, and near z_a = 0 the formula is steep (d z̄/d z_a ~ sigma_b / sqrt(eps)). So the branch is
  gated per channel, ``gate`` [C], zero-initialised like the DiT's AdaLN-Zero gates on its residual branches.
  ``lerp(start, end, w)`` is ``start + w * (end - start)`` for w < 0.5 and ``end - (end - start) * (1 - w)``
  otherwise, so ``lerp(z_b, z_b + z̄_a, gate)`` is z_b bit for bit at gate = 0 (the plain model) and the fused
  kernel's Eq. 3 sum bit for bit at gate = 1: an adapter trained on the paper's formula ships ``gate = 1``.
  "Zero identity projection" means gate = 0. The lerp is one elementwise pass after the fused kernel; a gate
  operand in ``kernels.distribution_fusion`` would fold it in.

Scope: identity applies to the video stream only. The reference stream's blocks (``ref_blocks``) carry no
identity parameters, and in Token-Concat (references through the video blocks) the reference rows are finished
without it: the identity image conditions what is generated, not the references' features. With
``identity_context`` None (identity is optional per request) the branch is skipped: the plain output.

Parameters, per video block N (only when ``config.identity``):
``blocks.N.attn2.identity.add_k_proj.{weight,bias}``, ``blocks.N.attn2.identity.add_v_proj.{weight,bias}``
([C, C] and [C]), ``blocks.N.attn2.identity.norm_added_k.weight`` [C], ``blocks.N.attn2.identity.gate`` [C].
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import distribution_fusion, kernel_backend

from ..config import MvgenConfig


class IdentityCrossAttention(nn.Module):
    """The identity branch of one block's cross-attention: its K/V (``key_value``) and its Eq. 3 fusion into the
    CLIP image branch (``fuse``); the attention itself runs in ``Attention.cross`` with the block's queries."""

    def __init__(self, cfg: MvgenConfig):
        super().__init__()
        dim = cfg.inner_dim  # the embedded identity tokens have the image embedder's output width
        self.heads = cfg.num_attention_heads
        self.eps = cfg.eps
        self.backend = kernel_backend(cfg.attention_backend)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_added_k = nn.RMSNorm(dim, eps=cfg.eps)
        self.gate = nn.Parameter(torch.zeros(dim))

    def key_value(self, identity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """identity [B, L, C] embedded identity tokens -> K, V [B, L, H, Dh] (RMSNorm across heads on K, as
        Wan's image branch)."""
        k = self.norm_added_k(self.add_k_proj(identity)).unflatten(-1, (self.heads, -1))
        v = self.add_v_proj(identity).unflatten(-1, (self.heads, -1))
        return k, v

    def fuse(self, z_identity: torch.Tensor, z_image: torch.Tensor) -> torch.Tensor:
        """z_a = z_identity, z_b = z_image [B, N, H, Dh] -> ``z_b + gate * z̄_a`` [B, N, H, Dh], z̄_a from Eq. 3 with
        per-token statistics over the C = H * Dh channels."""
        za = z_identity.flatten(2).contiguous()  # [B, N, C]: the statistics span all heads of a token
        zb = z_image.flatten(2).contiguous()
        fused = distribution_fusion(za, zb, eps=self.eps, backend=self.backend)  # z_b + z̄_a (Eq. 3), zb's dtype
        return torch.lerp(zb, fused, self.gate.to(fused.dtype)).unflatten(-1, z_image.shape[-2:])
