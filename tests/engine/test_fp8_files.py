"""FP8 single files as the tools write them (``engine.backbones.wan.fp8_files``), built here from the tiny
checkpoint in each convention's key layout and quantisation rule, read from each tool's public code:

- ComfyUI ``fp8_e4m3fn``: every 2-D weight cast to e4m3fn, no scale, under ``model.diffusion_model.``;
- ComfyUI-WanVideoWrapper (Kijai): every weight cast except names holding ``norm``, ``head``, ``bias``, ``time_``,
  ``patch_embedding``, ``img_emb``, ``modulation`` (its loader's keep-list), no prefix;
- ComfyUI ``fp8_scaled``: block linears per-tensor absmax, ``<layer>.scale_weight`` 0-d, ``scale_input`` of 1, the
  ``scaled_fp8`` marker (empty); LightX2V's ``--comfyui_mode`` variant writes the marker as two zeros;
- ComfyUI ``comfy_quant``: ``<layer>.comfy_quant`` JSON bytes + 0-d ``<layer>.weight_scale``;
- LightX2V ``--linear_type fp8``: the ``self_attn``/``cross_attn``/``ffn`` weights per output channel (absmax / 448,
  absmax clamped at 1e-5), ``<layer>.weight_scale`` [out, 1] float32, everything else bf16 (``benchmarks.fp8_load``
  writes it, for its memory figures too).

The oracle for "the same weights": quantising the original model ourselves (``--quantize fp8`` on the 32-bit
checkpoint) for the per-channel convention, and each convention's own dequantisation (the file's bytes times the
file's scale) for the others, whose scales are not ours.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from benchmarks.fp8_load import LIGHTX2V_TARGETS
from benchmarks.fp8_load import lightx2v_tensors as lightx2v  # the benchmark's file is the same convention
from engine.adapters.base_lora import LoraSpec
from engine.adapters.reference_weights import weight_bytes
from engine.backbones.registry import load_denoiser
from engine.errors import CheckpointError
from engine.runtime.fp8 import (FP8_MAX, Fp8Linear, Fp8LowRankLinear, block_linears, quantize_weight,
                                quantize_with_scale, shares_reference_fp8)
from engine.tiny import ADAPTER_MODULES

from .original_wan import to_original_wan

E4M3 = torch.float8_e4m3fn
KIJAI_KEEP = ("norm", "head", "bias", "time_", "patch_embedding", "img_emb", "modulation")


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


# what each file is recognised as (``Fp8Layout.convention``)
RECOGNISED = {"comfyui_plain": "plain", "wanvideowrapper": "plain", "comfyui_scaled": "comfyui_scaled",
              "comfyui_scaled_lightx2v": "comfyui_scaled", "comfyui_quant": "comfyui_quant", "lightx2v": "lightx2v"}


def _file_weight(tensors: dict, wan_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the file's e4m3 weight, its scale as the convention means it, broadcast to one per output row: a per-tensor
    scale repeated, an unscaled file's ones) of one original-name weight key."""
    full = next(k for k in tensors if k.endswith(wan_key))
    layer = full.removesuffix(".weight")
    q = tensors[full]
    scale = next((tensors[k] for k in (f"{layer}.scale_weight", f"{layer}.weight_scale") if k in tensors), None)
    rows = q.shape[0]
    scale = torch.ones(rows) if scale is None else scale.float().reshape(-1).expand(rows) if scale.numel() == 1 \
        else scale.float().reshape(rows)
    return q, scale


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_each_convention_loads_the_file_bytes_as_fp8(original, tmp_path, convention, caplog):
    """With ``--quantize fp8`` each block linear holds the file's own e4m3 bytes and scale (an unscaled file: 1; a
    per-tensor scale broadcast over the rows), handed over without a 16-bit pass. Those are also exactly what the
    former path made of them (dequantised into bfloat16, then requantised with the file's scale): the bytes do not
    change with the path. The log names the convention and counts the weights taken as stored."""
    path, state = original
    tensors = CONVENTIONS[convention](state)
    file = _write(tmp_path, tensors)
    with caplog.at_level(logging.INFO, logger="mvgen.loading"):
        model = load_denoiser(path, weights_file=file, quantize="fp8", ref_mode="token_concat")
    assert f"FP8 file ({RECOGNISED[convention]})" in caplog.text
    assert "24 block linears held as float8_e4m3fn, 24 as the FP8 file stored them" in caplog.text
    for name, module in block_linears(model):
        assert isinstance(module, Fp8Linear) and module.weight.dtype == E4M3, name
        q, scale = _file_weight(tensors, _wan_name(name))
        assert q.dtype == E4M3, name  # every convention's file holds every block linear in FP8
        assert torch.equal(module.weight.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(module.weight_scale, scale), name
        former = quantize_with_scale((q.float() * scale[:, None]).to(torch.bfloat16), scale)
        assert torch.equal(former.view(torch.uint8), q.view(torch.uint8)), name
    assert len(block_linears(model)) == 24


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
    assert len(pairs) == 24
    for (name, got), (_, want) in pairs:
        assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8)), name
        assert torch.equal(got.weight_scale, want.weight_scale), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("convention", ["comfyui_plain", "comfyui_scaled", "lightx2v"])
def test_without_quantize_an_fp8_file_loads_dequantized(original, tmp_path, convention, dtype):
    """No ``--quantize``: each FP8 weight comes back as ``q * scale`` computed in float32 and rounded once to the
    model's dtype (float32: exact; bfloat16: what the former bfloat16 pass gave too), block linears and the
    embeddings a plain file casts alike."""
    path, state = original
    tensors = CONVENTIONS[convention](state)
    model = load_denoiser(path, weights_file=_write(tmp_path, tensors), ref_mode="token_concat", dtype=dtype)
    assert not any(p.dtype == E4M3 for p in model.parameters())
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name:
            continue
        wan_key = _wan_name(name)
        if not any(k.endswith(wan_key) and v.dtype == E4M3 for k, v in tensors.items()):
            continue  # a tensor the convention left in 16/32 bits
        q, scale = _file_weight(tensors, wan_key)
        want = (q.float() * scale[:, None]).to(module.weight.dtype)
        assert module.weight.dtype == (torch.float32 if "time_embedder" in name else dtype), name
        assert torch.equal(module.weight, want), name
        checked += 1
    assert checked >= 24


def test_fp8_file_with_a_shared_reference_stream_shares_its_bytes(original, tmp_path):
    """MVI2V's adapter (its reference LoRA unmerged on the shared weights) on an FP8 file: the reference stream holds
    the video stream's FP8 tensors (the file's bytes), so the model weighs exactly what the same model quantised from
    the 32-bit checkpoint weighs (at Wan 14B's widths 1.037x the FP8 base: ``test_fp8``), and computes the same."""
    path, state = original
    file = _write(tmp_path, lightx2v(state))
    from_file = load_denoiser(path, path / "adapter", weights_file=file, quantize="fp8")
    ours = load_denoiser(path, path / "adapter", quantize="fp8")
    assert shares_reference_fp8(from_file) and any(isinstance(m, Fp8LowRankLinear) for m in from_file.modules())
    video, ref = from_file.blocks[0].attn1.to_q, from_file.ref_blocks[0].attn1.to_q
    assert ref.weight.untyped_storage().data_ptr() == video.weight.untyped_storage().data_ptr()
    assert ref.weight_scale is video.weight_scale
    assert weight_bytes(from_file) == weight_bytes(ours)
    for (name, got), (_, want) in zip(block_linears(from_file), block_linears(ours)):
        assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8)), name


@pytest.mark.parametrize("lora_scale,kept", [(None, "absmax"), (1e-3, "file")])
def test_fp8_file_with_a_merged_reference_stream(original, tmp_path, lora_scale, kept):
    """``ref_weights=merged``: the reference stream copies the file's bytes and scales; where the adapter's LoRA merges
    into a copy, that weight alone is dequantised (float32), merged (as the same load without ``--quantize`` gives it
    in float32), and quantised again: with the file's scale where every row still fits it (a small LoRA), by absmax
    where one outgrew it (the tiny adapter's random pairs at their own scale)."""
    path, state = original
    tensors = comfyui_scaled(state)
    file = _write(tmp_path, tensors)
    fp8 = load_denoiser(path, path / "adapter", lora_scale=lora_scale, weights_file=file, quantize="fp8",
                        ref_weights="merged")
    plain = load_denoiser(path, path / "adapter", lora_scale=lora_scale, weights_file=file, ref_weights="merged")
    assert not shares_reference_fp8(fp8)
    merged, scales = 0, set()
    for name, module in block_linears(fp8):
        if not name.startswith("ref_blocks."):
            continue
        q, scale = _file_weight(tensors, _wan_name(name.removeprefix("ref_")))
        weight = plain.get_submodule(name).weight
        if torch.equal(weight, q.float() * scale[:, None]):  # no LoRA on it: the file's bytes
            want = q, scale
        elif (weight.abs().amax(1) <= scale * FP8_MAX * (1 + 2.0**-7)).all():  # the file's scale still fits
            want = quantize_with_scale(weight, scale), scale
            scales.add("file")
        else:  # a row outgrew it (it would saturate): absmax scales
            want = quantize_weight(weight)
            scales.add("absmax")
        merged += want[0] is not q
        assert torch.equal(module.weight.view(torch.uint8), want[0].view(torch.uint8)), name
        assert torch.equal(module.weight_scale, want[1]), name
    assert merged == len(fp8.ref_blocks) * len(ADAPTER_MODULES) and scales == {kept}  # every pair of the adapter


def test_fp8_file_with_a_base_lora(original, tmp_path):
    """A base-model LoRA (``--lora``) on an FP8 file: only the weights it targets are dequantised and merged (then
    quantised again, with the file's scale where it fits); every other block linear keeps the file's bytes."""
    path, state = original
    tensors = lightx2v(state)
    file = _write(tmp_path, tensors)
    gen = torch.Generator().manual_seed(8)
    targets = ("blocks.0.attn1.to_q", "blocks.1.ffn.net.2")
    pairs = {}
    for target in targets:
        out_features, in_features = state[_wan_name(target)].shape
        pairs[f"transformer.{target}.lora_A.weight"] = torch.randn(2, in_features, generator=gen) * 0.1
        pairs[f"transformer.{target}.lora_B.weight"] = torch.randn(out_features, 2, generator=gen) * 0.1
    lora = LoraSpec(_write(tmp_path, pairs, "lora.safetensors"))
    fp8 = load_denoiser(path, weights_file=file, loras=[lora], quantize="fp8", ref_mode="token_concat")
    plain = load_denoiser(path, weights_file=file, loras=[lora], ref_mode="token_concat")
    for name, module in block_linears(fp8):
        q, scale = _file_weight(tensors, _wan_name(name))
        weight = plain.get_submodule(name).weight
        if name not in targets:
            assert torch.equal(weight, q.float() * scale[:, None]), name
            want = q, scale
        elif (weight.abs().amax(1) <= scale * FP8_MAX * (1 + 2.0**-7)).all():
            want = quantize_with_scale(weight, scale), scale
        else:
            want = quantize_weight(weight)
        assert torch.equal(module.weight.view(torch.uint8), want[0].view(torch.uint8)), name
        assert torch.equal(module.weight_scale, want[1]), name
        assert (name in targets) == (not torch.equal(module.weight.view(torch.uint8), q.view(torch.uint8))), name


@pytest.mark.slow  # one load in a fresh process (~25 s on 2 busy cores)
def test_loading_an_fp8_file_to_fp8_never_holds_a_16_bit_copy(tmp_path):
    """The peak resident memory of ``--quantize fp8`` from a LightX2V file grows by about the FP8 model, every tensor
    read (``benchmarks.fp8_load``'s sample): measured 1.23x its 14.6 MiB here, where dequantising into bfloat16 and
    casting to float32 first measured 4.48x (the revision before the direct path)."""
    from benchmarks.fp8_load import sample

    from .conftest import make_wan

    model = make_wan(seed=6, in_channels=16, image_dim=None, added_kv_proj_dim=None, num_attention_heads=4,
                     attention_head_dim=64, ffn_dim=1024, num_layers=12, text_dim=32)
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    file = _write(tmp_path, lightx2v(to_original_wan(model.state_dict())))
    del model
    code = Path(__file__).resolve().parents[2]
    measured = sample(code, tmp_path, file, {"quantize": "fp8"})
    assert measured["fp8_sha256"] is not None
    assert measured["peak_growth"] < 1.6 * measured["model_bytes"], measured


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
