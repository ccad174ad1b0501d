"""Accuracy of the 8-bit joint attention (``--attention-precision int8``) against float64, on CPU.

    python -m benchmarks.attention_accuracy [--out benchmarks/results] [--quick]

Operands (Q rotated and scaled by sm_scale * log2 e, K rotated: what the QK prologue hands the attention), 12 heads
of 128 (Wan 1.3B), awkward lengths (not multiples of the 128-token blocks):
  - ``gaussian``: Q, K, V standard normal;
  - ``offset channels``: K with 6 of its 128 channels offset by 5-20 standard deviations, the same for every key
    (the channel outliers SageAttention measured in trained models' keys);
  - ``diffusers Wan``: Q/K/V captured by forward hooks on ``norm_q``/``norm_k``/``to_v`` of the self-attention of
    a diffusers ``WanTransformer3DModel`` (1.3B widths, 2 layers) then rotated at the video grid's positions; its
    weights are diffusers' initialisation with trained-like QK statistics put in (lognormal RMSNorm gains, a few
    key channels with a large bias), since no trained weights reach this machine.
Each is cut into [video | reference] streams for ``full``/``isolated`` and into [video | per-frame prototypes] for
``prototype``. Methods, all on the bf16-rounded operands: ``bf16`` (the 16-bit path's arithmetic on the CPU: SDPA
on bf16 tensors), ``int8 + fp8 PV`` (the Hopper kernel's arithmetic: ``kernels.quantized_attention``'s float64
reference, 128x128 blocks), ``int8 + 16-bit PV`` (sm_80's), ``int8 + fp8 PV, no smoothing``. Metrics against
exact float64 attention: cosine similarity and relative Frobenius error of the whole output, and the worst
query row's relative error.

Then the whole denoiser (the engine's Wan at 1.3B widths, 2 layers, one reference, the same trained-like weights):
each step's velocity on the float32 trajectory of a 6-step flow-matching generation and the final latent of the
generation, for int8 attention and for the bf16 denoiser, against float32. Writes ``attention_accuracy.json`` and
``attention_accuracy.md`` (benchmarks.common format).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

from .common import write_results

HEADS, HEAD_DIM = 12, 128
WAN_LATENT = (4, 22, 38)  # latent frames, height, width: 4 x 11 x 19 = 836 tokens after the 1x2x2 patches
METHODS = ("bf16", "int8 + fp8 PV", "int8 + 16-bit PV", "int8 + fp8 PV, no smoothing")


# ---- operands ----------------------------------------------------------------------------------------------------
def _scaled_q(q: torch.Tensor) -> torch.Tensor:
    """What the prologue folds into Q: the softmax scale and log2 e (base-2 logits)."""
    import kernels

    return q * (kernels.LOG2E / math.sqrt(q.shape[-1]))


def synthetic_operands(gen: torch.Generator, n: int, offsets: bool):
    q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    if offsets:
        channels = torch.randperm(HEAD_DIM, generator=gen)[:6]
        k[..., channels] += torch.empty(HEADS, 6, dtype=torch.float64).uniform_(5, 20, generator=gen) * torch.sign(
            torch.randn(HEADS, 6, generator=gen, dtype=torch.float64))
    return _scaled_q(q), k, v


def trained_like_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Trained-like QK statistics on a randomly initialised Wan (diffusers or engine names): lognormal RMSNorm gains
    on Q and K, and on the self-attention's keys a bias with 4% of its channels large (shared by every token:
    smoothing's target)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("norm_q", "norm_k")) and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.exp(0.6 * torch.randn(module.weight.shape, generator=gen)))
            if name.endswith("attn1.to_k"):
                # the projection's outputs have a standard deviation of ~0.6 (diffusers' init on LayerNorm'd input)
                bias = 0.02 * torch.randn(module.bias.shape, generator=gen)
                loud = torch.rand(module.bias.shape, generator=gen) < 0.04
                bias[loud] = 2.5 * torch.randn(int(loud.sum()), generator=gen)  # ~4x that, on every token
                module.bias.copy_(bias)


def wan_model(gen: torch.Generator):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=256, ffn_dim=1024, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024).eval()
    trained_like_(model, gen)
    return model


def wan_operands(model, gen: torch.Generator):
    """[(q, k, v)] per layer: the self-attention's normalised Q/K and V from forward hooks, rotated at the video
    grid's positions (the prologue's output)."""
    from kernels.rope import apply_rope, rope_angles

    captured = {}

    def keep(name):
        def hook(module, args, output):
            captured.setdefault(name, output.detach().double())
        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        for part in ("norm_q", "norm_k", "to_v"):
            handles.append(getattr(block.attn1, part).register_forward_hook(keep((i, part))))
    frames, height, width = WAN_LATENT
    with torch.no_grad():
        model(hidden_states=torch.randn(1, 16, frames, height, width, generator=gen),
              timestep=torch.tensor([700.0]), encoder_hidden_states=torch.randn(1, 16, 64, generator=gen))
    for handle in handles:
        handle.remove()
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    angles = rope_angles(torch.stack([t, h, w], -1).reshape(-1, 3), HEAD_DIM, dtype=torch.float64)
    out = []
    for i in range(len(model.blocks)):
        q, k, v = (captured[i, part].unflatten(-1, (HEADS, HEAD_DIM)) for part in ("norm_q", "norm_k", "to_v"))
        out.append((_scaled_q(apply_rope(q, angles)), apply_rope(k, angles), v))
    return out


def layouts(n: int, frames: int) -> dict:
    """The attention's stream keywords per mask for n tokens of ``frames`` frames: the last frame is the reference
    stream (``full``, ``isolated``) or is cut into one prototype per earlier frame (``prototype``; n shrinks)."""
    per_frame = n // frames
    video = (frames - 1) * per_frame
    proto = per_frame // (frames - 1)
    n_proto = video + (frames - 1) * proto
    return {"full": (n, dict(q_offsets=(video, n), k_offsets=(video, n), mask="full")),
            "isolated": (n, dict(q_offsets=(video, n), k_offsets=(video, n), mask="isolated")),
            "prototype": (n_proto, dict(q_offsets=(video, n_proto), k_offsets=(video, n_proto), mask="prototype",
                                        tokens_per_frame=per_frame, proto_tokens=proto))}


# ---- metrics -----------------------------------------------------------------------------------------------------
def run_method(method: str, q, k, v, kw: dict) -> torch.Tensor:
    from kernels import rotated_attention_reference
    from kernels.quantized_attention import DEFAULT_BLOCKS, quantized_attention_reference

    if method == "bf16":
        return rotated_attention_reference(q, k, v, **kw)
    pv = "16bit" if "16-bit" in method else "fp8"
    return quantized_attention_reference(q, k, v, **kw, pv=pv, block_q=DEFAULT_BLOCKS[0], block_k=DEFAULT_BLOCKS[1],
                                         smooth="no smoothing" not in method)


def errors(out: torch.Tensor, exact: torch.Tensor) -> dict:
    out, exact = out.double().flatten(), exact.flatten()
    cos = torch.nn.functional.cosine_similarity(out, exact, dim=0).item()
    return dict(cos=cos, rel_err=((out - exact).norm() / exact.norm()).item())


def worst_row(out: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest relative error of one query row (over its heads and channels)."""
    diff = (out.double() - exact).flatten(2).norm(dim=-1)
    return (diff / exact.flatten(2).norm(dim=-1).clamp_min(1e-30)).max().item()


def operand_rows(source: str, layer: int | None, q, k, v, frames: int) -> list[dict]:
    from kernels import rotated_attention_reference

    rows = []
    for mask, (n, kw) in layouts(q.shape[1], frames).items():
        q16, k16, v16 = (t[:, :n].to(torch.bfloat16) for t in (q, k, v))
        exact = rotated_attention_reference(q16.double(), k16.double(), v16.double(), **kw)
        for method in METHODS:
            out = run_method(method, q16, k16, v16, kw)
            rows.append(dict(section="attention", source=source, layer=layer, mask=mask, tokens=n, method=method,
                             **errors(out, exact), worst_row=worst_row(out, exact)))
    return rows


# ---- the whole denoiser ----------------------------------------------------------------------------------------------
def denoiser_rows(model, gen: torch.Generator, steps: int) -> list[dict]:
    """Velocity per step (on the float32 trajectory) and final latent of a generation: int8 attention in the float32
    denoiser, the bf16 denoiser, int8 attention in the bf16 denoiser, each against the float32 denoiser."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from engine.backbones.registry import load_denoiser

    frames, height, width = WAN_LATENT
    x = dict(latents=torch.randn(1, 16, frames, height, width, generator=gen), text=torch.randn(1, 16, 64, generator=gen),
             ref_latents=torch.randn(1, 1, 16, 16, 16, generator=gen), condition=None, image_context=None)

    def generate(denoiser, dtype, teacher=None):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        cast = {k: None if t is None else t.to(dtype) for k, t in x.items()}
        latents, velocities, visited = cast["latents"], [], []
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                at = latents if teacher is None else teacher[i].to(dtype)
                visited.append(at)
                velocity = denoiser(**dict(cast, latents=at, timestep=t.expand(1)))
                velocities.append(velocity.double())
                latents = scheduler.step(velocity, t, latents).prev_sample
        return latents.double(), velocities, visited

    with tempfile.TemporaryDirectory(prefix="mvgen-accuracy-") as folder:
        model.save_pretrained(Path(folder) / "transformer", safe_serialization=True)
        fp32 = load_denoiser(folder)
        bf16 = load_denoiser(folder, dtype=torch.bfloat16)
    final, velocities, trajectory = generate(fp32, torch.float32)
    rows = []
    for name, denoiser, dtype in (("int8 attention, float32 denoiser", fp32, torch.float32),
                                  ("bf16 denoiser", bf16, torch.bfloat16),
                                  ("int8 attention, bf16 denoiser", bf16, torch.bfloat16)):
        if "int8" in name:
            denoiser.config = denoiser.config.replace(attention_precision="int8")
        got_final, _, _ = generate(denoiser, dtype)
        _, got_velocities, _ = generate(denoiser, dtype, teacher=trajectory)
        per_step = [errors(a, b)["rel_err"] for a, b in zip(got_velocities, velocities)]
        rows.append(dict(section="denoiser", source="engine Wan 1.3B widths, 2 layers", method=name,
                         tokens=frames * (height // 2) * (width // 2) + 64, rel_err=errors(got_final, final)["rel_err"],
                         velocity_rel_err_per_step=per_step, velocity_rel_err_max=max(per_step)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="the diffusers Wan operands only, no denoiser run")
    parser.add_argument("--steps", type=int, default=6, help="flow-matching steps of the denoiser generation")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    if not args.quick:
        for source, offsets in (("gaussian", False), ("offset channels", True)):
            rows += operand_rows(source, None, *synthetic_operands(gen, 1000, offsets), frames=4)
    model = wan_model(gen)
    for layer, (q, k, v) in enumerate(wan_operands(model, gen)):
        rows += operand_rows("diffusers Wan", layer, q, k, v, frames=WAN_LATENT[0])
    if not args.quick:
        rows += denoiser_rows(model, gen, args.steps)
    config = dict(heads=HEADS, head_dim=HEAD_DIM, wan_latent=WAN_LATENT, steps=args.steps, quick=args.quick,
                  blocks="128x128 (the sm_90 kernel's tiles)", operands="bfloat16")
    print(write_results("attention_accuracy", rows, [
        ("section", "section"), ("source", "operands"), ("layer", "layer"), ("mask", "mask"), ("tokens", "tokens"),
        ("method", "method"), ("cos", "cosine"), ("rel_err", "rel. error"), ("worst_row", "worst row"),
        ("velocity_rel_err_max", "velocity rel. error (worst step)"),
    ], args.out, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
