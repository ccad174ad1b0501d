"""Check an exported graph against the PyTorch denoiser with polygraphy's comparator.

onnxruntime runs the graph (``plugin`` graphs run their ``mvgen.JointAttention`` nodes through the Python
custom op of ``export.plugin``); a small polygraphy runner wraps the PyTorch denoiser (polygraphy's own
``PytRunner`` moves inputs to CUDA). Both runners get the same random feeds at the requested shapes, and
each iteration passes when ``||onnx - torch|| / ||torch|| <= rtol`` (relative error of the whole output,
the measure elementwise tolerances cannot give near zero crossings).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator

from engine import denoiser_io

from .onnx_export import DenoiserGraph, graph_specs, needs_references, sample_inputs
from .plugin import onnxruntime_session

DEFAULT_SHAPES = (  # none of these is the export-time size (onnx_export.EXPORT_SIZES)
    dict(batch=1, frames=2, height=4, width=10, refs=0, ref_height=4, ref_width=4, identity_len=257),
    dict(batch=3, frames=5, height=8, width=6, refs=3, ref_height=6, ref_width=8, identity_len=3),
    dict(batch=1, frames=1, height=2, width=2, refs=1, ref_height=2, ref_width=4, identity_len=1),
)


class TorchRunner(BaseRunner):
    """A polygraphy runner over a PyTorch module called with the graph's named inputs."""

    def __init__(self, module, specs, output_name: str = denoiser_io.OUTPUT.name, name: str | None = None):
        super().__init__(name=name, prefix="torch-runner")
        self.module = DenoiserGraph(module)  # the graph's inputs by name (T2V has no condition, ...)
        self.output_name = output_name
        dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.float32}
        model_dtype = module.proj_out.weight.dtype
        self.metadata = TensorMetadata()
        for spec in specs:
            self.metadata.add(spec.name, dtype[spec.torch_dtype(model_dtype)], spec.dims)

    def activate_impl(self):
        self.module.eval()

    def get_input_metadata_impl(self):
        return self.metadata

    def infer_impl(self, feed_dict):
        start = time.time()
        with torch.no_grad():
            out = self.module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()})
        self.inference_time = time.time() - start
        return OrderedDict({self.output_name: out.float().numpy()})

    def deactivate_impl(self):
        pass


@dataclass
class ShapeResult:
    sizes: dict
    rel_err: float
    passed: bool


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def verify_onnx(onnx_path: str | Path, denoiser, shapes=DEFAULT_SHAPES, rtol: float = 1e-4,
                seed: int = 0) -> list[ShapeResult]:
    """Run the graph and ``denoiser`` on random inputs at each of ``shapes``; one result per shape."""
    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        onnx_path = onnx_path / denoiser_io.ONNX_FILE
    dtype = denoiser.proj_out.weight.dtype
    specs = graph_specs(denoiser.config)
    if needs_references(denoiser.config):  # the graph is the mode's reference path
        shapes = [sizes for sizes in shapes if sizes["refs"] >= 1]
    gen = torch.Generator().manual_seed(seed)
    feeds = [{k: v.numpy() for k, v in sample_inputs(specs, sizes, dtype, gen, denoiser.config).items()}
             for sizes in shapes]

    runners = [OnnxrtRunner(lambda: onnxruntime_session(onnx_path)), TorchRunner(denoiser, specs)]
    results = Comparator.run(runners, data_loader=feeds)
    errors = []

    def within_rtol(run0, run1):
        err = relative_error(run0[denoiser_io.OUTPUT.name], run1[denoiser_io.OUTPUT.name])
        errors.append(err)
        return OrderedDict({denoiser_io.OUTPUT.name: err <= rtol})

    Comparator.compare_accuracy(results, compare_func=within_rtol)
    return [ShapeResult(sizes, err, err <= rtol) for sizes, err in zip(shapes, errors)]
