"""Exported graphs against the unmerged PyTorch model (PEFT LoRA), through polygraphy and onnxruntime."""
from __future__ import annotations

import onnx
import pytest
import torch

from engine import denoiser_io
from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer
from export.onnx_export import EXPORT_SIZES, export_denoiser
from export.plugin import DOMAIN, OP_TYPE, OP_VERSION, count_nodes
from export.verify import verify_onnx

# three shapes unlike the export-time sizes: R = 0, R = 3 with references larger than the video (negative
# RD-RoPE offsets), R = 1 on a 1-frame 2x2 latent
SHAPES = {
    "r0": dict(batch=1, frames=2, height=4, width=10, refs=0, ref_height=4, ref_width=4),
    "r3_big_refs": dict(batch=3, frames=5, height=8, width=6, refs=3, ref_height=6, ref_width=8),
    "r1_single_frame": dict(batch=1, frames=1, height=2, width=2, refs=1, ref_height=2, ref_width=4),
}
# native and plugin attention, full and isolated masks: each appears once with the other (the family and seed-mode
# graphs in tests/export/test_cli.py add native graphs of every other input layout)
MODES = [("native", "full"), ("plugin", "full"), ("plugin", "isolated")]


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("attention,mask", MODES)
def test_graph_matches_unmerged_pytorch(exported, attention, mask, shape):
    path, oracle = exported(attention, mask)
    assert all(SHAPES[shape][k] != EXPORT_SIZES[k] for k in ("frames", "height", "refs"))
    (result,) = verify_onnx(path, oracle, shapes=[SHAPES[shape]], rtol=1e-4, seed=sorted(SHAPES).index(shape))
    assert result.passed, f"relative error {result.rel_err:.2e} at {result.sizes}"


@pytest.mark.parametrize("attention", ["native", "plugin"])
def test_graph_is_lora_free_with_named_dynamic_axes(exported, attention):
    path, oracle = exported(attention, "full")
    model = onnx.load(str(path), load_external_data=False)
    assert not [i.name for i in model.graph.initializer if "lora" in i.name.lower()]
    specs = denoiser_io.config_specs(oracle.config)
    graph_io = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]}
    assert graph_io == {s.name: list(s.dims) for s in [*specs, denoiser_io.OUTPUT]}
    assert (path.parent / denoiser_io.ONNX_DATA_FILE).is_file()


def test_plugin_graph_has_one_attention_node_per_layer(exported):
    native, _ = exported("native", "full")
    plugin, oracle = exported("plugin", "full")
    model = onnx.load(str(plugin), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert len(nodes) == count_nodes(model) == oracle.config.num_layers
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert nodes[0].op_type == OP_TYPE and attrs == {"mask": b"full", "plugin_namespace": b"mvgen"}
    assert [len(n.input) for n in nodes] == [4] * len(nodes)  # q, k, v (rotated in-graph), n_video
    assert any(o.domain == DOMAIN and o.version == OP_VERSION for o in model.opset_import)
    assert count_nodes(onnx.load(str(native), load_external_data=False)) == 0


@pytest.mark.slow
def test_large_widths_export_passes_checker(tmp_path):
    """Wan2.1 1.3B widths (dim 1536 = 12 x 128, ffn 8960, text 4096, image 1280) with 2 layers."""
    cfg = MvgenConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096,
                      image_dim=1280, added_kv_proj_dim=1536, num_layers=2, attention_backend="reference")
    with torch.device("meta"):
        den = MultiViewWanTransformer(cfg)
    den = den.to_empty(device="cpu").eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    for p in den.parameters():
        p.normal_(0.0, 0.02, generator=gen)
    path = export_denoiser(den, tmp_path, attention="native")  # its duration is no assertion: a loaded machine varies
    onnx.checker.check_model(str(path), full_check=True)
    data = path.parent / denoiser_io.ONNX_DATA_FILE
    assert data.stat().st_size > 500e6 and path.stat().st_size < 5e6  # weights live in the external file


def test_profile_spec_overrides_defaults():
    profile = denoiser_io.Profile.parse("batch=1:2:4, refs=2")
    assert profile.range("batch") == (1, 2, 4) and profile.range("refs") == (2, 2, 2)
    assert profile.range("frames") == (denoiser_io.AXES["frames"].min, denoiser_io.AXES["frames"].opt, denoiser_io.AXES["frames"].max)
    shapes = profile.shapes(denoiser_io.input_specs(4096, 1280))
    assert shapes["ref_latents"] == ((1, 2, 16, 16, 16), (2, 2, 16, 60, 104), (4, 2, 16, 104, 104))
    assert shapes["text"] == ((1, 512, 4096), (2, 512, 4096), (4, 512, 4096))


@pytest.mark.parametrize("spec,message", [
    ("batch=4:2:1", "min <= opt <= max"), ("height=15:60:104", "multiples of 2"),
    ("colour=1", "unknown profile axis"), ("batch", "expected AXIS=MIN:OPT:MAX"), ("batch=1:2", "expected AXIS="),
])
def test_bad_profile_names_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        denoiser_io.Profile.parse(spec)
