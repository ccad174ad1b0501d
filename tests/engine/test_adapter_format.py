"""The adapter format (``engine.adapters.lora``): MVI2V checkpoints as trained. Full tensors (a whole reference stream, video-
stream changes, a mode's modules) load as if the model had been built with them; LoRA pairs merge on top with the
scale their file's convention gives, PEFT's own unmerged layers being the oracle; what a mode needs and the adapter
lacks, names the model does not have and shapes it does not take are refused by name."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

import engine.backbones.wan.loading
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.errors import AdapterError
from engine.loading import denoiser_config
from engine.backbones.registry import load_denoiser

from .conftest import inputs, rel_err
from .test_base_lora import Writer, diffusers_merged, diffusers_tensors

RANK = 4
MODULES = ["attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2"]


def base_state(wan_dir) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in wan_dir[1].state_dict().items()}


def built_with(wan_dir, tensors: dict[str, torch.Tensor], **overrides) -> MultiViewWanTransformer:
    """The oracle for full tensors: the model constructed directly and given the base weights, their copy as the
    reference stream, the default view scales and ``tensors`` through torch's own load_state_dict."""
    base = base_state(wan_dir)
    model = MultiViewWanTransformer(denoiser_config(wan_dir[0], **overrides))
    state = {**base, **{f"ref_{k}": v for k, v in base.items() if k.startswith("blocks.")},
             "view_logit_scales": torch.ones(model.config.max_references), **tensors}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def random_like(names: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(v.shape, generator=gen) * 0.2 + 0.1 for k, v in names.items()}


def save(folder, tensors, name="adapter_model.safetensors", **config):
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name)
    if config:
        (folder / "mvgen_config.json").write_text(json.dumps(config))
    return folder


def outputs(model, seed, refs=2):
    with torch.no_grad():
        return model(**inputs(torch.Generator().manual_seed(seed), refs=refs))


def assert_same_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got, want = got.state_dict(), want.state_dict()
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different


def test_fully_trained_reference_stream_equals_the_model_built_with_it(wan_dir, tmp_path):
    with torch.device("meta"):
        shapes = MultiViewWanTransformer(denoiser_config(wan_dir[0])).state_dict()
    gen = torch.Generator().manual_seed(1)
    ref = random_like({k: v for k, v in shapes.items() if k.startswith("ref_blocks.")}, gen)
    assert any(k.endswith("scale_shift_table") for k in ref) and any(k.endswith("norm_q.weight") for k in ref)
    # half the keys carry diffusers' "transformer." prefix, as a saved pipeline component would
    spelled = {(f"transformer.{k}" if i % 2 else k): v for i, (k, v) in enumerate(sorted(ref.items()))}
    den = load_denoiser(wan_dir[0], adapter=save(tmp_path / "a", spelled))
    want = built_with(wan_dir, ref)
    assert_same_state(den, want)
    got, expected = outputs(den, 3), outputs(want, 3)
    assert rel_err(got, expected) < 1e-6
    assert rel_err(got, outputs(load_denoiser(wan_dir[0]), 3)) > 1e-2  # the trained stream is not the copy


def peft_on(model: torch.nn.Module, pattern: str, lora_alpha: float, seed: int):
    """PEFT LoRA layers (unmerged, random A and B) on ``model``'s modules matching ``pattern``: the oracle, and
    the LoRA state dict in the model's names."""
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=lora_alpha, target_modules=pattern), model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval(), {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}


def modules_pattern(stream: str) -> str:
    return rf"{stream}\.\d+\.(" + "|".join(re.escape(m) for m in MODULES) + ")"


def test_lora_merges_on_top_of_full_reference_weights(wan_dir, tmp_path):
    """Full tensors replace the reference stream's copy, and its LoRA pairs then add to those weights."""
    gen = torch.Generator().manual_seed(5)
    base = base_state(wan_dir)
    full = random_like({f"ref_{k}": v for k, v in base.items()
                        if k.startswith(("blocks.0.attn1.", "blocks.1.ffn.", "blocks.1.scale_shift"))}, gen)
    oracle, lora = peft_on(built_with(wan_dir, full), modules_pattern("ref_blocks"), 8.0, seed=6)
    tensors = {**full, **{f"transformer.{k.removeprefix('ref_')}": v for k, v in lora.items()}}
    folder = save(tmp_path / "a", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 8.0}))
    den = load_denoiser(wan_dir[0], adapter=folder)
    weight = den.ref_blocks[0].attn1.to_q.weight
    a, b = (lora[f"ref_blocks.0.attn1.to_q.lora_{x}.weight"] for x in "AB")
    torch.testing.assert_close(weight, full["ref_blocks.0.attn1.to_q.weight"] + 2.0 * b @ a, rtol=0, atol=1e-6)
    assert rel_err(outputs(den, 7), outputs(oracle, 7)) < 1e-5


def test_video_stream_full_tensors_change_the_video_stream_only(wan_dir, tmp_path):
    gen = torch.Generator().manual_seed(8)
    base = base_state(wan_dir)
    video = random_like({k: base[k] for k in ("patch_embedding.weight", "proj_out.bias", "blocks.0.scale_shift_table",
                                              "blocks.1.attn1.to_q.weight", "blocks.1.norm2.weight")}, gen)
    den = load_denoiser(wan_dir[0], adapter=save(tmp_path / "a", video))
    want = built_with(wan_dir, video)
    assert_same_state(den, want)  # the reference stream stays the copy of the base, not of the changed blocks
    assert torch.equal(den.ref_blocks[1].attn1.to_q.weight, base["blocks.1.attn1.to_q.weight"])
    for refs in (0, 2):
        assert rel_err(outputs(den, 9, refs), outputs(want, 9, refs)) < 1e-6
    assert rel_err(outputs(den, 9, 0), outputs(load_denoiser(wan_dir[0]), 9, 0)) > 1e-2


def test_video_lora_file_merges_as_diffusers_fuses_it(wan_dir, tmp_path):
    """``video_lora`` names a base-model LoRA in the adapter folder (diffusers' spelling here, with a proj_out pair
    no reference adapter may hold): the video stream is what diffusers' loader fuses, the reference stream the copy
    of the base plus the adapter's own tensors."""
    from diffusers import WanTransformer3DModel

    diffusers_model = WanTransformer3DModel.from_pretrained(wan_dir[0] / "transformer")
    ref = random_like({"ref_blocks.0.norm2.weight": torch.zeros(48)}, torch.Generator().manual_seed(10))
    folder = save(tmp_path / "a", ref, video_lora="video_delta.safetensors")
    save_file(diffusers_tensors(Writer(diffusers_model, seed=11)), folder / "video_delta.safetensors")
    den = load_denoiser(wan_dir[0], adapter=folder)
    fused, base, ours = diffusers_merged(diffusers_model, [(folder / "video_delta.safetensors", 1.0)]), \
        base_state(wan_dir), den.state_dict()
    assert not torch.equal(fused["proj_out.weight"], base["proj_out.weight"])
    for key in fused:
        torch.testing.assert_close(ours[key], fused[key], rtol=1e-5, atol=1e-6, msg=key)
        if key.startswith("blocks."):
            want = ref.get(f"ref_{key}", base[key])
            assert torch.equal(ours[f"ref_{key}"], want), key


def test_blocks_lora_video_reads_peft_names_of_both_streams(wan_dir, tmp_path):
    """A PEFT adapter trained on this model's two streams: with ``"blocks_lora": "video"`` its ``blocks.N`` pairs
    change the video stream and ``ref_blocks.N`` the reference stream; without it both would name the reference
    stream, which is refused rather than guessed."""
    oracle, lora = peft_on(built_with(wan_dir, {}), rf"(ref_)?{modules_pattern('blocks')}", 8.0, seed=12)
    assert any(k.startswith("blocks.") for k in lora) and any(k.startswith("ref_blocks.") for k in lora)
    tensors = {f"base_model.model.{k}": v for k, v in lora.items()}
    folder = save(tmp_path / "a", tensors, blocks_lora="video")
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 8.0}))
    den = load_denoiser(wan_dir[0], adapter=folder)
    for refs in (0, 2):
        assert rel_err(outputs(den, 13, refs), outputs(oracle, 13, refs)) < 1e-5
    (folder / "mvgen_config.json").unlink()
    with pytest.raises(AdapterError, match=r"gives these twice: \['ref_blocks.0.attn1.to_q'"):
        load_denoiser(wan_dir[0], adapter=folder)


def _peft_dir(lora, folder, alpha):
    save(folder, {f"transformer.{k.removeprefix('ref_')}": v for k, v in lora.items()})
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha}))


def _kohya(lora, folder, alpha):
    tensors = {}
    for key, v in lora.items():
        module, half = key.removeprefix("ref_").split(".lora_")
        stem = f"lora_unet_{module.replace('.', '_')}"
        tensors[f"{stem}.{'lora_down' if half.startswith('A') else 'lora_up'}.weight"] = v
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save(folder, tensors, name="ref.safetensors")


def _mvi2v(lora, folder, alpha):
    # MVI2V's own code: W + alpha * B @ A, alpha 1 by default (App. C), nothing in the file but the pairs
    config = {"lora_convention": "mvi2v", **({"lora_alpha": alpha} if alpha != 1.0 else {})}
    save(folder, {f"diffusion_model.{k.removeprefix('ref_')}": v for k, v in lora.items()}, **config)


# (writer, the file's alpha, the scale it means, words of the log line naming where it came from)
CONVENTIONS = {
    "peft": (_peft_dir, 8.0, 2.0, "alpha 8 / rank 4 (alpha_over_rank; alpha from the PEFT config)"),
    "kohya": (_kohya, 2.0, 0.5, "alpha 2 / rank 4 (alpha_over_rank; alpha from the kohya .alpha tensor)"),
    "mvi2v": (_mvi2v, 1.0, 1.0, "alpha 1, not divided by rank 4 (mvi2v; alpha from the default, 1)"),
    "mvi2v_alpha": (_mvi2v, 0.5, 0.5, "alpha 0.5, not divided by rank 4 (mvi2v; alpha from the config's lora_alpha)"),
}


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_lora_scale_follows_the_files_convention(wan_dir, tmp_path, caplog, convention):
    write, alpha, scale, words = CONVENTIONS[convention]
    # PEFT's scaling is lora_alpha / r, so lora_alpha = scale * r makes its unmerged layers the oracle of any scale
    oracle, lora = peft_on(built_with(wan_dir, {}), modules_pattern("ref_blocks"), scale * RANK, seed=14)
    write(lora, tmp_path / convention, alpha)
    adapter = tmp_path / convention
    caplog.set_level(logging.INFO, logger="mvgen.loading")
    den = load_denoiser(wan_dir[0], adapter=adapter)
    a, b = (lora[f"ref_blocks.1.ffn.net.2.lora_{x}.weight"] for x in "AB")  # the hand formula W + scale * B @ A
    # (the reference stream shares the base weight and applies its pair unmerged: engine.adapters.reference_weights)
    torch.testing.assert_close(den.ref_blocks[1].ffn.net[2].merged_weight(),
                               wan_dir[1].blocks[1].ffn.net[2].weight + scale * b @ a, rtol=0, atol=1e-6)
    assert rel_err(outputs(den, 15), outputs(oracle, 15)) < 1e-5
    lines = [r.getMessage() for r in caplog.records if r.name == "mvgen.loading"]
    assert len(lines) == 1
    assert f"reference-stream LoRA on {2 * len(MODULES)} module(s): scale {scale:g} = {words}" in lines[0], lines


def test_lora_scale_argument_replaces_the_files(wan_dir, tmp_path, caplog):
    _, lora = peft_on(built_with(wan_dir, {}), modules_pattern("ref_blocks"), 8.0, seed=16)
    _kohya(lora, tmp_path / "k", 8.0)
    caplog.set_level(logging.INFO, logger="mvgen.loading")
    den = load_denoiser(wan_dir[0], adapter=tmp_path / "k", lora_scale=0.0, ref_weights="merged")
    assert_same_state(den, built_with(wan_dir, {}))
    assert "scale 0 = lora_scale given at load" in caplog.text


class WithModeGate(MultiViewWanTransformer):
    """The model with one more parameter under a mode (``identity``), standing for a mode engineers add."""

    def __init__(self, config):
        super().__init__(config)
        if config.identity:
            self.test_identity_gate = torch.nn.Parameter(torch.zeros(5))


def test_a_modes_tensors_come_from_the_adapter_or_the_load_is_refused(wan_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(engine.backbones.wan.loading, "MultiViewWanTransformer", WithModeGate)
    load_denoiser(wan_dir[0])  # without the mode the model has no such parameter and needs nothing
    # what the mode adds to the model: the gate, and whatever identity modules the model itself has
    config = denoiser_config(wan_dir[0])
    with torch.device("meta"):
        plain = WithModeGate(config).state_dict()
        moded = WithModeGate(config.replace(identity=True)).state_dict()
    mode = random_like({k: v for k, v in moded.items() if k not in plain}, torch.Generator().manual_seed(17))
    assert "test_identity_gate" in mode
    named = re.escape(f"{sorted(mode)[:6]}{' ...' if len(mode) > 6 else ''} ({len(mode)} in all), "
                      f"which identity=True needs")
    with pytest.raises(AdapterError, match="no adapter was given, so the model lacks .*" + named):
        load_denoiser(wan_dir[0], identity=True)
    lacking = {k: v for k, v in mode.items() if k != "test_identity_gate"}
    with pytest.raises(AdapterError, match=r"the adapter .* lacks .*\['test_identity_gate'\] \(1 in all\), which "
                                           r"identity=True needs"):
        load_denoiser(wan_dir[0], adapter=save(tmp_path / "lacking", lacking), identity=True)
    den = load_denoiser(wan_dir[0], adapter=save(tmp_path / "mode", mode), identity=True)
    assert torch.equal(den.test_identity_gate, mode["test_identity_gate"])


@pytest.mark.parametrize("tensors,overrides,words", [
    ({"blocks.0.attn1.to_zz.weight": torch.zeros(48, 48), "fancy.scale": torch.zeros(1),
      "ref_blocks.0.norm2.weight": torch.zeros(48)}, {},
     r"not understood: \['blocks.0.attn1.to_zz.weight', 'fancy.scale'\] \(2 in all\) are no parameter"),
    ({"ref_blocks.0.scale_shift_table": torch.zeros(1, 6, 48)}, {"ref_mode": "token_concat"},
     r"\['ref_blocks.0.scale_shift_table'\] .*ref_blocks exist only with ref_mode='dual_stream'"),
    ({"ref_blocks.1.norm2.weight": torch.zeros(47), "patch_embedding.weight": torch.zeros(48, 16, 1, 2, 2)}, {},
     r"wrong shape \(adapter vs model\): \['patch_embedding.weight \[48, 16, 1, 2, 2\] vs \[48, 36, 1, 2, 2\]', "
     r"'ref_blocks.1.norm2.weight \[47\] vs \[48\]'\]"),
    ({"transformer.proj_out.lora_A.weight": torch.zeros(4, 48)}, {}, r"LoRA key\(s\) not understood.*video_lora"),
])
def test_adapter_tensors_the_model_cannot_take_are_refused_by_name(wan_dir, tmp_path, tensors, overrides, words):
    with pytest.raises(AdapterError, match=words):
        load_denoiser(wan_dir[0], adapter=save(tmp_path / "a", tensors), **overrides)


def test_reference_patch_embedding_without_bias(wan_dir, tmp_path):
    weight = torch.randn(48, 16, 1, 2, 2, generator=torch.Generator().manual_seed(18)) * 0.1
    den = load_denoiser(wan_dir[0], adapter=save(tmp_path / "a", {"ref_patch_embedding.weight": weight}))
    assert den.ref_patch_embedding.in_channels == 16 and den.ref_patch_embedding.bias is None
    assert torch.equal(den.ref_patch_embedding.weight, weight)


@pytest.mark.parametrize("config,name,words", [
    ({"lora_rank": 8}, "adapter_model.safetensors", r"has rank 4, the config's lora_rank is 8"),
    ({"lora_convention": "alpha"}, "adapter_model.safetensors", r"lora_convention must be one of"),
    ({"blocks_lora": "both"}, "adapter_model.safetensors", r"blocks_lora must be one of \('reference', 'video'\)"),
    ({"video_lora": "missing.safetensors"}, "adapter_model.safetensors", r"video_lora 'missing.safetensors' is not"),
    (None, "ref.safetensors", r"adapter_config.json describes adapter_model.safetensors"),
])
def test_adapter_settings_that_cannot_hold_are_refused(wan_dir, tmp_path, config, name, words):
    _, lora = peft_on(built_with(wan_dir, {}), modules_pattern("ref_blocks"), 8.0, seed=19)
    folder = save(tmp_path / "a", {f"transformer.{k.removeprefix('ref_')}": v for k, v in lora.items()}, name=name,
                  **(config or {}))
    if config is None:
        (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 8.0}))
    with pytest.raises(AdapterError, match=words):
        load_denoiser(wan_dir[0], adapter=folder)
