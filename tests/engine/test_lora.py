"""Reference-stream adapters: PEFT is the oracle for the merge; three spellings must agree."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from engine.adapters.lora import BLOCK_LINEARS
from engine.errors import AdapterError, CheckpointError
from engine.backbones.registry import load_denoiser

from .conftest import inputs, rel_err

RANK, ALPHA = 4, 8.0
TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_v",
           "attn2.add_k_proj", "ffn.net.0.proj", "ffn.net.2"]


@pytest.fixture(scope="module")
def peft_reference(wan_dir):
    """Our denoiser with PEFT LoRA layers injected (unmerged) into the reference stream, random A and B."""
    path, _ = wan_dir
    den = load_denoiser(path)
    pattern = r"ref_blocks\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in TARGETS) + ")"
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=pattern), den)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, p in den.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(den).items()}
    assert len(lora) == 2 * len(TARGETS) * 2 and all(k.startswith("ref_blocks.") for k in lora)
    return den.eval(), lora


def _split(key):
    # "ref_blocks.1.attn1.to_q.lora_A.weight" -> (1, "attn1.to_q", "A")
    parts = key.split(".")
    return int(parts[1]), ".".join(parts[2:-2]), parts[-2][-1]


def write_peft_dir(lora, folder):
    folder.mkdir()
    save_file({f"transformer.blocks.{b}.{m}.lora_{ab}.weight": v for (b, m, ab), v in
               ((_split(k), v) for k, v in lora.items())}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    return folder


def write_kohya(lora, folder):
    folder.mkdir()
    tensors = {}
    for key, v in lora.items():
        b, m, ab = _split(key)
        stem = f"lora_unet_blocks_{b}_{m.replace('.', '_')}"
        tensors[f"{stem}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = v
        tensors[f"{stem}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, folder / "ref.safetensors")
    return folder / "ref.safetensors"


def write_wan_original(lora, folder):
    folder.mkdir()
    save_file({f"diffusion_model.blocks.{b}.{BLOCK_LINEARS[m]}.lora_{ab}.weight": v for (b, m, ab), v in
               ((_split(k), v) for k, v in lora.items())}, folder / "wan_lora.safetensors")
    (folder / "mvgen_config.json").write_text(json.dumps({"lora_alpha": ALPHA, "ref_mode": "dual_stream"}))
    return folder / "wan_lora.safetensors"


WRITERS = {"peft_dir": write_peft_dir, "kohya": write_kohya, "wan_original": write_wan_original}


@pytest.mark.parametrize("spelling", sorted(WRITERS))
@pytest.mark.parametrize("num_refs", [1, 3])
def test_merged_adapter_equals_peft_unmerged(wan_dir, peft_reference, tmp_path, spelling, num_refs):
    path, _ = wan_dir
    peft_model, lora = peft_reference
    den = load_denoiser(path, adapter=WRITERS[spelling](lora, tmp_path / spelling))
    x = inputs(torch.Generator().manual_seed(31 + num_refs), refs=num_refs)
    with torch.no_grad():
        want, got = peft_model(**x), den(**x)
        plain = load_denoiser(path)(**x)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, plain) > 1e-3  # the adapter really changed the reference stream


@pytest.mark.parametrize("spelling", sorted(WRITERS))
def test_adapter_leaves_the_reference_free_output_alone(wan_dir, peft_reference, tmp_path, spelling):
    path, _ = wan_dir
    den = load_denoiser(path, adapter=WRITERS[spelling](peft_reference[1], tmp_path / spelling))
    x = inputs(torch.Generator().manual_seed(41))
    x.pop("ref_latents")
    with torch.no_grad():
        assert torch.equal(den(**x), load_denoiser(path)(**x))


def test_explicit_scale_overrides_the_file(wan_dir, peft_reference, tmp_path):
    path, _ = wan_dir
    adapter = write_kohya(peft_reference[1], tmp_path / "k")
    x = inputs(torch.Generator().manual_seed(43), refs=2)
    with torch.no_grad():
        zero = load_denoiser(path, adapter=adapter, lora_scale=0.0)(**x)
        plain = load_denoiser(path)(**x)
    assert torch.equal(zero, plain)


def _save(tmp_path, tensors, name="a.safetensors"):
    save_file(tensors, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("tensors,message", [
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 48),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(40, 4)}, "does not fit the weight"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 48)}, "missing its down/A or up/B"),
    ({"transformer.blocks.0.attn1.to_zz.lora_A.weight": torch.zeros(4, 48)}, "not understood"),
    ({"pose_encoder.weight": torch.zeros(3)}, "not understood"),
    ({"transformer.blocks.9.attn1.to_q.lora_A.weight": torch.zeros(4, 48),
      "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.zeros(48, 4)}, "model has 2 blocks"),
    ({"view_logit_scales": torch.ones(5)}, r"wrong shape .*'view_logit_scales \[5\] vs \[3\]'"),
])
def test_bad_adapters_name_the_problem(wan_dir, tmp_path, tensors, message):
    with pytest.raises(AdapterError, match=message):
        load_denoiser(wan_dir[0], adapter=_save(tmp_path, tensors))


def test_lora_with_token_concat_is_refused(wan_dir, peft_reference, tmp_path):
    with pytest.raises(AdapterError, match="ref_mode='dual_stream'"):
        load_denoiser(wan_dir[0], adapter=write_kohya(peft_reference[1], tmp_path / "k"), ref_mode="token_concat")


def test_adapter_view_logit_scales_and_patch_embedding_are_used(wan_dir, tmp_path):
    path, _ = wan_dir
    gen = torch.Generator().manual_seed(47)
    extras = {"view_logit_scales": torch.tensor([0.5, 1.0, 3.0]),
              "ref_patch_embedding.weight": torch.randn(48, 16, 1, 2, 2, generator=gen) * 0.1,
              "ref_patch_embedding.bias": torch.randn(48, generator=gen) * 0.1}
    den = load_denoiser(path, adapter=_save(tmp_path, extras))
    assert torch.equal(den.view_logit_scales, extras["view_logit_scales"])
    assert den.ref_patch_embedding.in_channels == 16
    x = inputs(gen, refs=3)
    with torch.no_grad():
        assert rel_err(den(**x), load_denoiser(path)(**x)) > 1e-3


def test_only_safetensors_are_loaded(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_denoiser(tmp_path)
    with pytest.raises(AdapterError, match=r"\.safetensors"):
        load_denoiser(tmp_path, adapter=folder / "diffusion_pytorch_model.bin")


def test_checkpoint_with_missing_weights_is_named(wan_dir, tmp_path):
    from safetensors.torch import load_file
    from engine.loading import transformer_weight_files
    src = wan_dir[0] / "transformer"
    state = {}
    for f in transformer_weight_files(src):
        state.update(load_file(f))
    del state["blocks.1.attn2.add_k_proj.weight"]
    dst = tmp_path / "transformer"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(state, dst / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.attn2.add_k_proj.weight'\]"):
        load_denoiser(tmp_path)
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_denoiser(tmp_path / "nope")
