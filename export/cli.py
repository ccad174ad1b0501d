"""``mvgen export onnx|tensorrt|refit`` (registered by ``mvgen.cli`` through ``add_parser``).

TensorRT steps print ``skipped: tensorrt not installed`` and exit with status 3 (``EXIT_SKIPPED``) where
``tensorrt`` cannot be imported: a skip is never reported as success. The Triton repository around a plan
is the server's (``mvgen repository``): the exporter does not import the server.
"""
from __future__ import annotations

import sys
from pathlib import Path

from engine.cli_args import add_model_arguments, checkpoint_sources, parse_overrides
from engine.errors import UsageError

EXIT_SKIPPED = 3


def user_errors() -> tuple[type[Exception], ...]:
    """The exporter refuses bad command lines with ``UsageError``; a missing TensorRT is a skip, not an error."""
    return (UsageError,)


def add_parser(subparsers) -> None:
    from engine.config import QUANTIZE_MODES

    from .calibration_inputs import FP8_CALIBRATIONS

    export = subparsers.add_parser("export", help="export the denoiser: ONNX graph, TensorRT engines")
    commands = export.add_subparsers(dest="export_command", metavar="COMMAND", parser_class=type(export))
    commands.required = True

    p = commands.add_parser("onnx", help="denoiser with the LoRA merged -> ONNX (dynamic axes, external weights)")
    add_model_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="directory for denoiser.onnx(.data) and export.json")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--attention", choices=("native", "plugin"), default="native",
                   help="native: plain ONNX ops (TensorRT fuses them); plugin: one mvgen.JointAttention node each")
    p.add_argument("--profile", help="TensorRT profile recorded with the graph, e.g. batch=1:2:2,frames=1:21:21")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="denoiser config override, e.g. ref_attention=isolated (repeatable)")
    p.add_argument("--expert", type=int, choices=(1, 2), default=1,
                   help="which denoiser of a two-expert checkpoint (Wan2.2: 1 high noise, 2 low noise)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                   help="fp8: the block linears as FP8 weights behind DequantizeLinear and FP8 Q/DQ on their inputs "
                        "(opset 19, TensorRT's FP8 recipe; export.fp8_onnx)")
    p.add_argument("--fp8-calibration", choices=FP8_CALIBRATIONS, default="sample",
                   help="what --quantize fp8's activation scales are calibrated on: sample (the exporter's seeded "
                        "random inputs) or generation (the denoiser inputs of a short generation of this checkpoint "
                        "from the demo images; loads the encoders and VAE too); export.json records which")
    p.add_argument("--verify", action="store_true", help="then compare with PyTorch through polygraphy (fp32)")
    p.set_defaults(func=run_onnx)

    p = commands.add_parser("tensorrt", help="build a TensorRT engine from an exported ONNX directory")
    p.add_argument("--onnx", type=Path, required=True, help="directory written by `mvgen export onnx`")
    p.add_argument("--out", type=Path, required=True, help="plan file to write (its metadata goes to PLAN.json)")
    p.add_argument("--profile", help="min:opt:max per axis, e.g. batch=1:2:2,height=16:60:104 (default: export's)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_const", dest="precision", const="fp16")
    precision.add_argument("--bf16", action="store_const", dest="precision", const="bf16")
    p.add_argument("--timing-cache", type=Path, help="timing cache to read (if present) and update")
    p.add_argument("--refit", action="store_true", help="build with refittable weights (for `mvgen export refit`)")
    p.add_argument("--workspace-gib", type=float, help="builder workspace limit")
    p.set_defaults(func=run_tensorrt)

    p = commands.add_parser("refit", help="swap the reference-stream LoRA of a refittable engine (no rebuild)")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True, help="the new LoRA (.safetensors or PEFT dir)")
    p.add_argument("--out", type=Path, help="write the refitted plan here (default: in place)")
    p.add_argument("--model", help="base checkpoint (default: the one the plan was exported from)")
    p.add_argument("--lora-scale", type=float, help="override alpha/rank of the adapter")
    p.set_defaults(func=run_refit)


def _profile(spec):
    from engine.denoiser_io import Profile

    try:
        return Profile.parse(spec) if spec else None
    except ValueError as error:
        raise UsageError(f"--profile: {error}") from error


def _skipped(error) -> int:
    print(str(error), file=sys.stderr)
    return EXIT_SKIPPED


def _overrides(args) -> dict:
    """``--set`` items, and ``--quantize`` unless ``--set`` gave it."""
    overrides = parse_overrides(args.overrides)
    if args.quantize != "none" and "quantize" not in overrides:
        overrides["quantize"] = args.quantize
    return overrides


def run_onnx(args) -> int:
    from .onnx_export import export_onnx

    try:
        path = export_onnx(args.model, args.out, adapter=args.adapter, dtype=args.dtype, attention=args.attention,
                           profile=_profile(args.profile), cache_root=args.cache_dir, expert=args.expert - 1,
                           sources=checkpoint_sources(args), fp8_calibration=args.fp8_calibration,
                           **_overrides(args))
    except ValueError as error:
        if type(error) is not ValueError:
            raise
        raise UsageError(str(error)) from error
    print(path)
    if args.verify:
        return _verify(args, path)
    return 0


def _verify(args, path) -> int:
    from .onnx_export import load_for_export
    from .verify import verify_onnx

    if args.dtype != "fp32":
        print("verify: skipped (onnxruntime verification runs fp32 graphs)", file=sys.stderr)
        return 0
    from .fp8_onnx import static_scales
    from .onnx_export import read_meta

    denoiser, _ = load_for_export(args.model, args.adapter, "fp32", None, args.cache_dir, args.expert - 1,
                                  checkpoint_sources(args), _overrides(args))
    fp8 = read_meta(path.parent).get("fp8")
    if fp8:  # the graph's oracle is the model on its static path with the graph's activation scales; an FP8 code
        # that float32 noise flips in the graph moves the output by up to ~3e-3 (tests/export/test_fp8_export.py)
        with static_scales(denoiser, fp8["activation_scales"]):
            results = verify_onnx(path, denoiser, rtol=5e-3)
    else:
        results = verify_onnx(path, denoiser)
    for r in results:
        print(f"verify {'ok  ' if r.passed else 'FAIL'} rel_err={r.rel_err:.2e} {r.sizes}")
    return 0 if all(r.passed for r in results) else 1


def run_tensorrt(args) -> int:
    from .tensorrt_build import TensorRTUnavailable, build_engine

    try:
        plan = build_engine(args.onnx, args.out, profile=_profile(args.profile), precision=args.precision,
                            timing_cache=args.timing_cache, refit=args.refit, workspace_gib=args.workspace_gib)
    except TensorRTUnavailable as error:
        return _skipped(error)
    print(plan)
    return 0


def run_refit(args) -> int:
    from .tensorrt_build import TensorRTUnavailable, refit_engine

    try:
        plan = refit_engine(args.plan, args.adapter, out=args.out, model=args.model, lora_scale=args.lora_scale,
                            cache_root=args.cache_dir)
    except TensorRTUnavailable as error:
        return _skipped(error)
    print(plan)
    return 0
