"""A ``--quantize fp8`` denoiser's ONNX graph (``export.fp8_onnx``): FP8 weights behind DequantizeLinear, Q/DQ on
every quantised GEMM's activation input, checked with onnxruntime against the PyTorch FP8 model (its static path, with
the graph's activation scales) at shapes unlike the export's; TensorRT's FP8 engine where TensorRT and a GPU exist."""
from __future__ import annotations

import contextlib
import importlib.util
import io

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from engine import denoiser_io
from engine.backbones.registry import load_denoiser
from engine.runtime.fp8 import quantized_modules
from export import cli
from export.fp8_onnx import FP8_OPSET, static_scales
from export.onnx_export import CALIBRATION, EXPORT_SIZES, export_denoiser, read_meta
from export.tensorrt_build import SKIP_REASON
from export.verify import verify_onnx
from tests.export.conftest import run_cli

from .test_onnx import SHAPES

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _fp8_model(checkpoint):
    root, adapter, _ = checkpoint
    return load_denoiser(root, adapter=adapter, attention_backend="reference", quantize="fp8",
                         ref_weights="merged")


@pytest.fixture(scope="module")
def fp8_graph(checkpoint, tmp_path_factory):
    """(onnx path, the FP8 model it was exported from, export.json)."""
    den = _fp8_model(checkpoint)
    path = export_denoiser(den, tmp_path_factory.mktemp("onnx_fp8"))
    return path, den, read_meta(path.parent)


@pytest.mark.slow  # exports the FP8 graph (~35 s on 2 busy cores), once for the module
def test_graph_holds_the_model_fp8_bytes_behind_dequantize_linear(fp8_graph):
    path, den, meta = fp8_graph
    model = onnx.load(str(path))
    assert meta["opset"] == FP8_OPSET and meta["config"]["quantize"] == "fp8"
    assert meta["fp8"]["calibration"] == CALIBRATION
    assert {o.domain: o.version for o in model.opset_import}[""] >= FP8_OPSET
    initializers = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    fp8_weights = {i.name: i for i in initializers.values() if i.data_type == onnx.TensorProto.FLOAT8E4M3FN
                   and len(i.dims) == 2}
    # every FP8 weight is read through a per-output-channel DequantizeLinear (axis 0 of [out, in])
    assert fp8_weights and {n.input[0] for n in weight_dq} >= set(fp8_weights)
    for node in weight_dq:
        axis = {a.name: a.i for a in node.attribute}.get("axis", 1)
        scale = initializers[node.input[1]]
        assert axis == 0 and list(scale.dims) == [initializers[node.input[0]].dims[0]]
    # the bytes are the PyTorch model's own: each FP8 weight of the graph equals one of the model's
    model_bytes = {m.weight.view(torch.uint8).numpy().tobytes() for m in quantized_modules(den)}
    for tensor in fp8_weights.values():
        raw = numpy_helper.to_array(tensor).view(np.uint8).tobytes()
        assert raw in model_bytes
    # every FP8 GEMM (weight DQ, the Transpose of F.linear, MatMul) takes its activations through a per-tensor
    # QuantizeLinear/DequantizeLinear pair: TensorRT fuses the pattern into an FP8 GEMM. Linears that read one input
    # with one calibrated scale (to_q, to_k, to_v) share their pair, as ModelOpt's placement does
    producer = {out: node for node in model.graph.node for out in node.output}
    scalar = {i.name for i in initializers.values() if len(i.dims) == 0}
    for node in weight_dq:
        (transpose,) = consumers[node.output[0]]
        (matmul,) = consumers[transpose.output[0]]
        assert (transpose.op_type, matmul.op_type) == ("Transpose", "MatMul")
        activation = producer[next(i for i in matmul.input if i != transpose.output[0])]
        assert activation.op_type == "DequantizeLinear" and producer[activation.input[0]].op_type == "QuantizeLinear"
        assert activation.input[1] in scalar or producer[activation.input[1]].op_type in ("CastLike", "Constant")
    assert len(meta["fp8"]["activation_scales"]) == len(weight_dq)


@pytest.mark.slow  # exports the FP8 graph (~35 s on 2 busy cores), once for the module
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_graph_matches_the_pytorch_fp8_model_with_onnxruntime(fp8_graph, shape):
    """At shapes the export never saw. Over 3 shapes x 5 seeds on two checkpoints, 25 of 30 cases measured 2.4e-7
    to 6e-6 (no FP8 code differs) and 5 measured 6.5e-5 to 3.1e-3: onnxruntime's other GEMM and softmax orders
    move an activation by a float32 ulp across an FP8 rounding boundary, its code flips (a step of 1/16 of that
    value) and the layers after it carry the difference. Hence 5e-3 here, and the exactness of the Q/DQ itself
    below, on one layer, where no earlier float32 noise reaches it."""
    path, den, meta = fp8_graph
    assert all(SHAPES[shape][k] != EXPORT_SIZES[k] for k in ("frames", "height", "refs"))
    with static_scales(den, meta["fp8"]["activation_scales"]):
        (result,) = verify_onnx(path, den, shapes=[SHAPES[shape]], rtol=5e-3, seed=sorted(SHAPES).index(shape))
    assert result.passed, f"relative error {result.rel_err:.2e} at {result.sizes}"


class _TwoFp8Linears(torch.nn.Module):
    """Two FP8 linears with a GELU between, on the static path: the exported pattern without anything before it."""

    def __init__(self, gen):
        super().__init__()
        self.first, self.second = (_fp8_linear(gen, 40, 24), _fp8_linear(gen, 24, 40))

    def forward(self, x):
        return self.second(torch.nn.functional.gelu(self.first(x)))


def _fp8_linear(gen, out_features, in_features):
    from engine.runtime.fp8 import Fp8Linear, quantize_weight

    weight = torch.randn(out_features, in_features, generator=gen) * torch.logspace(-1, 1, out_features)[:, None]
    q, scale = quantize_weight(weight)
    module = Fp8Linear(torch.nn.Parameter(q, requires_grad=False), torch.nn.Parameter(scale, requires_grad=False),
                       torch.nn.Parameter(torch.randn(out_features, generator=gen), requires_grad=False), "static")
    module.input_scale = torch.tensor(0.01)  # small: the largest inputs saturate at +-448 steps
    return module


def test_qdq_pattern_is_exactly_the_static_path(tmp_path):
    """One graph of two FP8 linears against the PyTorch static path at a batch the export never saw: equal within
    float32 GEMM rounding (measured 0: bit-identical), saturation included."""
    import onnxruntime

    from export.fp8_onnx import translations

    gen = torch.Generator().manual_seed(3)
    module = _TwoFp8Linears(gen).eval()
    example = torch.randn(2, 5, 24, generator=gen)
    program = torch.onnx.export(module, (example,), dynamo=True, opset_version=FP8_OPSET, input_names=["x"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")}},
                                custom_translation_table=translations(), verbose=False)
    program.save(str(tmp_path / "two.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "two.onnx")).graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    x = torch.randn(3, 11, 24, generator=gen) * 3
    assert (x.abs() / 0.01 > 448).any()
    session = onnxruntime.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = module(x)
    assert np.linalg.norm(got - want.numpy()) / np.linalg.norm(want.numpy()) < 1e-6


@pytest.mark.slow  # exports the FP8 graph (~35 s on 2 busy cores), once for the module
def test_static_path_is_what_the_dynamic_gemm_path_approximates(fp8_graph):
    """The graph's per-tensor calibrated activation scales against the PyTorch model's per-token scales: the two
    FP8 models differ by activation rounding only (measured 2.3e-2 on the tiny model's random weights)."""
    _, den, meta = fp8_graph
    feed = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _feed(den, SHAPES["r3_big_refs"]).items()}
    for m in quantized_modules(den):
        m.path = "gemm"
    with torch.no_grad():
        dynamic = _call(den, feed)
        with static_scales(den, meta["fp8"]["activation_scales"]):
            static = _call(den, feed)
    for m in quantized_modules(den):
        m.path = "auto"
    err = ((static - dynamic).norm() / dynamic.norm()).item()
    assert 1e-3 < err < 8e-2


def _feed(den, sizes):
    from export.onnx_export import graph_specs, sample_inputs

    return {k: v.numpy() for k, v in sample_inputs(graph_specs(den.config), sizes, torch.float32,
                                                   torch.Generator().manual_seed(7), den.config).items()}


def _call(den, feed):
    from export.onnx_export import DenoiserGraph

    return DenoiserGraph(den)(**feed)


def _initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _qdq_scales(path) -> list[float]:
    """The per-tensor scale of every QuantizeLinear in node order (an initializer or a Constant, through the
    CastLike to the activation's type)."""
    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"
                   and n.attribute[0].name == "value"})
    producer = {out: node for node in graph.node for out in node.output}
    scales = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            name = node.input[1]
            while name not in values:
                name = producer[name].input[0]
            scales.append(float(values[name]))
    return scales


@pytest.mark.slow  # the refit's FP8 export, after the CLI test's (~35 s on 2 busy cores)
def test_a_refit_graph_takes_the_recorded_activation_scales(checkpoint, cli_fp8_export, tmp_path):
    """``refit_onnx`` (all of a refit that runs without TensorRT) from the export's ``export.json``, with the adapter at
    another strength: the reference stream's FP8 weights and per-channel scales change, every other initializer is
    the export's byte for byte, and the Q/DQ activation scales are the recorded ones, where calibrating the new model
    anew would have moved them."""
    from export.fp8_onnx import calibrate
    from export.onnx_export import DenoiserGraph, graph_specs, sample_inputs
    from export.tensorrt_build import refit_onnx

    root, adapter, _ = checkpoint
    code, printed, out = cli_fp8_export  # export_onnx(root, out, adapter=adapter, quantize="fp8") by the CLI
    assert code == 0, printed
    first = out / denoiser_io.ONNX_FILE
    meta = read_meta(out)
    refit = refit_onnx(meta, adapter, tmp_path / "refit", lora_scale=0.5)
    assert read_meta(refit.parent)["fp8"] == meta["fp8"]
    before, after = _initializers(first), _initializers(refit)
    assert before.keys() == after.keys()
    changed = sorted(name for name in before if before[name].dtype != after[name].dtype
                     or before[name].tobytes() != after[name].tobytes())
    assert changed and all(name.startswith("denoiser.ref_blocks.") for name in changed), changed
    recorded = _qdq_scales(first)  # linears reading one input with one scale (to_q, to_k, to_v) share a pair
    assert _qdq_scales(refit) == recorded
    assert set(recorded) <= {float(np.float32(v)) for v in meta["fp8"]["activation_scales"].values()}
    new = load_denoiser(root, adapter=adapter, lora_scale=0.5, attention_backend="reference", quantize="fp8",
                        ref_weights="merged")
    example = sample_inputs(graph_specs(new.config), EXPORT_SIZES, torch.float32, torch.Generator().manual_seed(0),
                            new.config)
    anew = calibrate(new, lambda feed: DenoiserGraph(new)(**feed), [example])
    assert anew.keys() == meta["fp8"]["activation_scales"].keys() and anew != meta["fp8"]["activation_scales"]


def test_recorded_scales_must_name_the_model_fp8_linears(checkpoint):
    from export.fp8_onnx import calibrated

    den = _fp8_model(checkpoint)
    record = {"activation_scales": {"blocks.0.norm1": 0.1}, "calibration": "x"}
    with pytest.raises(ValueError, match=r"no FP8 linear of this model: \['blocks.0.norm1'\]"), \
            calibrated(den, None, [], "unused", record):
        pass
    with pytest.raises(ValueError, match="this model has none"), \
            calibrated(load_denoiser(checkpoint[0]), None, [], "unused", record):
        pass


@pytest.mark.slow  # a short generation of tiny, then its FP8 export (~50 s on 2 busy cores)
def test_fp8_calibration_on_a_real_generation(tiny_cache, tmp_path):
    """``fp8_calibration="generation"``: the activation scales are max |input| / 448 over what the denoiser received
    in a short generation of the checkpoint (its latents, text states, CLIP context, VAE latents), export.json says
    so, and they are not the random sample inputs' scales."""
    from engine.runtime.denoiser import load_expert
    from export.calibration_inputs import generation_feeds
    from export.fp8_onnx import calibrate
    from export.onnx_export import DenoiserGraph, checkpoint_for_export, export_onnx, graph_specs, sample_inputs

    path = export_onnx("tiny", tmp_path, quantize="fp8", fp8_calibration="generation", cache_root=tiny_cache)
    record = read_meta(path.parent)["fp8"]
    assert record["calibration"].startswith("the denoiser inputs of a short generation of this checkpoint")
    checkpoint = checkpoint_for_export("tiny", None, "fp32", tiny_cache, 0, None, {"quantize": "fp8"})
    feeds, _ = generation_feeds(checkpoint, 0, [s.name for s in graph_specs(checkpoint.config)])
    assert len(feeds) == 3 and feeds[0]["text"].abs().sum() > 0  # cond + uncond rows of every step, batched
    den = load_expert(checkpoint, 0, None)
    assert record["activation_scales"] == calibrate(den, lambda feed: DenoiserGraph(den)(**feed), feeds)
    example = sample_inputs(graph_specs(den.config), EXPORT_SIZES, torch.float32, torch.Generator().manual_seed(0),
                            den.config)
    assert record["activation_scales"] != calibrate(den, lambda feed: DenoiserGraph(den)(**feed), [example])


def test_fp8_calibration_choices_are_checked(tiny_cache):
    from export.onnx_export import export_onnx

    with pytest.raises(ValueError, match=r"fp8_calibration must be one of sample, generation, got 'real'"):
        export_onnx("tiny", "unused", quantize="fp8", fp8_calibration="real", cache_root=tiny_cache)
    with pytest.raises(ValueError, match="cannot calibrate a graph exported with lora_scale"):
        export_onnx("tiny", "unused", quantize="fp8", fp8_calibration="generation", lora_scale=0.5,
                    cache_root=tiny_cache)


@pytest.fixture(scope="module")
def cli_fp8_export(checkpoint, tmp_path_factory):
    """``mvgen export onnx --quantize fp8 --verify`` of the checkpoint with its adapter: (exit code, printed lines,
    output folder); the refit test starts from the same export."""
    root, adapter, _ = checkpoint
    out = tmp_path_factory.mktemp("cli_fp8") / "onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_cli(["export", "onnx", "--model", str(root), "--adapter", str(adapter), "--out", str(out),
                         "--quantize", "fp8", "--verify"])
    return code, printed.getvalue().splitlines(), out


@pytest.mark.slow
def test_export_onnx_quantize_fp8_with_verification(cli_fp8_export):
    code, printed, out = cli_fp8_export
    assert code == 0, printed
    assert printed[0] == str(out / denoiser_io.ONNX_FILE)
    assert len([line for line in printed if line.startswith("verify ok")]) == 3
    assert read_meta(out)["fp8"]["activation_scales"]


@pytest.mark.slow  # exports the FP8 graph (~35 s on 2 busy cores), once for the module
@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the skip path is not taken")
def test_without_tensorrt_an_fp8_engine_build_reports_a_skip(fp8_graph, tmp_path, capsys):
    path, _, _ = fp8_graph
    assert run_cli(["export", "tensorrt", "--onnx", str(path.parent), "--out", str(tmp_path / "fp8.plan")]) \
        == cli.EXIT_SKIPPED
    assert capsys.readouterr().err.strip() == SKIP_REASON


@pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: TensorRT needs a CUDA GPU")
@pytest.mark.skipif(not HAVE_TENSORRT, reason=SKIP_REASON)
def test_fp8_engine_matches_the_pytorch_fp8_model(fp8_graph, tmp_path):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from export.tensorrt_build import build_engine

    path, den, meta = fp8_graph
    plan = build_engine(path.parent, tmp_path / "fp8.plan", precision="bf16")
    feed = _feed(den, SHAPES["r3_big_refs"])
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan)))) as runner:
        got = runner.infer(feed)["velocity"]
    with torch.no_grad(), static_scales(den, meta["fp8"]["activation_scales"]):
        want = _call(den, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2  # bf16 around FP8 GEMMs inside TensorRT
