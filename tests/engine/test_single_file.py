"""Single-file Wan transformers in the original Wan key names, read into diffusers names. Oracles we did not
write: diffusers' converter (checks the test helper that writes the original names) and diffusers' own
``WanTransformer3DModel.from_single_file`` (checks what ``read_single_file_transformer`` returns)."""
from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from engine.errors import CheckpointError
from engine.backbones.wan.single_file import is_single_file, read_single_file_transformer

from .conftest import make_wan
from .original_wan import to_original_wan

VARIANTS = {
    "i2v": dict(image_dim=32),
    "t2v": dict(in_channels=16, image_dim=None, added_kv_proj_dim=None),
}
PREFIXES = ["", "model.diffusion_model.", "diffusion_model."]
# names the original Wan code gives its parameters (Wan2.1 wan/modules/model.py), per variant
WAN_NAMES = {
    "t2v": ["patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
            "time_projection.1.weight", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.bias",
            "blocks.0.self_attn.norm_q.weight", "blocks.0.cross_attn.k.weight", "blocks.0.norm3.weight",
            "blocks.1.ffn.0.weight", "blocks.1.ffn.2.bias", "blocks.1.modulation", "head.head.weight",
            "head.modulation"],
    "i2v": ["blocks.0.cross_attn.k_img.weight", "blocks.1.cross_attn.v_img.bias",
            "blocks.0.cross_attn.norm_k_img.weight", "img_emb.proj.0.weight", "img_emb.proj.1.weight",
            "img_emb.proj.3.bias", "img_emb.proj.4.weight"],
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def wan(request, tmp_path_factory):
    """(variant, model, folder): a small random diffusers Wan transformer and its ``save_pretrained`` folder
    (the local ``config.json`` diffusers' single-file loader needs offline)."""
    model = make_wan(seed=len(request.param), **VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(f"wan-{request.param}")
    model.save_pretrained(folder)
    return request.param, model, folder


def _write(path, tensors: dict[str, torch.Tensor], prefix: str = ""):
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def _single_file(tmp_path, model, prefix: str = "", name: str = "wan.safetensors", **extra):
    return _write(tmp_path / name, {**to_original_wan(model.state_dict()), **extra}, prefix)


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def _refused(path, *words) -> str:
    with pytest.raises(CheckpointError) as caught:
        read_single_file_transformer(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def test_original_names_are_wans_and_diffusers_converter_inverts_them(wan):
    # the helper that writes the test files is checked against diffusers' converter, not against itself
    variant, model, _ = wan
    state = model.state_dict()
    original = to_original_wan(state)
    expected = WAN_NAMES["t2v"] + (WAN_NAMES["i2v"] if variant == "i2v" else [])
    assert set(expected) <= set(original)
    assert not [k for k in original if any(n in k for n in ("attn1", "attn2", "to_q", "condition_embedder",
                                                             "scale_shift_table", "proj_out", "ffn.net"))]
    _assert_same_state(convert_wan_transformer_to_diffusers(dict(original)), state)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_reads_every_weight_bitwise(wan, tmp_path, prefix):
    _, model, _ = wan
    state, fp8_scales = read_single_file_transformer(_single_file(tmp_path, model, prefix))
    _assert_same_state(state, model.state_dict())
    assert fp8_scales == {}  # a 32-bit file has no FP8 weights


@pytest.mark.parametrize("prefix", PREFIXES)
def test_matches_diffusers_from_single_file(wan, tmp_path, prefix):
    # diffusers' converter strips only "model.diffusion_model.": given "diffusion_model." keys from_single_file
    # leaves every weight on the meta device, so for that prefix its oracle reads the same tensors unprefixed
    _, model, folder = wan
    ours, _ = read_single_file_transformer(_single_file(tmp_path, model, prefix))
    theirs_file = _single_file(tmp_path, model, "" if prefix == "diffusion_model." else prefix, "oracle.safetensors")
    # config= a local folder holding config.json makes it run offline: no Hub lookup of a default config
    loaded = WanTransformer3DModel.from_single_file(str(theirs_file), config=str(folder), local_files_only=True)
    _assert_same_state(ours, loaded.state_dict())


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_refuses_pickles_without_loading_them(wan, tmp_path, suffix):
    # a real torch.save of the weights: loading it would succeed, so only the refusal passes this test
    path = tmp_path / f"wan{suffix}"
    torch.save(to_original_wan(wan[1].state_dict()), path)
    _refused(path, "pickles are never loaded")


def test_refuses_a_wan_vae(tmp_path):
    gen = torch.Generator().manual_seed(1)
    path = _write(tmp_path / "wan_vae.safetensors", {
        "encoder.conv1.weight": torch.randn(4, 3, 3, 3, 3, generator=gen),
        "decoder.middle.0.residual.0.gamma": torch.randn(4, 1, 1, 1, generator=gen),  # diffusers' Wan VAE marker
        "conv1.weight": torch.randn(8, 8, 1, 1, 1, generator=gen),
    })
    _refused(path, "not a Wan transformer", "Wan VAE", "supported:")


def test_refuses_an_unrelated_state_dict(tmp_path):
    gen = torch.Generator().manual_seed(2)
    path = _write(tmp_path / "other.safetensors", {"layers.0.weight": torch.randn(4, 4, generator=gen),
                                                   "layers.0.bias": torch.randn(4, generator=gen)})
    _refused(path, "not a Wan transformer", "supported:")


def test_refuses_a_diffusers_named_file(wan, tmp_path):
    # diffusers' converter would swap its norm2/norm3 names; such a file belongs in a diffusers folder
    path = _write(tmp_path / "diffusion_pytorch_model.safetensors", wan[1].state_dict())
    _refused(path, "diffusers names")


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("marker,name", [("vace_blocks.0.after_proj.bias", "VACE"),
                                         ("motion_encoder.dec.direction.weight", "Animate")])
def test_refuses_unserved_wan_variants(wan, tmp_path, prefix, marker, name):
    path = _single_file(tmp_path, wan[1], prefix, **{marker: torch.ones(48)})
    _refused(path, name, marker, "does not serve")


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("extra", [
    "extra.weight",  # the converter passes it through untouched
    "blocks.0.self_attn.lora_down.weight",  # the converter renames it in part (attn1.lora_down)
    "img_emb.emb_pos",  # Wan FLF2V's position embedding, which the converter does not map
])
def test_refuses_keys_the_converter_does_not_map(wan, tmp_path, prefix, extra):
    path = _single_file(tmp_path, wan[1], prefix, **{extra: torch.zeros(3)})
    _refused(path, f"['{prefix}{extra}']", "not part of a Wan")


def test_refuses_two_keys_that_convert_to_one(wan, tmp_path):
    # a half-converted file with a block's modulation under both names: one would silently win
    modulation = to_original_wan(wan[1].state_dict())["blocks.0.modulation"]
    path = _single_file(tmp_path, wan[1], **{"blocks.0.scale_shift_table": modulation + 1})
    _refused(path, "blocks.0.modulation", "blocks.0.scale_shift_table")


def test_refuses_a_key_both_with_and_without_the_prefix(wan, tmp_path):
    original = to_original_wan(wan[1].state_dict())
    path = _write(tmp_path / "wan.safetensors", {**{f"model.diffusion_model.{k}": v for k, v in original.items()},
                                                 "head.head.weight": original["head.head.weight"] + 1})
    _refused(path, "'head.head.weight'", "with and without")


def test_is_single_file(wan, tmp_path):
    path = _single_file(tmp_path, wan[1])
    assert is_single_file(path) and is_single_file(str(path))
    assert not is_single_file(wan[2]) and not is_single_file(tmp_path / "missing-dir")
    # file paths that do not exist still go to the single-file reader, whose refusal names them
    assert is_single_file(tmp_path / "missing.safetensors") and is_single_file(tmp_path / "missing.ckpt")
    _refused(tmp_path / "missing.safetensors", "not found")
