"""FP8 single files as the tools write them (``engine.backbones.wan.fp8_files``), built here from the tiny
checkpoint in each convention's key layout and quantisation rule, read from each tool's public code:

- ComfyUI ``fp8_e4m3fn``: every 2-D weight cast to e4m3fn, no scale, under ``model.diffusion_model.``;
- ComfyUI-WanVideoWrapper (Kijai): every weight cast except names holding ``norm``, ``head``, ``bias``, ``time_``,
  ``patch_embedding``, ``img_emb``, ``modulation`` (its loader's keep-list), no prefix;
- ComfyUI ``fp8_scaled``: block linears per-tensor absmax, ``<layer>.scale_weight`` 0-d, ``scale_input`` of 1, the
  ``scaled_fp8`` marker (empty); LightX2V's ``--comfyui_mode`` variant writes the marker as two zeros;
- ComfyUI ``comfy_quant``: ``<layer>.comfy_quant`` JSON bytes + 0-d ``<layer>.weight_scale``;
- LightX2V ``--linear_type fp8``: the ``self_attn``/``cross_attn``/``ffn`` weights per output channel (absmax / 448,
  absmax clamped at 1e-5), ``<layer>.weight_scale`` [out, 1] float32, everything else bf16.

The oracle for "the same weights": quantising the original model ourselves (``--quantize fp8`` on the 32-bit
checkpoint) for the per-channel convention, and each convention's own dequantisation (the file's bytes times the
file's scale) for the others, whose scales are not ours.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from engine.backbones.registry import load_denoiser
from engine.backbones.wan.single_file import fp8_file_scales
from engine.errors import CheckpointError
from engine.runtime.fp8 import FP8_MAX, Fp8Linear, block_linears

from .original_wan import to_original_wan

E4M3 = torch.float8_e4m3fn
KIJAI_KEEP = ("norm", "head", "bias", "time_", "patch_embedding", "img_emb", "modulation")
LIGHTX2V_TARGETS = ("self_attn", "cross_attn", "ffn")


def _block_linear(key: str, value: torch.Tensor) -> bool:
    return key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2 and key.split(".")[2] in \
        LIGHTX2V_TARGETS


def comfyui_plain(state):
    return {f"model.diffusion_model.{k}": v.to(E4M3) if v.ndim == 2 and k.endswith(".weight") else v
            for k, v in state.items()}


def wanvideowrapper(state):
    return {k: v if any(word in k for word in KIJAI_KEEP) else v.to(E4M3) for k, v in state.items()}


def comfyui_scaled(state, marker_elements: int = 0):
    """``marker_elements``: ComfyUI's own files carry an empty marker, LightX2V's ``--comfyui_mode`` two zeros."""
    out = {"model.diffusion_model.scaled_fp8": torch.zeros(marker_elements, dtype=E4M3)}
    for k, v in state.items():
        if _block_linear(k, v):
            scale = v.abs().max() / FP8_MAX
            layer = k.removesuffix(".weight")
            out[f"model.diffusion_model.{k}"] = (v / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
            out[f"model.diffusion_model.{layer}.scale_weight"] = scale.reshape(())
            out[f"model.diffusion_model.{layer}.scale_input"] = torch.tensor(1.0)
        else:
            out[f"model.diffusion_model.{k}"] = v
    return out


def comfyui_quant(state):
    out = {}
    tag = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for k, v in state.items():
        if _block_linear(k, v):
            scale = v.abs().max() / FP8_MAX
            layer = k.removesuffix(".weight")
            out[k], out[f"{layer}.weight_scale"], out[f"{layer}.comfy_quant"] = (
                (v / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3), scale.reshape(()), tag)
        else:
            out[k] = v
    return out


def lightx2v(state):
    out = {}
    for k, v in state.items():
        if _block_linear(k, v):
            scale = v.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / FP8_MAX
            out[k] = (v / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
            out[k.removesuffix(".weight") + ".weight_scale"] = scale.float()
        else:
            out[k] = v.to(torch.bfloat16)
    return out


CONVENTIONS = {"comfyui_plain": comfyui_plain, "wanvideowrapper": wanvideowrapper, "comfyui_scaled": comfyui_scaled,
               "comfyui_scaled_lightx2v": lambda s: comfyui_scaled(s, 2),
               "comfyui_quant": comfyui_quant, "lightx2v": lightx2v}


@pytest.fixture(scope="module")
def original(tiny_cache):
    """(tiny pipeline dir, its transformer's state in the original Wan names, float32)."""
    path = tiny_cache / "tiny-v2"
    state = WanTransformer3DModel.from_pretrained(path / "transformer").state_dict()
    return path, to_original_wan(state)


def _write(tmp_path, tensors, name="fp8.safetensors"):
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, tmp_path / name)
    return tmp_path / name


def _file_dequantized(tensors: dict, wan_key: str) -> torch.Tensor:
    """The convention's own dequantisation of one weight: the file's e4m3 values times the file's scale."""
    full = next(k for k in tensors if k.endswith(wan_key))
    layer = full.removesuffix(".weight")
    scale = next((tensors[k] for k in (f"{layer}.scale_weight", f"{layer}.weight_scale") if k in tensors), None)
    q = tensors[full].float()
    return q if scale is None else q * scale.float().reshape(-1, 1) if scale.numel() > 1 else q * scale.float()


# what each file is recognised as (``Fp8Layout.convention``)
RECOGNISED = {"comfyui_plain": "plain", "wanvideowrapper": "plain", "comfyui_scaled": "comfyui_scaled",
              "comfyui_scaled_lightx2v": "comfyui_scaled", "comfyui_quant": "comfyui_quant", "lightx2v": "lightx2v"}


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_each_convention_loads_the_file_bytes_as_fp8(original, tmp_path, convention, caplog):
    """With ``--quantize fp8`` each block linear holds the file's own e4m3 bytes (an unscaled file: scale 1; a
    per-tensor scale broadcast over the rows), so its dequantised weight is exactly the convention's; the log names
    the convention it was read as."""
    path, state = original
    tensors = CONVENTIONS[convention](state)
    file = _write(tmp_path, tensors)
    with caplog.at_level(logging.INFO, logger="mvgen.loading"):
        model = load_denoiser(path, weights_file=file, quantize="fp8", ref_mode="token_concat")
    assert f"FP8 file ({RECOGNISED[convention]})" in caplog.text
    scales = fp8_file_scales(file)
    checked = 0
    for name, module in block_linears(model):
        assert isinstance(module, Fp8Linear), name
        wan_key = _wan_name(name)
        want = _file_dequantized(tensors, wan_key)
        if want.dtype != torch.float32 or tensors[next(k for k in tensors if k.endswith(wan_key))].dtype != E4M3:
            continue  # a weight the convention left in 16/32 bits: quantised by us (absmax), checked elsewhere
        assert torch.equal(module.weight.float() * module.weight_scale[:, None], want), name
        assert torch.equal(module.weight_scale, scales[name]), name
        checked += 1
    assert checked == len(block_linears(model)) == 24  # every block linear is FP8 in every convention's file


def _wan_name(diffusers_module: str) -> str:
    """``blocks.0.attn1.to_q`` -> ``blocks.0.self_attn.q.weight`` (the test helper's rename)."""
    (name,) = to_original_wan({f"{diffusers_module}.weight": None})
    return name


def test_lightx2v_file_loads_to_the_same_fp8_weights_as_quantizing_the_original(original, tmp_path):
    """LightX2V's rule is per-channel absmax, ours too: the file's bytes and scales are exactly what
    ``--quantize fp8`` makes of the 32-bit original."""
    path, state = original
    from_file = load_denoiser(path, weights_file=_write(tmp_path, lightx2v(state)), quantize="fp8",
                              ref_mode="token_concat")
    ours = load_denoiser(path, quantize="fp8", ref_mode="token_concat")
    pairs = list(zip(block_linears(from_file), block_linears(ours)))
    assert pairs
    for (name, got), (_, want) in pairs:
        assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8)), name
        assert torch.equal(got.weight_scale, want.weight_scale), name


@pytest.mark.parametrize("convention", ["comfyui_scaled", "lightx2v"])
def test_without_quantize_an_fp8_file_loads_dequantized(original, tmp_path, convention):
    """No ``--quantize``: the FP8 weights come back as 16/32-bit weights, q * scale rounded once to bf16."""
    path, state = original
    tensors = CONVENTIONS[convention](state)
    model = load_denoiser(path, weights_file=_write(tmp_path, tensors), ref_mode="token_concat")
    module = model.blocks[1].attn1.to_q
    assert not isinstance(module, Fp8Linear) and module.weight.dtype == torch.float32
    want = _file_dequantized(tensors, "blocks.1.self_attn.q.weight").to(torch.bfloat16).float()
    assert torch.equal(module.weight, want)


def _refusal(tmp_path, original, change, match):
    path, state = original
    tensors = lightx2v(state)
    change(tensors)
    file = _write(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=match) as error:
        load_denoiser(path, weights_file=file, quantize="fp8", ref_mode="token_concat")
    assert "\n" not in str(error.value)


def test_block_wise_scales_are_refused_naming_the_key(original, tmp_path):
    def block_wise(t):
        t["blocks.0.self_attn.q.weight_scale"] = torch.ones(2, 2)
    _refusal(tmp_path, original, block_wise,
             r"unknown FP8 scale layout: key 'blocks.0.self_attn.q.weight_scale' \(float32 \[2, 2\]\)")


def test_an_unknown_scale_key_is_refused_naming_it(original, tmp_path):
    def inverse(t):
        t["blocks.0.ffn.0.weight_scale_inv"] = torch.ones(1)
    _refusal(tmp_path, original, inverse, r"unknown FP8 scale layout: key 'blocks.0.ffn.0.weight_scale_inv'")


def test_scale_weight_without_the_marker_is_refused_as_mislabelled(original, tmp_path):
    path, state = original
    tensors = {k: v for k, v in comfyui_scaled(state).items() if not k.endswith("scaled_fp8")}
    file = _write(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"scale_weight' .*without the 'scaled_fp8' marker \(mislabelled\)"):
        load_denoiser(path, weights_file=file, quantize="fp8", ref_mode="token_concat")


def test_other_fp8_formats_are_refused(original, tmp_path):
    def e5m2(t):
        t["blocks.0.self_attn.k.weight"] = t["blocks.0.self_attn.k.weight"].float().to(torch.float8_e5m2)
    _refusal(tmp_path, original, e5m2, r"'blocks.0.self_attn.k.weight' is torch.float8_e5m2")
    path, state = original
    tensors = comfyui_quant(state)
    tensors["blocks.1.ffn.2.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"'blocks.1.ffn.2.comfy_quant' declares format 'nvfp4'"):
        load_denoiser(path, weights_file=_write(tmp_path, tensors, "q.safetensors"), quantize="fp8",
                      ref_mode="token_concat")
