"""The MMDiT denoiser (engine.backbones.mmdit.model) exported to ONNX against the unmerged PyTorch model (PEFT LoRA on the
reference stream), through polygraphy and onnxruntime; and the repeat_interleave translation its token refiner
needs (diffusers' attention mask repeated along a dim)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file

from engine import denoiser_io
from engine.backbones.registry import load_denoiser
from export.onnx_export import EXPORT_SIZES, export_denoiser, translation_table
from export.verify import verify_onnx
from tests.engine.test_mmdit import make_hunyuan

pytestmark = pytest.mark.slow  # exports and runs MMDiT graphs in onnxruntime

RANK, ALPHA = 4, 8.0
PATTERN = (r"ref_blocks\.\d+\.(attn\.to_q|attn\.to_v|attn\.to_out\.0|ff\.net\.2)"
           r"|ref_single_blocks\.\d+\.(attn\.to_k|proj_mlp|proj_out)")
SHAPES = {  # unlike the export-time sizes: R = 0, R = 3 with references larger than the video, a 1-frame 2x2 latent
    "r0": dict(batch=1, frames=2, height=4, width=10, refs=0, ref_height=4, ref_width=4),
    "r3_big_refs": dict(batch=3, frames=5, height=8, width=6, refs=3, ref_height=6, ref_width=8),
    "r1_single_frame": dict(batch=1, frames=1, height=2, width=2, refs=1, ref_height=2, ref_width=4),
}


@pytest.fixture(scope="module", params=["isolated"])
def exported(request, tmp_path_factory):
    """(onnx path, oracle): the graph of the LoRA-merged MMDiT, and the same model with the LoRA unmerged (PEFT).
    ``isolated`` only (an export takes half a minute here): its mask holds ``full``'s text-padding term plus the
    reference queries' isolation; ``mvgen export onnx --model tiny-mmdit --verify`` checks the ``full`` graph."""
    root = tmp_path_factory.mktemp(f"export_mmdit_{request.param}")
    make_hunyuan(seed=4).save_pretrained(root / "transformer", safe_serialization=True, max_shard_size="60KB")
    oracle = load_denoiser(root, ref_attention=request.param, attention_backend="reference")
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PATTERN), oracle)
    gen = torch.Generator().manual_seed(6)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in get_peft_model_state_dict(oracle).items()}
    set_peft_model_state_dict(oracle, state)
    adapter = root / "adapter"
    adapter.mkdir()
    save_file(state, adapter / "adapter_model.safetensors")
    (adapter / "mvgen_config.json").write_text(json.dumps({"lora_alpha": ALPHA, "lora_rank": RANK}))
    merged = load_denoiser(root, adapter, ref_attention=request.param, attention_backend="reference")
    return export_denoiser(merged, root / "onnx", optimize=False), oracle.eval()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mmdit_graph_matches_unmerged_pytorch(exported, shape):
    path, oracle = exported
    assert all(SHAPES[shape][k] != EXPORT_SIZES[k] for k in ("frames", "height", "refs"))
    (result,) = verify_onnx(path, oracle, shapes=[SHAPES[shape]], rtol=1e-4, seed=sorted(SHAPES).index(shape))
    assert result.passed, f"relative error {result.rel_err:.2e} at {result.sizes}"


def test_mmdit_graph_inputs_are_the_declared_ones(exported):
    path, oracle = exported
    model = onnx.load(str(path), load_external_data=False)
    assert not [i.name for i in model.graph.initializer if "lora" in i.name.lower()]
    specs = denoiser_io.config_specs(oracle.config)
    assert {"text_mask", "pooled_text"} <= {s.name for s in specs} and "image_context" not in {s.name for s in specs}
    graph_io = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]}
    assert graph_io == {s.name: list(s.dims) for s in [*specs, denoiser_io.OUTPUT]}


def test_plugin_attention_is_refused_for_the_mmdit(exported, tmp_path):
    _, oracle = exported
    with pytest.raises(ValueError, match="native"):
        export_denoiser(oracle, tmp_path, attention="plugin")


class _Repeat(torch.nn.Module):
    def forward(self, mask, scales):
        return mask.repeat_interleave(3, dim=1), scales.repeat_interleave(mask.shape[0]), mask.repeat_interleave(2)


def test_repeat_interleave_translation_keeps_the_dim(tmp_path):
    """diffusers' prepare_attention_mask repeats a [B, 1, L, L] mask along dim 1; a translation that flattened it
    would mask the wrong keys (the MMDiT graph was 1e-3 off before this)."""
    from torch.export import Dim

    mask, scales = torch.randn(2, 1, 5, 5), torch.randn(4)
    program = torch.onnx.export(_Repeat(), (mask, scales), dynamo=True, opset_version=denoiser_io.OPSET,
                                dynamic_shapes=({0: Dim("b", min=2)}, {0: Dim("n")}),
                                custom_translation_table=translation_table())
    program.save(str(tmp_path / "repeat.onnx"))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "repeat.onnx"))
    for mask, scales in ((torch.randn(3, 1, 5, 5), torch.randn(2)), (torch.randn(2, 1, 5, 5), torch.randn(4))):
        got = session.run(None, {"mask": mask.numpy(), "scales": scales.numpy()})
        for g, w in zip(got, _Repeat()(mask, scales)):
            np.testing.assert_array_equal(g, w.numpy())
