"""Wan2.2-TI2V-5B's denoiser (48 latent channels; a first frame, when given, replaces the noisy latents where it is
known and those tokens run at timestep 0) exported to ONNX: its inputs are the ones the served loop sends (a
timestep per row, the per-token timesteps derived in the graph from the condition's known mask), and onnxruntime
runs it as the unmerged PyTorch model (PEFT LoRA on the reference stream) and, without references, as diffusers'
``WanTransformer3DModel`` fed as its TI2V pipelines feed it. Conditions cycle through a whole first frame, none (a
zero condition: a graph has no optional inputs) and an inpainting mask (``export.onnx_export.ti2v_condition``)."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch

from engine import denoiser_io
from export.onnx_export import EXPORT_SIZES, TI2V_ROWS, graph_specs, sample_inputs
from export.plugin import onnxruntime_session
from export.tensorrt_build import SKIP_REASON
from export.verify import relative_error, verify_onnx

from .test_onnx import SHAPES

pytestmark = pytest.mark.slow  # exports a TI2V graph and runs it in onnxruntime

# relative error of the float32 graph (onnxruntime's kernels sum in another order) measured on an AMD EPYC, seeds 0..2:
# 2.9e-7 .. 7.0e-7 against the unmerged PyTorch model over SHAPES, 5.6e-7 .. 7.8e-7 against diffusers
RTOL = 2e-6


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_ti2v_graph_matches_unmerged_pytorch(ti2v_exported, shape):
    path, oracle, _ = ti2v_exported
    assert all(SHAPES[shape][k] != EXPORT_SIZES[k] for k in ("frames", "height", "refs"))
    (result,) = verify_onnx(path, oracle, shapes=[SHAPES[shape]], rtol=RTOL, seed=sorted(SHAPES).index(shape))
    assert result.passed, f"relative error {result.rel_err:.2e} at {result.sizes}"


def test_ti2v_graph_takes_what_the_served_loop_sends(ti2v_exported):
    """A timestep per row (``server.models.RemoteStages._wire``: one value per row; no per-token input), the
    1 + 48-channel condition, 48 channels out, every dynamic axis named as ``engine.denoiser_io`` declares it."""
    path, oracle, _ = ti2v_exported
    model = onnx.load(str(path), load_external_data=False)
    assert not [i.name for i in model.graph.initializer if "lora" in i.name.lower()]
    specs = denoiser_io.config_specs(oracle.config)
    graph_io = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]}
    assert graph_io == {s.name: list(s.dims) for s in [*specs, denoiser_io.output_spec(oracle.config)]}
    assert graph_io["timestep"] == ["batch"] and "image_context" not in graph_io
    assert graph_io["condition"][1] == 49 and graph_io["latents"][1] == graph_io["velocity"][1] == 48


def test_ti2v_graph_without_references_equals_diffusers(ti2v_exported):
    """R = 0: the graph is its base model. diffusers' TI2V pipelines (``expand_timesteps``) give the transformer
    ``(1 - m) * first + m * latents`` and timesteps ``m * t`` per token (m = 0 where the first frame is known,
    sampled at each 2x2 patch's first cell); a row without a first frame is its text-to-video call."""
    path, oracle, base = ti2v_exported
    sizes = dict(SHAPES["r0"], batch=len(TI2V_ROWS), frames=3)
    feed = sample_inputs(graph_specs(oracle.config), sizes, torch.float32, torch.Generator().manual_seed(21),
                         oracle.config)
    known, first = feed["condition"][:, :1], feed["condition"][:, 1:]
    assert [int(k.sum() > 0) for k in known] == [1, 0, 1] and 0 < known[2].mean() < known[0].mean()
    tokens = (known[:, 0, :, ::2, ::2] * feed["timestep"][:, None, None, None]).flatten(1)
    with torch.no_grad():
        want = base(known * first + (1 - known) * feed["latents"], feed["timestep"][:, None] - tokens,
                    feed["text"], return_dict=False)[0].numpy()
        no_condition = oracle(feed["latents"][1:2], None, feed["timestep"][1:2], feed["text"][1:2], None).numpy()
    got = onnxruntime_session(path).run(None, {k: v.numpy() for k, v in feed.items()})[0]
    assert relative_error(got, want) < RTOL
    # the zero condition a graph takes for text-to-video is the python denoiser's call without one
    assert relative_error(got[1:2], no_condition) < RTOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: TensorRT needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason=SKIP_REASON)
def test_ti2v_engine_matches_pytorch(ti2v_exported, tmp_path):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from export.tensorrt_build import build_engine

    path, oracle, _ = ti2v_exported
    plan = build_engine(path.parent, tmp_path / "den.plan")
    feed = sample_inputs(graph_specs(oracle.config), SHAPES["r3_big_refs"], torch.float32,
                         torch.Generator().manual_seed(2), oracle.config)
    with torch.no_grad():
        want = oracle.cuda()(**{k: v.cuda() for k, v in feed.items()}).cpu().numpy()
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan)))) as runner:
        got = runner.infer({k: v.numpy() for k, v in feed.items()})["velocity"]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2  # TF32 matmuls inside TensorRT
