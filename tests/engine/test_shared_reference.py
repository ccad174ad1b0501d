"""The shared reference stream (``ref_weights="shared"``, ``engine.adapters.reference_weights``): the video stream's weights
plus the reference LoRA unmerged. Its oracle is the merged stream (``ref_weights="merged"``), which
tests/engine/test_lora.py and test_adapter_format.py check against PEFT and diffusers: the same outputs in every
reference attention mode and adapter convention, a fallback to merged that says why, and the memory it saves."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from engine.adapters.base_lora import LoraSpec
from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.loading import denoiser_config
from engine.backbones.registry import load_denoiser
from engine.adapters.lora import BLOCK_LINEARS
from engine.adapters.reference_weights import (LowRankLinear, holds_shared_weights, merged_reference_stream,
                                      share_reference_stream, weight_bytes, wrap_low_rank)

from .conftest import inputs, make_wan, rel_err
from .test_base_lora import Writer, write_diffusers

RANK = 4
LAYERS = 2
# the reference attention modes, as config overrides; "cached" runs the stream once (precompute_reference)
MODES = {
    "full": {},
    "isolated": dict(ref_attention="isolated"),
    "isolated_cached": dict(ref_attention="isolated", ref_timestep="zero"),
    "prototype": dict(ref_attention="prototype"),
    "prototype_cached": dict(ref_attention="prototype", ref_timestep="zero"),
}


def block_shapes(path) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in MultiViewWanTransformer(denoiser_config(path)).state_dict().items()}


def lora_pairs(shapes, gen) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) on every block linear of every layer, by module (``blocks.1.attn1.to_q``)."""
    pairs = {}
    for i in range(LAYERS):
        for module in BLOCK_LINEARS:
            out_features, in_features = shapes[f"blocks.{i}.{module}.weight"]
            pairs[f"blocks.{i}.{module}"] = (torch.randn(RANK, in_features, generator=gen) * 0.2,
                                             torch.randn(out_features, RANK, generator=gen) * 0.2)
    return pairs


def write_peft(folder, pairs, tensors):
    """PEFT's adapter_model.safetensors (diffusers names) with alpha 8 / rank 4 in adapter_config.json."""
    folder.mkdir()
    lora = {f"transformer.{m}.lora_{x}.weight": t for m, (a, b) in pairs.items() for x, t in (("A", a), ("B", b))}
    save_file({**lora, **tensors}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 8.0}))
    return folder


def write_mvi2v(folder, pairs, tensors):
    """MVI2V's own spelling: original Wan names, ``W + alpha * B @ A`` (not divided by the rank; alpha 1)."""
    folder.mkdir()
    lora = {}
    for module, (a, b) in pairs.items():
        _, block, name = module.split(".", 2)
        stem = f"diffusion_model.blocks.{block}.{BLOCK_LINEARS[name]}"
        lora |= {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}
    save_file({**lora, **tensors}, folder / "ref.safetensors")
    (folder / "mvgen_config.json").write_text(json.dumps({"lora_convention": "mvi2v"}))
    return folder / "ref.safetensors"


WRITERS = {"peft": write_peft, "mvi2v": write_mvi2v}


def full_reference_tensors(shapes, gen) -> dict[str, torch.Tensor]:
    """A partly trained reference stream: its own modulation, norms, a bias under a shared weight's LoRA, and a
    whole projection weight (whose LoRA then merges into it)."""
    names = ["ref_blocks.0.scale_shift_table", "ref_blocks.1.norm2.weight", "ref_blocks.1.norm2.bias",
             "ref_blocks.0.attn1.norm_q.weight", "ref_blocks.0.ffn.net.2.bias", "ref_blocks.1.attn1.to_q.weight"]
    return {k: torch.randn(shapes[k], generator=gen) * 0.2 + 0.1 for k in names}


def mode_tensors(path, overrides, gen) -> dict[str, torch.Tensor]:
    """Random values for what a mode adds to the model (PPA's pose encoder and selectors)."""
    config = denoiser_config(path)
    with torch.device("meta"):
        plain = MultiViewWanTransformer(config).state_dict()
        moded = MultiViewWanTransformer(config.replace(**overrides)).state_dict()
    return {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in moded.items() if k not in plain}


def velocities(den, seed, refs) -> torch.Tensor:
    """The velocity at two steps; a cached mode's reference stream runs once for both (precompute_reference)."""
    gen = torch.Generator().manual_seed(seed)
    x = inputs(gen, refs=refs)
    if den.config.ref_attention == "prototype" and refs:
        b, _, f, h, w = x["latents"].shape
        x["frame_pose"] = torch.rand(b, f, 3, h, w, generator=gen) * 2 - 1
        x["ref_pose"] = torch.rand(b, refs, 3, h, w, generator=gen) * 2 - 1
    out = []
    with torch.no_grad():
        cache = None
        if den.config.caches_reference and refs:
            cache = den.precompute_reference(x["ref_latents"], x["text"], x["image_context"],
                                             tuple(x["latents"].shape[2:]))
            x["ref_latents"] = None
        for _ in range(2):
            x["latents"] = torch.randn(x["latents"].shape, generator=gen)
            x["timestep"] = torch.rand(x["timestep"].shape, generator=gen) * 1000
            out.append(den(**x, ref_cache=cache))
    return torch.stack(out)


def both(path, adapter, **kwargs):
    return (load_denoiser(path, adapter=adapter, ref_weights="shared", **kwargs),
            load_denoiser(path, adapter=adapter, ref_weights="merged", **kwargs))


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("convention", sorted(WRITERS))
@pytest.mark.parametrize("with_full", [False, True], ids=["lora_only", "with_full_tensors"])
def test_shared_equals_merged(wan_dir, tmp_path, mode, convention, with_full):
    path, _ = wan_dir
    gen = torch.Generator().manual_seed(1)
    shapes = block_shapes(path)
    tensors = full_reference_tensors(shapes, gen) if with_full else {}
    if mode.startswith("prototype"):
        tensors |= mode_tensors(path, MODES[mode], gen)
    adapter = WRITERS[convention](tmp_path / "a", lora_pairs(shapes, gen), tensors)
    shared, merged = both(path, adapter, **MODES[mode])
    assert shared.config.ref_weights == "shared" and merged.config.ref_weights == "merged"
    wrapped = [m for m in shared.ref_blocks.modules() if isinstance(m, LowRankLinear)]
    assert len(wrapped) == LAYERS * len(BLOCK_LINEARS) - with_full  # the fully given weight holds its LoRA merged
    for refs in (0, 2):
        got, want = velocities(shared, 3 + refs, refs), velocities(merged, 3 + refs, refs)
        assert rel_err(got, want) < 1e-5, refs
    plain = load_denoiser(path, **MODES[mode], **({"adapter": save_tensors(tmp_path, tensors)} if tensors else {}))
    assert rel_err(velocities(shared, 5, 2), velocities(plain, 5, 2)) > 1e-4  # the LoRA is applied


def save_tensors(tmp_path, tensors):
    save_file(tensors, tmp_path / "full.safetensors")
    return tmp_path / "full.safetensors"


def test_shared_stream_holds_the_video_weights_once(wan_dir, tmp_path):
    """No tensor is copied: each reference parameter is the video block's own object unless the adapter gives it,
    and the LoRA'd Linears act with the merged weight of the merged stream."""
    path, _ = wan_dir
    gen = torch.Generator().manual_seed(7)
    shapes = block_shapes(path)
    full = full_reference_tensors(shapes, gen)
    shared, merged = both(path, write_peft(tmp_path / "a", lora_pairs(shapes, gen), full))
    assert holds_shared_weights(shared) and not holds_shared_weights(merged)
    video = {id(p): name for name, p in shared.blocks.named_parameters()}
    for i, block in enumerate(shared.ref_blocks):
        for name, p in block.named_parameters(remove_duplicate=False):
            key = f"ref_blocks.{i}.{name}"
            assert (id(p) in video) == (key not in full and ".lora_" not in key), key
    for name, module in shared.ref_blocks.named_modules():
        if isinstance(module, LowRankLinear):
            torch.testing.assert_close(module.merged_weight(), merged.ref_blocks.get_submodule(name).weight,
                                       rtol=0, atol=1e-6)
    torch.testing.assert_close(shared.ref_blocks[1].attn1.to_q.weight, merged.ref_blocks[1].attn1.to_q.weight,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", ["video_full_tensor", "video_lora_pair", "base_lora"])
def test_a_video_stream_change_falls_back_to_merged_and_says_why(wan_dir, tmp_path, caplog, change):
    path, wan = wan_dir
    gen = torch.Generator().manual_seed(9)
    shapes = block_shapes(path)
    pairs, tensors, kwargs = lora_pairs(shapes, gen), {}, {}
    if change == "video_full_tensor":
        tensors["blocks.0.attn1.to_k.weight"] = torch.randn(shapes["blocks.0.attn1.to_k.weight"], generator=gen)
        words = "the adapter changes the video stream's ['blocks.0.attn1.to_k.weight']"
    elif change == "video_lora_pair":  # with blocks_lora "video" the pairs named blocks.N change the video stream
        words = "the adapter changes the video stream's ['blocks.0.attn1.to_k.weight', "
    else:
        base_lora = tmp_path / "base"
        base_lora.mkdir()
        kwargs["loras"] = [LoraSpec(write_diffusers(Writer(wan, seed=10), base_lora))]
        words = "merge into the video stream only (lora_reference is off)"
    adapter = write_peft(tmp_path / "a", pairs, tensors)
    if change == "video_lora_pair":
        (adapter / "mvgen_config.json").write_text(json.dumps({"blocks_lora": "video"}))
    caplog.set_level(logging.INFO, logger="mvgen.loading")
    den = load_denoiser(path, adapter=adapter, **kwargs)
    lines = [r.getMessage() for r in caplog.records if r.name == "mvgen.loading" and "ref_weights" in r.getMessage()]
    assert len(lines) == 1 and "reference stream is a merged copy" in lines[0] and words in lines[0], lines
    assert den.config.ref_weights == "merged" and not holds_shared_weights(den)
    want = load_denoiser(path, adapter=adapter, ref_weights="merged", **kwargs)
    assert rel_err(velocities(den, 11, 2), velocities(want, 11, 2)) == 0


def test_base_lora_on_both_streams_shares(wan_dir, tmp_path, caplog):
    """``lora_reference``: the base LoRA merged into the video stream is in the shared reference stream too, and
    merges into the reference stream's own tensors (here a whole projection weight) as the merged load does."""
    path, wan = wan_dir
    gen = torch.Generator().manual_seed(12)
    shapes = block_shapes(path)
    adapter = write_peft(tmp_path / "a", lora_pairs(shapes, gen), full_reference_tensors(shapes, gen))
    base_lora = tmp_path / "base"
    base_lora.mkdir()
    spec = LoraSpec(write_diffusers(Writer(wan, seed=13), base_lora), 0.7)
    caplog.set_level(logging.INFO, logger="mvgen.loading")
    shared, merged = both(path, adapter, loras=[spec], lora_reference=True)
    assert "merged copy" not in caplog.text and holds_shared_weights(shared)
    torch.testing.assert_close(shared.ref_blocks[1].attn1.to_q.weight, merged.ref_blocks[1].attn1.to_q.weight,
                               rtol=0, atol=1e-6)
    for refs in (0, 2):
        assert rel_err(velocities(shared, 14, refs), velocities(merged, 14, refs)) < 1e-5


def test_no_adapter_shares_everything(wan_dir):
    path, _ = wan_dir
    shared = load_denoiser(path)
    video = dict(shared.blocks.named_parameters(remove_duplicate=False))
    assert all(p is video[name] for name, p in shared.ref_blocks.named_parameters(remove_duplicate=False))
    for refs in (0, 2):
        assert rel_err(velocities(shared, 15, refs), velocities(load_denoiser(path, ref_weights="merged"), 15,
                                                                    refs)) == 0


def test_export_traces_a_merged_reference_stream(wan_dir, tmp_path):
    """What the ONNX export traces: plain Linears with the merged weights, own tensors, the shared model back after."""
    path, _ = wan_dir
    gen = torch.Generator().manual_seed(16)
    shared, merged = both(path, write_peft(tmp_path / "a", lora_pairs(block_shapes(path), gen), {}))
    before = velocities(shared, 17, 2)
    with merged_reference_stream(shared) as model:
        assert not holds_shared_weights(model)
        assert model.ref_blocks.state_dict().keys() == merged.ref_blocks.state_dict().keys()
        assert rel_err(velocities(model, 17, 2), velocities(merged, 17, 2)) < 1e-5
    assert holds_shared_weights(shared) and torch.equal(velocities(shared, 17, 2), before)


# ---- memory --------------------------------------------------------------------------------------------------
WIDE_64 = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=256, added_kv_proj_dim=64)


def test_parameter_bytes_of_a_64_wide_model(tmp_path, record_property):
    """Rank 4 on every block linear of a 64-wide model: the shared model holds the base's bytes plus A and B
    exactly (a rank-4 pair is 12.5% of a 64 x 64 weight, so the ratio is ~1.08 here, ~1.02 at Wan 14B's widths:
    below); the merged model ~1.7x (the blocks twice)."""
    wan = make_wan(seed=20, **WIDE_64)
    wan.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    gen = torch.Generator().manual_seed(21)
    shapes = block_shapes(tmp_path)
    pairs = lora_pairs(shapes, gen)
    adapter = write_peft(tmp_path / "a", pairs, {})
    shared, merged = both(tmp_path, adapter)
    base = weight_bytes(wan)
    lora = sum(a.nbytes + b.nbytes for a, b in pairs.values())
    assert weight_bytes(shared) == base + lora + shared.view_logit_scales.nbytes
    blocks = sum(t.nbytes for k, t in wan.state_dict().items() if k.startswith("blocks."))
    assert weight_bytes(merged) == base + blocks + merged.view_logit_scales.nbytes
    ratios = weight_bytes(shared) / base, weight_bytes(merged) / base
    record_property("ratios_shared_merged", ratios)
    assert ratios[0] < 1.09 and ratios[1] > 1.6, ratios


def test_wan14b_with_a_rank64_lora_holds_at_most_1_05x_the_base():
    """Wan2.1-I2V-14B (the config's defaults), rank 64 on every block linear, built on the meta device as
    ``load_denoiser`` builds it: ~1.02x the base model's parameters shared, ~1.99x merged."""
    config = MvgenConfig()
    with torch.device("meta"):
        base = sum(p.numel() for p in WanTransformer3DModel(**config.wan_dict()).parameters())
        merged = sum(p.numel() for p in MultiViewWanTransformer(config).parameters())
        model = MultiViewWanTransformer(config)
        wrap_low_rank(model, {f"ref_blocks.{i}.{m}": (64, 1.0) for i in range(config.num_layers)
                              for m in BLOCK_LINEARS})
    share_reference_stream(model)
    shared = sum(p.numel() for p in model.parameters())
    assert shared / base <= 1.05 and merged / base > 1.85, (shared / base, merged / base)


def test_the_export_loads_a_merged_reference_stream(wan_dir, tmp_path):
    """The ONNX graph (and so a TensorRT refit) holds whole merged reference weights: ``export.onnx_export``."""
    from export.onnx_export import load_for_export

    path, _ = wan_dir
    adapter = write_peft(tmp_path / "a", lora_pairs(block_shapes(path), torch.Generator().manual_seed(18)), {})
    den, _ = load_for_export(path, adapter, "fp32", None, None, 0, None, {})
    assert den.config.ref_weights == "merged" and not holds_shared_weights(den)
    with pytest.raises(ValueError, match="merges the reference stream .* got ref_weights='shared'"):
        load_for_export(path, adapter, "fp32", None, None, 0, None, {"ref_weights": "shared"})


def test_ref_weights_is_a_config_choice(wan_dir, tmp_path):
    """``ref_weights`` comes from mvgen_config.json or an override (``--set ref_weights=merged``), validated once."""
    with pytest.raises(ValueError, match=r"ref_weights must be one of \('shared', 'merged'\), got 'copy'"):
        MvgenConfig(ref_weights="copy")
    path, _ = wan_dir
    adapter = write_peft(tmp_path / "a", lora_pairs(block_shapes(path), torch.Generator().manual_seed(19)), {})
    (adapter / "mvgen_config.json").write_text(json.dumps({"ref_weights": "merged"}))
    assert not holds_shared_weights(load_denoiser(path, adapter=adapter))
    assert holds_shared_weights(load_denoiser(path, adapter=adapter, ref_weights="shared"))
