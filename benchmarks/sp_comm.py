"""Per-step communication of Ulysses sequence parallel (and CFG parallel) beside the step's compute: a cost model.

    mvgen bench comm [--model 1.3B 14B] [--resolution 480p 720p] [--sp 2 4 8] [--out out/benchmarks]
    python -m benchmarks.sp_comm [same options]

Nothing runs on a GPU: bytes are counted from the shapes, times are those bytes over a link bandwidth and those
FLOPs at an *assumed* sustained throughput (``--tflops``), so the table says when sequence parallel pays, not
what a machine measures. The layout is ``engine.runtime.parallel``'s (DeepSpeed-Ulysses):

- Each of the ``sp`` ranks of a group holds a token shard of every stream (video, references), each stream
  zero-padded to a multiple of sp: ``n_s' = ceil(n_s / sp) * sp``, the padding travels like any token.
- Per layer, around the joint self-attention, one all-to-all each for Q, K and V trades the token shard
  [n'/sp, H, Dh] for a head shard of the whole sequence [n', H/sp, Dh], and one returns the output: 4 tensors.
  A rank keeps 1/sp of what it holds and sends the rest, so per layer, per GPU (sent = received)::

      ulysses_bytes = 4 * rows * sum_s(n_s' / sp) * (H / sp) * Dh * (sp - 1) * bytes_per_element

  which needs ``H % sp == 0`` (each rank attends over H/sp heads); other rows print "n/a: heads % sp != 0".
- Once per step the ranks all-gather the output latents (ring: each GPU sends its shard to sp - 1 ranks)::

      gather_bytes = (sp - 1) * rows * (n_video' / sp) * C_out * bytes_per_element,  C_out = 16 * pt*ph*pw = 64

- Layouts: ``SP`` (world = sp, each GPU carries the 2 CFG rows, cond + uncond, batched) and ``SP+CFG`` (world =
  2 * sp, each group of sp carries 1 row; after the call a GPU sends its row's velocity, 16 * F * H * W latent
  values, to its peer in the other group: ``cfg_bytes``).
- Bytes per step per GPU = layers * ulysses_bytes + gather_bytes + cfg_bytes; time = bytes / bandwidth, where
  the bandwidth is what one GPU's sends pass through (default 900 GB/s NVLink and 64 GB/s PCIe, as the issue
  asks; note H100/H200 NVLink's 900 GB/s sums both directions, 450 GB/s each way, and NCCL's achieved
  all-to-all rate is lower again, so these times are lower bounds: pass measured figures with --nvlink/--pcie).

Compute per step and GPU (2 FLOPs per multiply-add; D = H * Dh, FFN width Ff, text tokens Lt = 512, CLIP image
tokens Li = 257 on I2V checkpoints, 0 on T2V; per layer and row):

- per token of a shard, each stream's own weights: self-attention Q, K, V, out 8 D^2; cross-attention Q, out
  4 D^2; FFN 4 D Ff; cross-attention scores 4 D (Lt + Li). A rank computes its n_s'/sp tokens per stream;
  the reference stream stops after its last layer's Q/K/V (its output is never read).
- per stream, replicated on every rank (its tokens need every text/image key): cross-attention K/V
  projections 4 Lt D^2 + 4 Li D_img D.
- the joint self-attention, ``engine.modes.prototype.attention_flops(...)["full"]`` = 4 D (n_video + n_ref)^2
  (QK^T and PV), split over sp by heads.
Left out (under 0.1% at these sizes): patch embedding, output head, text/time embedders, norms, modulation.
Compute time = FLOPs / (--tflops); comm/compute is the share the link adds if nothing overlaps, and
``speed-up`` = (one GPU's step time) / (this GPU's compute + comm), again without overlap.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from engine.cli_args import parse_size
from engine.errors import UsageError
from engine.config import MvgenConfig

NAME = "comm"
HELP = "per-step communication of Ulysses sequence parallel beside the step's compute (a cost model, no GPU)"

BF16_BYTES = 2
CLIP_TOKENS = 257  # Wan2.1-I2V's image context: CLIP ViT-H/14 penultimate states, 16 x 16 patches + class token
ROWS = 2  # classifier-free guidance: conditional + unconditional rows per step
LAYOUTS = {"SP": False, "SP+CFG": True}  # name: CFG parallel
NOT_DIVISIBLE = "n/a: heads % sp != 0"

# the Wan2.1 transformers (diffusers config values); the 14B is MvgenConfig's default, spelled out here
MODELS = {
    "1.3B": ("Wan2.1-T2V-1.3B", dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                                     in_channels=16, image_dim=None, added_kv_proj_dim=None)),
    "14B": ("Wan2.1-I2V-14B", dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                                   in_channels=36, image_dim=1280, added_kv_proj_dim=5120)),
}
# name: (height, width, frames, reference side); MVI2V encodes square references at the video's short side
RESOLUTIONS = {"480p": (480, 832, 81, 480), "720p": (720, 1280, 81, 720)}
PIXELS_PER_TOKEN = 16  # VAE /8 and patch 2 in space: sizes must be multiples of 16


@dataclass(frozen=True)
class Video:
    """One step's input sizes in pixels: the video and ``refs`` references of ``ref_hw``."""

    name: str
    frames: int
    height: int
    width: int
    refs: int
    ref_hw: tuple[int, int]

    @property
    def latent_fhw(self) -> tuple[int, int, int]:
        """Wan VAE latents: time (F - 1) / 4 + 1, space / 8."""
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8

    @property
    def ref_latent_hw(self) -> tuple[int, int]:
        return self.ref_hw[0] // 8, self.ref_hw[1] // 8

    def stream_tokens(self, patch: tuple[int, int, int]) -> tuple[int, int]:
        """(video tokens, reference tokens) after the 1x2x2 patch embedding."""
        (f, h, w), (rh, rw), (pt, ph, pw) = self.latent_fhw, self.ref_latent_hw, patch
        return (f // pt) * (h // ph) * (w // pw), self.refs * (rh // ph) * (rw // pw)


def padded(tokens: int, sp: int) -> int:
    """A stream's token count zero-padded to a multiple of sp, as ``engine.runtime.parallel.SequenceParallel.shard`` pads."""
    return -(-tokens // sp) * sp


def _streams(tokens: int | Sequence[int]) -> tuple[int, ...]:
    return (tokens,) if isinstance(tokens, int) else tuple(tokens)


def ulysses_bytes(tokens: int | Sequence[int], heads: int, head_dim: int, sp: int, rows: int = ROWS,
                  dtype_bytes: int = BF16_BYTES) -> int:
    """Bytes one GPU sends (and receives) per layer in the 4 all-to-alls of Ulysses attention (Q, K, V, output).

    ``tokens``: the sharded token count, or one count per stream (each padded to a multiple of sp on its own);
    ``rows``: batch rows in the call. Raises ValueError when sp does not divide the heads."""
    if sp < 1:
        raise ValueError(f"sp must be >= 1, got {sp}")
    if heads % sp:
        raise ValueError(f"sp={sp} does not divide the {heads} heads")
    shard = sum(padded(n, sp) // sp for n in _streams(tokens))
    return 4 * rows * shard * (heads // sp) * head_dim * (sp - 1) * dtype_bytes


def gather_bytes(tokens: int, channels: int, sp: int, rows: int = ROWS, dtype_bytes: int = BF16_BYTES) -> int:
    """Bytes one GPU sends in a ring all-gather of a [rows, tokens (padded), channels] token-sharded output."""
    return (sp - 1) * rows * (padded(tokens, sp) // sp) * channels * dtype_bytes


def cfg_bytes(video: Video, channels: int = 16, dtype_bytes: int = BF16_BYTES) -> int:
    """Bytes one GPU sends to its CFG peer: its row's velocity [channels, F, H, W] latents."""
    return channels * math.prod(video.latent_fhw) * dtype_bytes


def step_bytes(cfg: MvgenConfig, video: Video, sp: int, cfg_parallel: bool, dtype_bytes: int = BF16_BYTES) -> dict:
    """Bytes one GPU sends per step: ``layer`` (one layer's all-to-alls), ``gather``, ``cfg``, ``step`` (all)."""
    rows = 1 if cfg_parallel else ROWS
    n_video, n_ref = video.stream_tokens(cfg.patch_size)
    layer = ulysses_bytes((n_video, n_ref), cfg.num_attention_heads, cfg.attention_head_dim, sp, rows, dtype_bytes)
    gather = gather_bytes(n_video, cfg.out_channels * math.prod(cfg.patch_size), sp, rows, dtype_bytes)
    exchange = cfg_bytes(video, cfg.out_channels, dtype_bytes) if cfg_parallel else 0
    return {"layer": layer, "gather": gather, "cfg": exchange, "step": cfg.num_layers * layer + gather + exchange}


def step_flops(cfg: MvgenConfig, video: Video, sp: int = 1, rows: int = ROWS) -> int:
    """FLOPs of one GPU per step when ``sp`` ranks share ``rows`` batch rows (sp=1: the whole step on one GPU).

    As the denoiser runs (``MultiViewWanTransformer._joint_blocks``): the reference stream skips its last
    layer's ``finish`` (output projection, cross-attention, FFN), whose output is never read."""
    from engine.modes.prototype import attention_flops

    d, image_tokens = cfg.inner_dim, (CLIP_TOKENS if cfg.image_dim is not None else 0)
    qkv = 6 * d * d  # per token
    finish = 6 * d * d + 4 * d * cfg.ffn_dim + 4 * d * (cfg.text_len + image_tokens)  # per token
    context_kv = 4 * cfg.text_len * d * d + 4 * image_tokens * (cfg.added_kv_proj_dim or 0) * d  # per stream
    n_video, n_ref = (padded(n, sp) // sp for n in video.stream_tokens(cfg.patch_size))
    layers = cfg.num_layers
    video_stream = layers * (n_video * (qkv + finish) + context_kv)
    ref_stream = layers * n_ref * qkv + (layers - 1) * (n_ref * finish + context_kv) if n_ref else 0
    joint = attention_flops(cfg, *video.latent_fhw, video.refs, video.ref_latent_hw)["full"]
    return rows * (video_stream + ref_stream + layers * joint // sp)


def model_config(model: str) -> MvgenConfig:
    return MvgenConfig(**MODELS[model][1])


def case_row(model: str, video: Video, sp: int, layout: str, args) -> dict:
    """One table row: the communication and compute of one GPU per step."""
    cfg, cfg_parallel = model_config(model), LAYOUTS[layout]
    n_video, n_ref = video.stream_tokens(cfg.patch_size)
    row = {"model": MODELS[model][0], "size": video.name, "frames": video.frames, "height": video.height,
           "width": video.width, "refs": video.refs, "ref_size": "x".join(map(str, video.ref_hw)),
           "video_tokens": n_video, "ref_tokens": n_ref, "tokens": f"{n_video + n_ref} ({n_video}+{n_ref})",
           "heads": cfg.num_attention_heads, "sp": sp, "layout": layout, "gpus": sp * (2 if cfg_parallel else 1)}
    if cfg.num_attention_heads % sp:
        return {**row, "skipped": NOT_DIVISIBLE, "mb_per_layer": NOT_DIVISIBLE}
    sent = step_bytes(cfg, video, sp, cfg_parallel)
    rows = 1 if cfg_parallel else ROWS
    flops, flops_one_gpu = step_flops(cfg, video, sp, rows), step_flops(cfg, video)
    compute_s, one_gpu_s = flops / (args.tflops * 1e12), flops_one_gpu / (args.tflops * 1e12)
    row.update(bytes_per_layer=sent["layer"], bytes_gather=sent["gather"], bytes_cfg=sent["cfg"],
               bytes_per_step=sent["step"], mb_per_layer=sent["layer"] / 1e6, gb_per_step=sent["step"] / 1e9,
               flops_per_step=flops, flops_per_step_one_gpu=flops_one_gpu, tflop_per_step=flops / 1e12,
               compute_s=compute_s)
    for link, gbps in (("nvlink", args.nvlink), ("pcie", args.pcie)):
        comm_s = sent["step"] / (gbps * 1e9)
        row.update({f"comm_ms_{link}": 1e3 * comm_s, f"ratio_{link}": comm_s / compute_s,
                    f"speedup_{link}": one_gpu_s / (compute_s + comm_s)})
    return row


def videos(args) -> list[Video]:
    """The sizes to model: the named resolutions, or the one --height x --width; --frames, --refs, --ref-size
    override every size."""
    if (args.height is None) != (args.width is None):
        raise UsageError("--height and --width go together (one custom size), or neither (the --resolution presets)")
    presets = ({f"{args.width}x{args.height}": (args.height, args.width, 81, min(args.height, args.width))}
               if args.height is not None else {name: RESOLUTIONS[name] for name in args.resolution})
    out = []
    for name, (height, width, frames, ref_side) in presets.items():
        ref_hw = args.ref_size or (ref_side, ref_side)
        out.append(Video(name, args.frames or frames, height, width, args.refs, ref_hw))
    return out


def check(args) -> None:
    """Refuse what the model cannot size, naming the flag and the allowed values."""
    bad_sp = [sp for sp in args.sp if sp < 1]
    if bad_sp:
        raise UsageError(f"--sp takes positive integers (ranks per sequence-parallel group), got {bad_sp}")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        raise UsageError(f"--frames must be 4k + 1 (1, 5, ..., 81: the Wan VAE's time stride), got {args.frames}")
    if args.refs < 0:
        raise UsageError(f"--refs must be >= 0, got {args.refs}")
    sizes = [("--height", args.height), ("--width", args.width)]
    if args.ref_size is not None:
        sizes += [("--ref-size", side) for side in args.ref_size]
    for flag, value in sizes:
        if value is not None and (value <= 0 or value % PIXELS_PER_TOKEN):
            raise UsageError(f"{flag} must be a positive multiple of {PIXELS_PER_TOKEN} pixels (VAE /8, patch 2), "
                             f"got {value}")
    for flag, value in (("--nvlink", args.nvlink), ("--pcie", args.pcie), ("--tflops", args.tflops)):
        if not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")


def _ref_size(text: str) -> tuple[int, int]:
    """``720`` (square) or ``HEIGHTxWIDTH``."""
    if "x" in text.lower():
        return parse_size(text)
    try:
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HEIGHTxWIDTH (e.g. 720 or 720x720), got {text!r}") from None


def add_arguments(p) -> None:
    p.add_argument("--model", nargs="+", choices=tuple(MODELS), default=list(MODELS),
                   help="Wan2.1 transformers to model: " + ", ".join(f"{k} ({v[0]})" for k, v in MODELS.items()))
    p.add_argument("--resolution", nargs="+", choices=tuple(RESOLUTIONS), default=list(RESOLUTIONS),
                   help="480p: 832x480 video, 480x480 references; 720p: 1280x720, 720x720 (81 frames each)")
    p.add_argument("--height", type=int, help="a custom video height in pixels (with --width; replaces --resolution)")
    p.add_argument("--width", type=int, help="a custom video width in pixels (with --height)")
    p.add_argument("--frames", type=int, help="video frames, 4k + 1 (default 81)")
    p.add_argument("--refs", type=int, default=3, help="reference images (default 3)")
    p.add_argument("--ref-size", type=_ref_size, metavar="N|HxW",
                   help="reference size in pixels (default: square, the video's short side)")
    p.add_argument("--sp", type=int, nargs="+", default=[2, 4, 8], help="sequence-parallel degrees (default 2 4 8)")
    p.add_argument("--nvlink", type=float, default=900.0, metavar="GB/S", help="NVLink bandwidth per GPU (900)")
    p.add_argument("--pcie", type=float, default=64.0, metavar="GB/S", help="PCIe bandwidth per GPU (64)")
    p.add_argument("--tflops", type=float, default=400.0,
                   help="ASSUMED sustained bf16 throughput per GPU in TFLOP/s for the compute times (400)")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"), help="directory for sp_comm.json/.md")


def columns(args) -> list[tuple[str, str]]:
    nv, pc, tf = f"{args.nvlink:g} GB/s", f"{args.pcie:g} GB/s", f"{args.tflops:g} TFLOP/s"
    return [("model", "model"), ("size", "size"), ("tokens", "tokens (video+ref)"), ("sp", "SP"),
            ("layout", "layout"), ("gpus", "GPUs"), ("mb_per_layer", "MB / layer / GPU"),
            ("gb_per_step", "GB / step / GPU"), ("comm_ms_nvlink", f"comm ms, NVLink {nv}"),
            ("comm_ms_pcie", f"comm ms, PCIe {pc}"), ("tflop_per_step", "TFLOP / step / GPU"),
            ("compute_s", f"compute s at {tf} (assumed)"), ("ratio_nvlink", "comm/compute NVLink"),
            ("ratio_pcie", "comm/compute PCIe"), ("speedup_nvlink", "speed-up vs 1 GPU, NVLink"),
            ("speedup_pcie", "speed-up vs 1 GPU, PCIe")]


def run(args) -> int:
    from .common import write_results

    check(args)
    rows = [case_row(model, video, sp, layout, args) for model in args.model for video in videos(args)
            for sp in sorted(set(args.sp)) for layout in LAYOUTS]
    config = {"models": {MODELS[m][0]: model_config(m).wan_dict() for m in args.model}, "dtype": "bfloat16",
              "cfg_rows": ROWS, "text_tokens": MvgenConfig.text_len, "clip_tokens_i2v": CLIP_TOKENS,
              "nvlink_gb_per_s": args.nvlink, "pcie_gb_per_s": args.pcie,
              "assumed_tflops": args.tflops, "note": "cost model: bytes from shapes, times from the assumed "
              "bandwidths and throughput, nothing measured; formulas in benchmarks/sp_comm.py"}
    table = write_results("sp_comm", rows, columns(args), args.out, config)
    print(f"Sequence-parallel communication per denoiser step (bf16, {ROWS} CFG rows, no overlap). Compute times "
          f"assume {args.tflops:g} TFLOP/s sustained per GPU: an assumption, not a measurement.\n")
    print(table)
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
