"""Peak memory of loading an FP8 single file: this revision against another (``--baseline REV``).

    mvgen bench fp8-load [--baseline REV] [--repeats 2] [--out out/benchmarks] [--cache-dir DIR]

The CPU-sized checkpoint (``benchmarks.server_memory``: Wan2.1-I2V's layout at 4 layers x 768) written as a LightX2V
``--linear_type fp8`` single file (its rule: the ``self_attn``/``cross_attn``/``ffn`` weights per output channel,
absmax / 448, ``<layer>.weight_scale`` [out, 1] float32; everything else bfloat16), then loaded with
``load_denoiser(..., weights_file=...)`` in a fresh process per sample: ``--quantize fp8`` and without it in bfloat16
and float32. A sample is the growth of the process's peak resident set (``VmHWM``) over the load, after the imports
and diffusers' meta model (built before the first reading), and of its resident set after it, every model tensor read
once first (safetensors maps the file and reads a page when it is first touched: FP8 weights that stay in that
mapping count once read); beside them the loaded model's parameter bytes, and a SHA-256 of the model's FP8 bytes and
scales, so that two revisions that load the same weights say so.

``--baseline REV`` runs the same samples on that git revision's tree (``git archive`` into a temporary folder): the
revision before the direct path passed every FP8 weight through bfloat16 and requantised it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from io import BytesIO
from pathlib import Path

NAME = "fp8-load"
HELP = "peak memory of loading an FP8 single file (LightX2V layout, CPU-sized checkpoint), against a baseline revision"

LIGHTX2V_TARGETS = ("self_attn", "cross_attn", "ffn")  # the block linears LightX2V's fp8 conversion quantises
# (label, load_denoiser keywords) of each load measured
LOADS = (("--quantize fp8", {"quantize": "fp8"}),
         ("no quantize, bfloat16", {"dtype": "bfloat16"}),
         ("no quantize, float32", {"dtype": "float32"}))

_SAMPLE = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from engine.backbones.registry import load_denoiser
    from engine.backbones.wan.single_file import _wan_parameter_patterns
    from engine.runtime.fp8 import quantized_modules

    def status(key):
        return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith(key))

    path, file, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if "dtype" in options:
        options["dtype"] = getattr(torch, options["dtype"])
    _wan_parameter_patterns()  # diffusers' converter and meta model, imported and built before the baseline
    before, resident = status("VmHWM"), status("VmRSS")
    model = load_denoiser(path, weights_file=file, ref_mode="token_concat", **options)
    tensors = {id(t): t for t in model.state_dict().values()}
    for tensor in tensors.values():  # every page resident (weights still in the file's mapping are read lazily)
        tensor.detach().flatten().view(torch.uint8).max()
    grown, held = status("VmHWM") - before, status("VmRSS") - resident
    digest = hashlib.sha256()
    for module in quantized_modules(model):
        digest.update(module.weight.view(torch.uint8).numpy().tobytes())
        digest.update(module.weight_scale.numpy().tobytes())
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(json.dumps({"peak_growth": grown, "resident_growth": held, "model_bytes": model_bytes,
                      "fp8_sha256": digest.hexdigest() if quantized_modules(model) else None}))
""")


def lightx2v_tensors(state: dict) -> dict:
    """``state`` (original Wan names, 16/32-bit) as LightX2V's FP8 single file holds it (module docstring)."""
    import torch

    out = {}
    for key, value in state.items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2 \
                and key.split(".")[2] in LIGHTX2V_TARGETS:
            scale = value.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / 448.0
            out[key] = (value.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            out[key.removesuffix(".weight") + ".weight_scale"] = scale
        else:
            out[key] = value.to(torch.bfloat16).contiguous()
    return out


def build(args) -> tuple[Path, Path]:
    """(the CPU-sized checkpoint, its LightX2V FP8 file), built once under ``--cache-dir``."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from engine.backbones.wan.original_names import to_original_wan
    from engine.tiny import ensure_tiny

    from .server_memory import build_cpu_sized

    checkpoint = build_cpu_sized(ensure_tiny(args.cache_dir), args.cache_dir / "cpu-sized")
    file = args.cache_dir / "cpu-sized-lightx2v-fp8.safetensors"
    if not file.is_file():
        state = WanTransformer3DModel.from_pretrained(checkpoint / "transformer").state_dict()
        save_file(lightx2v_tensors(to_original_wan(state)), file)
    return checkpoint, file


def tree_of(revision: str, dest: Path) -> Path:
    """The source tree of a git ``revision`` extracted into ``dest``."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def sample(code: Path, checkpoint: Path, file: Path, options: dict) -> dict:
    """One load in a fresh process whose imports come from ``code``."""
    out = subprocess.run([sys.executable, "-c", _SAMPLE, str(checkpoint), str(file), json.dumps(options)],
                         capture_output=True, text=True, check=True, cwd=code, env=_env(code))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(code: Path) -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(code)}


def measure(args) -> list[dict]:
    checkpoint, file = build(args)
    here = Path(__file__).resolve().parent.parent
    rows = []
    with tempfile.TemporaryDirectory(prefix="mvgen_fp8_load_") as tmp:
        codes = [("this revision", here)]
        if args.baseline:
            codes.append((f"baseline {args.baseline}", tree_of(args.baseline, Path(tmp))))
        for label, options in LOADS:
            for code_label, code in codes:
                samples = [sample(code, checkpoint, file, options) for _ in range(args.repeats)]
                grown = [s["peak_growth"] / 2**20 for s in samples]
                rows.append({"load": label, "code": code_label, "peak_growth_mib": min(grown),
                             "samples_mib": grown, "model_mib": samples[0]["model_bytes"] / 2**20,
                             "resident_growth_mib": min(s["resident_growth"] for s in samples) / 2**20,
                             "fp8_sha256": samples[0]["fp8_sha256"]})
    file_mib = file.stat().st_size / 2**20
    for row in rows:
        row["file_mib"] = file_mib
        row["peak_over_model"] = row["peak_growth_mib"] / row["model_mib"]
    return rows


COLUMNS = [("load", "load"), ("code", "code"), ("file_mib", "file MiB"), ("model_mib", "model MiB"),
           ("peak_growth_mib", "peak RSS growth MiB (min)"), ("peak_over_model", "peak / model"),
           ("resident_growth_mib", "RSS growth after the load MiB"),
           ("fp8_sha256", "FP8 bytes + scales, SHA-256")]


def add_arguments(p) -> None:
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="a git revision to measure beside this one (its tree extracted with git archive)")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per load and revision (the minimum kept)")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"))


def run(args) -> int:
    from engine.errors import UsageError

    from .common import write_results

    if args.repeats < 1:
        raise UsageError(f"--repeats must be a positive integer, got {args.repeats}")
    rows = measure(args)
    config = {"checkpoint": "CPU-sized Wan2.1-I2V (benchmarks.server_memory.CPU_SIZED), ref_mode token_concat",
              "file": "LightX2V --linear_type fp8 layout", "baseline": args.baseline, "repeats": args.repeats,
              "metric": "VmHWM growth over load_denoiser, fresh process per sample"}
    print(write_results("fp8_load", rows, COLUMNS, args.out, config))
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    sys.exit(main())
