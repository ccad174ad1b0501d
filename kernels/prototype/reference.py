"""PyTorch reference of ProFashion's pose-aware prototype aggregation (PPA): the oracle and the CPU path.

Shapes (B batch, F frames, Q pose queries per frame, R references of T tokens each, d pose dim, C channels):
  pose_q    [B, F, Q, d]   pose queries of each output frame
  pose_k    [B, R * T, d]  pose keys of all reference tokens; token t of reference r sits at r * T + t
  ref_feats [B, R, T, C]   reference features z
Outputs:
  token_scores m [B, F, R, T]: ``m_f = mean over frame f's queries of softmax_j(q . k_j * sm_scale)``, the
      softmax running over all R * T reference tokens (so ``m_f`` sums to 1 over (r, t));
  prototype [B, F, T, C]: ``prototype_f[t] = sum_r z[r, t] * m_f[r, t]`` (the fine-grained prototype: one
      token per reference token position, weighted by pose similarity), in ref_feats' dtype;
  view_scores [B, F, R]: ``sum_t m_f[r, t]``, the global weight of each reference view for frame f.
``sm_scale`` defaults to 1 / sqrt(d). Scores are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch


def prototype_aggregate_reference(pose_q, pose_k, ref_feats, *, sm_scale=None):
    """(prototype [B, F, T, C], token_scores [B, F, R, T], view_scores [B, F, R]); see the module docstring."""
    batch, num_refs, ref_tokens, _ = ref_feats.shape
    cdt = torch.float64 if pose_q.dtype == torch.float64 else torch.float32
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(pose_q.shape[-1])
    logits = torch.einsum("bfqd,bnd->bfqn", pose_q.to(cdt), pose_k.to(cdt)) * scale  # [B, F, Q, R*T]
    token_scores = logits.softmax(-1).mean(2).unflatten(-1, (num_refs, ref_tokens))  # [B, F, R, T]
    prototype = torch.einsum("bfrt,brtc->bftc", token_scores.to(cdt), ref_feats.to(cdt))
    return prototype.to(ref_feats.dtype), token_scores, token_scores.sum(-1)
