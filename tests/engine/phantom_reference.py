"""An independent float64 formulation of Phantom-Wan's denoiser call and guidance, the oracle of ``test_phantom``.

Written from reading the authors' code (Phantom-video/Phantom: ``Phantom_Wan_S2V.generate`` in
``phantom_wan/subject2video.py`` and ``load_ref_images`` in ``generate.py``, read in the svjack/Phantom copy at
7aa4d8764c73afcb7699452d1837809074130285; its model is Wan2.1's ``WanModel``, read in Wan-Video/Wan2.1
``wan/modules/model.py`` at aa843f59af7f24973eaa993c31cda6fdc597e718), not from mvgen's code: it reads the original
Wan key names straight from the checkpoint's tensors, builds one token sequence of the video latents followed by
the reference latents as extra frames (the authors' ``torch.cat([latent[:, :-R], ref_latent], dim=1)``), runs
Wan's blocks on it and keeps the video frames of the output.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

TEXT_LEN = 512  # Wan's T5_CONTEXT_TOKEN_NUMBER: the context is zero-padded to it
EPS = 1e-6


def _linear(x, w, name):
    return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])


def _layer_norm(x, weight=None, bias=None):
    return F.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def _rms_norm(x, weight):  # WanRMSNorm over the whole width (all heads together)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def _rope_angles(f: int, h: int, w: int, head_dim: int) -> torch.Tensor:
    """[f*h*w, head_dim/2] angles: the t band (head_dim - 4 (head_dim // 6) dims) then h and w (2 (head_dim // 6)
    each); in a band of n dims pair j turns by pos * 10000**(-2j/n) (Wan's rope_params)."""
    bands = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    grid = grid.reshape(-1, 3).double()
    parts = [grid[:, i:i + 1] / 10000 ** (torch.arange(0, n, 2, dtype=torch.float64) / n) for i, n in enumerate(bands)]
    return torch.cat(parts, 1)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [L, heads, d] with pairs (2j, 2j+1) as complex numbers, times exp(i angle)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def _attention(q, k, v, heads):  # [L, D] each -> [L, D]
    split = (lambda t: t.reshape(t.shape[0], heads, -1).transpose(0, 1))
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return (weights @ v).transpose(0, 1).reshape(q.shape[1], -1)


def wan_forward(w: dict[str, torch.Tensor], x: torch.Tensor, t: float, context: torch.Tensor, heads: int,
                freq_dim: int) -> torch.Tensor:
    """Wan2.1-T2V's ``WanModel.forward`` for one sample: x [16, F, H, W], context [L <= 512, text_dim] ->
    velocity [16, F, H, W] (patch 1x2x2; float64 throughout)."""
    dim = w["patch_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    # patch embedding: tokens [L, D] in (f, h, w) order
    y = F.conv3d(x[None], w["patch_embedding.weight"], w["patch_embedding.bias"], stride=(1, 2, 2))[0]
    f, h, ww = y.shape[1:]
    tokens = y.flatten(1).T
    # timestep: [cos | sin] of t * 10000**(-i/half), then the time MLP (e [D]) and its projection (e0 [6, D])
    half = freq_dim // 2
    phase = t * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    e = _linear(F.silu(_linear(torch.cat([phase.cos(), phase.sin()]), w, "time_embedding.0")), w, "time_embedding.2")
    e0 = _linear(F.silu(e), w, "time_projection.1").reshape(6, dim)
    # context: zero-padded to 512 tokens, then the text MLP
    padded = torch.cat([context, context.new_zeros(TEXT_LEN - context.shape[0], context.shape[1])])
    ctx = _linear(F.gelu(_linear(padded, w, "text_embedding.0"), approximate="tanh"), w, "text_embedding.2")
    angles = _rope_angles(f, h, ww, dim // heads)
    for i in range(layers):
        b = f"blocks.{i}"
        m = w[f"{b}.modulation"][0] + e0  # [6, D]: shift, scale, gate (attention); shift, scale, gate (FFN)
        a = _layer_norm(tokens) * (1 + m[1]) + m[0]
        q = _rms_norm(_linear(a, w, f"{b}.self_attn.q"), w[f"{b}.self_attn.norm_q.weight"])
        k = _rms_norm(_linear(a, w, f"{b}.self_attn.k"), w[f"{b}.self_attn.norm_k.weight"])
        q, k = (_rotate(z.reshape(z.shape[0], heads, -1), angles).reshape(z.shape) for z in (q, k))
        attn = _attention(q, k, _linear(a, w, f"{b}.self_attn.v"), heads)
        tokens = tokens + _linear(attn, w, f"{b}.self_attn.o") * m[2]
        c = _layer_norm(tokens, w[f"{b}.norm3.weight"], w[f"{b}.norm3.bias"])
        q = _rms_norm(_linear(c, w, f"{b}.cross_attn.q"), w[f"{b}.cross_attn.norm_q.weight"])
        k = _rms_norm(_linear(ctx, w, f"{b}.cross_attn.k"), w[f"{b}.cross_attn.norm_k.weight"])
        cross = _attention(q, k, _linear(ctx, w, f"{b}.cross_attn.v"), heads)
        tokens = tokens + _linear(cross, w, f"{b}.cross_attn.o")
        g = _layer_norm(tokens) * (1 + m[4]) + m[3]
        ffn = _linear(F.gelu(_linear(g, w, f"{b}.ffn.0"), approximate="tanh"), w, f"{b}.ffn.2")
        tokens = tokens + ffn * m[5]
    mh = w["head.modulation"][0] + e  # [2, D]: shift, scale
    out = _linear(_layer_norm(tokens) * (1 + mh[1]) + mh[0], w, "head.head")  # [L, 16*1*2*2]
    out = out.reshape(f, h, ww, 1, 2, 2, -1)
    return torch.einsum("fhwpqrc->cfphqwr", out).reshape(out.shape[-1], f, h * 2, ww * 2)


def phantom_rows(w, video: torch.Tensor, refs: torch.Tensor, t: float, prompt: torch.Tensor, negative: torch.Tensor,
                 heads: int, freq_dim: int) -> dict[str, torch.Tensor]:
    """The authors' three model calls of one step: video [16, F, H, W], refs [R, 16, H, W] (latents of the
    references), prompt / negative [L, text_dim] -> pos_it, pos_i, neg, each the video frames [16, F, H, W]."""
    frames = video.shape[1]
    with_refs = torch.cat([video, refs.transpose(0, 1)], 1)  # the references as latent frames F..F+R-1
    zero_refs = torch.cat([video, torch.zeros_like(refs).transpose(0, 1)], 1)
    calls = {"pos_it": (with_refs, prompt), "pos_i": (with_refs, negative), "neg": (zero_refs, negative)}
    return {name: wan_forward(w, x, t, ctx, heads, freq_dim)[:, :frames] for name, (x, ctx) in calls.items()}


def phantom_velocity(rows: dict[str, torch.Tensor], guide_scale_img: float = 5.0, guide_scale_text: float = 7.5):
    """``noise_pred = neg + guide_scale_img * (pos_i - neg) + guide_scale_text * (pos_it - pos_i)``."""
    neg, pos_i, pos_it = rows["neg"], rows["pos_i"], rows["pos_it"]
    return neg + guide_scale_img * (pos_i - neg) + guide_scale_text * (pos_it - pos_i)


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``load_ref_images``' fitting with PIL's own padding: Lanczos resize inside (width, height), then
    ``ImageOps.expand`` on white, (left, top) = half the slack rounded down."""
    img = Image.fromarray(image)
    ratio = img.width / img.height
    if ratio > width / height:
        size = (width, int(width / ratio))
    else:
        size = (int(height * ratio), height)
    img = img.resize(size, Image.Resampling.LANCZOS)
    dw, dh = width - img.width, height - img.height
    return np.asarray(ImageOps.expand(img, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(255, 255, 255)))
