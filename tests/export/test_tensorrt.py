"""TensorRT engine build and LoRA refit: real where tensorrt (and a GPU) exist, a reported skip elsewhere."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from export import cli
from export.tensorrt_build import SKIP_REASON
from tests.export.conftest import run_cli

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the skip path is not taken")
@pytest.mark.parametrize("argv", [
    ["export", "tensorrt", "--onnx", "missing_dir", "--out", "x.plan", "--fp16"],
    ["export", "refit", "--plan", "x.plan", "--adapter", "a.safetensors"],
])
def test_without_tensorrt_the_cli_reports_a_skip(argv, capsys):
    assert run_cli(argv) == cli.EXIT_SKIPPED
    assert capsys.readouterr().err.strip() == SKIP_REASON


@pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: TensorRT needs a CUDA GPU")
@pytest.mark.skipif(not HAVE_TENSORRT, reason=SKIP_REASON)
def test_native_engine_matches_pytorch_and_refits_a_new_lora(checkpoint, tmp_path):
    import numpy as np
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from engine.backbones.registry import load_denoiser
    from export.onnx_export import export_onnx, graph_specs, sample_inputs
    from export.tensorrt_build import build_engine, refit_engine

    from .conftest import unmerged_model
    from .test_onnx import SHAPES

    root, adapter, _ = checkpoint
    onnx_dir = tmp_path / "onnx"
    export_onnx(root, onnx_dir, adapter=adapter, attention="native")
    plan = build_engine(onnx_dir, tmp_path / "den.plan", refit=True,
                        timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").is_file()
    oracle = unmerged_model(checkpoint).cuda()
    feed = sample_inputs(graph_specs(oracle.config), SHAPES["r3_big_refs"], torch.float32,
                         torch.Generator().manual_seed(0))

    def engine_output(path):
        with TrtRunner(EngineFromBytes(BytesFromPath(str(path)))) as runner:
            return runner.infer({k: v.numpy() for k, v in feed.items()})["velocity"]

    with torch.no_grad():
        want = oracle(**{k: v.cuda() for k, v in feed.items()}).cpu().numpy()
    got = engine_output(plan)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2  # TF32 matmuls inside TensorRT

    plain = tmp_path / "plain.safetensors"  # a LoRA of zeros: the refitted engine is the base model
    from safetensors.torch import load_file, save_file
    save_file({k: torch.zeros_like(v) for k, v in load_file(adapter / "adapter_model.safetensors").items()
               if "lora" in k}, plain)
    refitted = refit_engine(plan, plain, out=tmp_path / "refit.plan", model=root)
    with torch.no_grad():
        base = load_denoiser(root, attention_backend="reference").cuda()
        want = base(**{k: v.cuda() for k, v in feed.items()}).cpu().numpy()
    got = engine_output(refitted)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: TensorRT needs a CUDA GPU")
@pytest.mark.skipif(not HAVE_TENSORRT, reason=SKIP_REASON)
@pytest.mark.parametrize("mask", ["full", "isolated"])
def test_plugin_engine_runs_the_triton_kernel(tmp_path, mask):
    """head_dim 64 (the kernel's smallest), fp16 graph built strongly typed with the AOT plugin."""
    import numpy as np
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from engine.backbones.registry import load_denoiser
    from export.onnx_export import export_onnx, graph_specs, sample_inputs
    from export.tensorrt_build import build_engine
    from tests.engine.conftest import make_wan

    from .test_onnx import SHAPES

    make_wan(seed=7, attention_head_dim=64, added_kv_proj_dim=128).save_pretrained(
        tmp_path / "wan" / "transformer", safe_serialization=True)
    export_onnx(tmp_path / "wan", tmp_path / "onnx", dtype="fp16", attention="plugin", ref_attention=mask)
    plan = build_engine(tmp_path / "onnx", tmp_path / "den.plan")
    den = load_denoiser(tmp_path / "wan", dtype=torch.float16, device="cuda", ref_attention=mask)
    feed = sample_inputs(graph_specs(den.config), SHAPES["r3_big_refs"], torch.float16,
                         torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = den(**{k: v.cuda() for k, v in feed.items()}).float().cpu().numpy()
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan)))) as runner:
        got = runner.infer({k: v.numpy() for k, v in feed.items()})["velocity"].astype(np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
