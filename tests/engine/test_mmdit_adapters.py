"""The MMDiT's adapters through the one reader (``engine.adapters.lora``) and the one load path
(``engine.backbones.assembly``): PEFT's own LoRA layers on our reference stream are the oracle, saved in each
spelling an adapter may use (PEFT with ``adapter_config.json`` and an alpha pattern, kohya with per-module
``.alpha``, pairs named after the video blocks and routed to the reference stream), loaded shared and merged."""
from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from engine.backbones.registry import load_denoiser
from engine.errors import AdapterError

from .conftest import rel_err
from .test_mmdit import REF_MODULES, REF_SINGLE_MODULES, mmdit_dir, mmdit_inputs  # noqa: F401  (fixture)

RANK, ALPHA, PATTERN_ALPHA = 4, 8.0, 2.0  # scale 2, and 0.5 on the modules the alpha pattern names
TARGETS = (r"ref_blocks\.\d+\.(" + "|".join(map(re.escape, REF_MODULES)) + r")|ref_single_blocks\.\d+\.("
           + "|".join(map(re.escape, REF_SINGLE_MODULES)) + ")")


@pytest.fixture(scope="module")
def oracle(mmdit_dir):
    """Our loaded MMDiT (merged reference copy, no adapter) with PEFT's LoRA layers injected on every reference
    linear, A and B random; and the PEFT state dict (names as the model's, ``...lora_A.weight``)."""
    path, task, _ = mmdit_dir
    model = load_denoiser(path, ref_weights="merged")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, alpha_pattern={"proj_mlp": PATTERN_ALPHA})
    inject_adapter_in_model(config, model)
    gen = torch.Generator().manual_seed(71)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    assert len(state) == 2 * (2 * len(REF_MODULES) + 2 * len(REF_SINGLE_MODULES))
    return model.eval(), state, task


def _alpha(key: str) -> float:
    return PATTERN_ALPHA if ".proj_mlp." in key else ALPHA


def _peft(folder, state):
    folder.mkdir()
    save_file({f"transformer.{k}": v for k, v in state.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA,
                                                            "alpha_pattern": {"proj_mlp": PATTERN_ALPHA}}))
    return folder


def _kohya(folder, state):
    folder.mkdir()
    tensors = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        tensors[f"{stem}.alpha"] = torch.tensor(_alpha(key))
    save_file(tensors, folder / "lora.safetensors")
    return folder


def _video_named(folder, state):
    """Pairs named after the video blocks (``transformer_blocks.N``), which an adapter routes to the reference
    stream by default; PEFT's alpha pattern stated per module through adapter_config.json."""
    folder.mkdir()
    renamed = {k.replace("ref_single_blocks.", "single_transformer_blocks.").replace("ref_blocks.", "transformer_blocks."): v
               for k, v in state.items()}
    save_file(renamed, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA,
                                                            "alpha_pattern": {"proj_mlp": PATTERN_ALPHA}}))
    return folder


SPELLINGS = {"peft": _peft, "kohya_alpha": _kohya, "video_named": _video_named}


@pytest.mark.parametrize("ref_weights", ["shared", "merged"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_equals_peft(mmdit_dir, oracle, tmp_path, spelling, ref_weights):
    path, _, _ = mmdit_dir
    model, state, task = oracle
    den = load_denoiser(path, SPELLINGS[spelling](tmp_path / "a", state), ref_weights=ref_weights)
    assert den.config.ref_weights == ref_weights
    x = mmdit_inputs(73, task, 2, 4, 6, refs=2)
    with torch.no_grad():
        want, got = model(**x), den(**x)
        plain = model(**{**x, "ref_latents": None})
    if ref_weights == "shared":  # PEFT's arithmetic exactly: x W^T + b + scale * B(A x), unmerged
        assert torch.equal(got, want)
    else:  # the merged W + scale * B @ A: 1.3e-7 to 1.6e-7 measured in float32
        assert rel_err(got, want) < 2e-6
    assert rel_err(want, plain) > 1e-2  # the LoRA matters


def test_video_stream_pairs_make_a_merged_copy(mmdit_dir, oracle, tmp_path, caplog):
    """``"blocks_lora": "video"``: the pairs named after the video blocks change the video stream, which the
    reference stream then cannot share: it becomes a merged copy and says so."""
    path, _, _ = mmdit_dir
    _, state, _ = oracle
    folder = _video_named(tmp_path / "a", state)
    (folder / "mvgen_config.json").write_text(json.dumps({"blocks_lora": "video"}))
    with caplog.at_level("INFO", logger="mvgen.loading"):
        den = load_denoiser(path, folder)
    assert den.config.ref_weights == "merged" and "changes the video stream's" in caplog.text
    plain = load_denoiser(path, ref_weights="merged")
    key = "single_transformer_blocks.1.proj_mlp"
    a, b = state["ref_single_blocks.1.proj_mlp.lora_A.weight"], state["ref_single_blocks.1.proj_mlp.lora_B.weight"]
    want = plain.state_dict()[f"{key}.weight"] + PATTERN_ALPHA / RANK * (b @ a)
    torch.testing.assert_close(den.state_dict()[f"{key}.weight"], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(den.state_dict()["ref_single_blocks.1.proj_mlp.weight"], plain.state_dict()[f"{key}.weight"])


@pytest.mark.parametrize("tensors,words", [
    ({"ref_blocks.0.attn.to_zz.lora_A.weight": torch.zeros(4, 48)}, r"LoRA key\(s\) not understood"),
    ({"ref_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 48)}, "missing its down/A or up/B"),
    ({"ref_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 48),
      "ref_blocks.7.attn.to_q.lora_B.weight": torch.zeros(48, 4)}, "the model has 2 blocks"),
    ({"ref_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 48),
      "ref_blocks.0.attn.to_q.lora_B.weight": torch.zeros(40, 4)}, "does not fit the weight"),
    ({"ref_blocks.0.attn.add_q_proj.lora_A.weight": torch.zeros(4, 48),
      "ref_blocks.0.attn.add_q_proj.lora_B.weight": torch.zeros(48, 4)}, r"LoRA key\(s\) not understood"),
    ({"ref_blocks.0.norm9.weight": torch.zeros(48)}, r"adapter tensor\(s\) not understood"),
])
def test_bad_mmdit_adapters_name_the_problem(mmdit_dir, tmp_path, tensors, words):
    path, _, _ = mmdit_dir
    save_file(tensors, tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match=words):
        load_denoiser(path, tmp_path / "a.safetensors")
