"""The MMDiT denoiser (engine.backbones.mmdit.model) against diffusers' HunyuanVideoTransformer3DModel, the oracle we did not write:
the base without references, and MVI2V's reference stream with a zero LoRA against references appended as frames."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from safetensors.torch import save_file

from engine.backbones.registry import load_denoiser
from engine.backbones.mmdit.model import MultiViewMMDiT

from .conftest import PARITY_RTOL, rel_err

SMALL_MMDIT = dict(
    in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=24, num_layers=2, num_single_layers=2,
    num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=False,
    text_embed_dim=20, pooled_projection_dim=12, rope_theta=256.0, rope_axes_dim=(8, 8, 8),
    image_condition_type="latent_concat",
)
TASKS = {"i2v": {}, "t2v": dict(in_channels=16, image_condition_type=None)}
SHAPES = [(1, 4, 6), (3, 6, 10), (2, 8, 4)]  # latent (frames, height, width): awkward, non-square, held out
TEXT_LEN = 13
REF_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
REF_SINGLE_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def make_hunyuan(seed: int, **changes) -> HunyuanVideoTransformer3DModel:
    """A diffusers HunyuanVideo transformer with every weight random and non-trivial (norm weights included)."""
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**{**SMALL_MMDIT, **changes}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module", params=list(TASKS))
def mmdit_dir(request, tmp_path_factory):
    """(path, task, diffusers model) of a sharded save_pretrained folder with ``transformer/``."""
    root = tmp_path_factory.mktemp(f"mmdit_{request.param}")
    model = make_hunyuan(3, **TASKS[request.param])
    model.save_pretrained(root / "transformer", safe_serialization=True, max_shard_size="60KB")
    return root, request.param, model


def mmdit_inputs(seed: int, task: str, frames: int, height: int, width: int, refs: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.zeros(batch, TEXT_LEN)
    for row, length in enumerate([TEXT_LEN, 5, 9][:batch]):  # a full prompt and shorter ones: padding masked
        text_mask[row, :length] = 1
    condition = None
    if task == "i2v":
        first = torch.randn(batch, 16, 1, height, width, generator=g)
        condition = torch.cat([torch.cat([first, torch.zeros(batch, 16, frames - 1, height, width)], dim=2),
                               torch.cat([torch.ones(batch, 1, 1, height, width),
                                          torch.zeros(batch, 1, frames - 1, height, width)], dim=2)], dim=1)
    return dict(
        latents=torch.randn(batch, 16, frames, height, width, generator=g), condition=condition,
        timestep=torch.tensor([937.0, 211.0, 500.0][:batch]),
        text=torch.randn(batch, TEXT_LEN, SMALL_MMDIT["text_embed_dim"], generator=g), text_mask=text_mask,
        pooled_text=torch.randn(batch, SMALL_MMDIT["pooled_projection_dim"], generator=g),
        ref_latents=torch.randn(batch, refs, 16, height, width, generator=g),
    )


def diffusers_velocity(model, x, ref_latents=None):
    """diffusers on the video, optionally with references appended as fully known frames (I2V: latent, first-frame
    condition = itself, mask 1; T2V: the clean latents as further frames)."""
    latents, condition = x["latents"], x["condition"]
    if ref_latents is not None:
        refs = ref_latents.transpose(1, 2)  # [B, 16, R, H, W]
        latents = torch.cat([latents, refs], dim=2)
        if condition is not None:
            condition = torch.cat([condition, torch.cat([refs, torch.ones_like(refs[:, :1])], dim=1)], dim=2)
    hidden = latents if condition is None else torch.cat([latents, condition], dim=1)
    out = model(hidden, x["timestep"], x["text"], x["text_mask"], x["pooled_text"], return_dict=False)[0]
    return out[:, :, : x["latents"].shape[2]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ref_mode", ["dual_stream", "token_concat"])
@pytest.mark.parametrize("no_refs", ["none", "empty"])
def test_without_references_equals_hunyuan_video(mmdit_dir, shape, ref_mode, no_refs):
    path, task, model = mmdit_dir
    den = load_denoiser(path, ref_mode=ref_mode)
    assert isinstance(den, MultiViewMMDiT) and den.config.task == task
    x = mmdit_inputs(11 + sum(shape), task, *shape)
    with torch.no_grad():
        want = diffusers_velocity(model, x)
        refs = x.pop("ref_latents")
        got = den(**x, ref_latents=None if no_refs == "none" else refs)
    assert got.shape == want.shape
    assert rel_err(got, want) < PARITY_RTOL


def zero_lora_adapter(folder, config: dict, seed: int, scale_b: float = 0.0):
    """A rank-4 PEFT-named LoRA on every linear of the reference stream; B = 0 (a fresh LoRA) unless ``scale_b``."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = int(dim * config["mlp_ratio"])
    shapes = {"ff.net.0.proj": (ffn, dim), "ff.net.2": (dim, ffn), "proj_mlp": (ffn, dim), "proj_out": (dim, dim + ffn)}
    tensors = {}
    for prefix, count, modules in (("ref_blocks", config["num_layers"], REF_MODULES),
                                   ("ref_single_blocks", config["num_single_layers"], REF_SINGLE_MODULES)):
        for i in range(count):
            for module in modules:
                out_dim, in_dim = shapes.get(module, (dim, dim))
                key = f"transformer.{prefix}.{i}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(4, in_dim, generator=g) / in_dim**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, 4, generator=g) * scale_b
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "mvgen_config.json").write_text(json.dumps({"lora_rank": 4, "lora_alpha": 4}))
    return folder


@pytest.mark.parametrize("num_refs", [1, 3])
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("ref_mode", ["dual_stream", "token_concat"])
def test_zero_lora_reference_stream_equals_hunyuan_video_with_appended_frames(mmdit_dir, tmp_path, num_refs, shape,
                                                                               ref_mode):
    path, task, model = mmdit_dir
    adapter = zero_lora_adapter(tmp_path / "adapter", SMALL_MMDIT, 5) if ref_mode == "dual_stream" else None
    den = load_denoiser(path, adapter, ref_mode=ref_mode, ref_rope="shared", ref_timestep="shared",
                        ref_attention="full")
    x = mmdit_inputs(23 + num_refs, task, *shape, refs=num_refs)
    with torch.no_grad():
        want = diffusers_velocity(model, x, x["ref_latents"])
        got = den(**x)
        without = den(**{**x, "ref_latents": None})
    assert rel_err(got, want) < PARITY_RTOL
    assert rel_err(without, want) > 1e-3  # the references reach the video (the check above is not vacuous)


def test_lora_changes_only_the_reference_stream_by_its_delta(mmdit_dir, tmp_path):
    path, task, model = mmdit_dir
    adapter = zero_lora_adapter(tmp_path / "adapter", SMALL_MMDIT, 9, scale_b=0.1)
    den = load_denoiser(path, adapter, ref_weights="merged")  # the merged copy's weights, inspected
    plain = load_denoiser(path)
    state, base = den.state_dict(), model.state_dict()
    from safetensors.torch import load_file
    pairs = load_file(adapter / "adapter_model.safetensors")
    key = "ref_single_blocks.1.proj_out"
    want = base["single_transformer_blocks.1.proj_out.weight"] + (
        pairs[f"transformer.{key}.lora_B.weight"] @ pairs[f"transformer.{key}.lora_A.weight"])  # alpha 4 / rank 4
    torch.testing.assert_close(state[f"{key}.weight"], want, rtol=1e-6, atol=1e-6)
    for name, value in base.items():  # the video and text streams are the base's own
        assert torch.equal(state[name], value), name
    x = mmdit_inputs(31, task, 2, 4, 6, refs=2)
    with torch.no_grad():
        assert rel_err(den(**x), plain(**x)) > 1e-3
        assert torch.equal(den(**{**x, "ref_latents": None}), plain(**{**x, "ref_latents": None}))


@pytest.mark.parametrize("mask", ["full", "isolated"])
@pytest.mark.parametrize("ref_rope", ["decoupled", "none"])
def test_reference_modes_and_batch_rows(mmdit_dir, tmp_path, mask, ref_rope):
    """Each row of a batch equals that row alone (rows of different prompt lengths never interact), and under
    ``isolated`` the video still reads the references while the references read nothing of the video."""
    path, task, _ = mmdit_dir
    den = load_denoiser(path, zero_lora_adapter(tmp_path / "a", SMALL_MMDIT, 3, scale_b=0.1), ref_attention=mask,
                        ref_rope=ref_rope)
    x = mmdit_inputs(41, task, 2, 4, 6, refs=2, batch=3)
    with torch.no_grad():
        batched = den(**x)
        for row in range(3):
            alone = den(**{k: v[row:row + 1] if v is not None else None for k, v in x.items()})
            assert rel_err(alone, batched[row:row + 1]) < 1e-5
        assert rel_err(batched, den(**{**x, "ref_latents": None})) > 1e-3


def test_wan_only_inputs_and_options_are_refused(mmdit_dir):
    path, task, _ = mmdit_dir
    den = load_denoiser(path)
    x = mmdit_inputs(1, task, 1, 4, 4)
    with pytest.raises(ValueError, match="image_context is not an input of the MMDiT"):
        den(**x, image_context=torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="text_mask"):
        den(**{**x, "text_mask": None})
    with pytest.raises(ValueError, match="not implemented on the MMDiT"):  # M2HVideo: no cross-attention to fuse with
        load_denoiser(path, identity=True)
    from engine.runtime.parallel import Collectives, SequenceParallel

    with pytest.raises(ValueError, match="divisible by sp; this model has 2 heads"):
        den.parallelize(SequenceParallel(Collectives(None, 0, 3)))


@pytest.mark.parametrize("ref_rope", ["decoupled", "shared"])
@pytest.mark.parametrize("num_refs", [1, 3])
def test_reference_cache_equals_recomputation(mmdit_dir, tmp_path, ref_rope, num_refs):
    """``isolated`` + ``zero``: the reference stream's per-layer K/V, built once from the references and the pooled
    prompt, give every step the velocity of the stream recomputed in the call; the cache is of the call's rows
    (the prompt reaches the references through their timestep embedding) and of its video grid."""
    path, task, _ = mmdit_dir
    den = load_denoiser(path, zero_lora_adapter(tmp_path / "a", SMALL_MMDIT, 4, scale_b=0.1),
                        ref_attention="isolated", ref_timestep="zero", ref_rope=ref_rope)
    assert den.config.caches_reference
    x = mmdit_inputs(53 + num_refs, task, 3, 4, 6, refs=num_refs, batch=3)
    with torch.no_grad():
        cache = den.precompute_reference(x["ref_latents"], x["text"], None, (3, 4, 6), text_mask=x["text_mask"],
                                         pooled_text=x["pooled_text"])
        layers = SMALL_MMDIT["num_layers"] + SMALL_MMDIT["num_single_layers"]
        assert len(cache.keys) == len(cache.values) == layers and cache.rows == 3
        for step, t in enumerate((937.0, 400.0)):  # one cache, every step
            call = {**x, "timestep": torch.full((3,), t), "latents": x["latents"] * (1 + step)}
            want = den(**call)
            got = den(**{**call, "ref_latents": None}, ref_cache=cache)
            assert rel_err(got, want) < 1e-5
        assert rel_err(want, den(**{**call, "ref_latents": None})) > 1e-3  # the references reach the video
        with pytest.raises(ValueError, match="video grid"):
            den(**{**mmdit_inputs(1, task, 2, 4, 6, batch=3), "ref_latents": None}, ref_cache=cache)
    with pytest.raises(ValueError, match="needs pooled_text"):
        den.precompute_reference(x["ref_latents"], x["text"], None, (3, 4, 6))


def test_hunyuan_video_with_a_rank64_lora_holds_at_most_1_05x_the_base():
    """HunyuanVideo's widths (diffusers' defaults: 20 dual + 40 single blocks of 24 x 128), rank 64 on every
    reference linear the adapter trains (``engine.tiny.MMDIT_ADAPTER_MODULES``), built on the meta device as
    ``load_mmdit`` builds it: the shared stream holds the video stream's weights plus the pairs (1.016x), a merged
    one a copy of every block's video modules (1.707x; the text stream's modules are not copied)."""
    from diffusers import HunyuanVideoTransformer3DModel

    from engine.adapters.reference_weights import share_reference_stream, wrap_low_rank
    from engine.backbones.families import MMDIT
    from engine.config import MvgenConfig
    from engine.tiny import MMDIT_ADAPTER_MODULES

    config = MvgenConfig.from_dict(MMDIT.config_values({"guidance_embeds": False}))  # HunyuanVideo-I2V: true CFG
    with torch.device("meta"):
        base = sum(p.numel() for p in HunyuanVideoTransformer3DModel(**config.mmdit_dict()).parameters())
        merged = sum(p.numel() for p in MultiViewMMDiT(config).parameters())
        model = MultiViewMMDiT(config)
        counts = {"ref_blocks": config.num_layers, "ref_single_blocks": config.num_single_layers}
        wrap_low_rank(model, {f"{blocks}.{i}.{m}": (64, 1.0) for blocks, modules in MMDIT_ADAPTER_MODULES.items()
                              for i in range(counts[blocks]) for m in modules})
    share_reference_stream(model)
    shared = sum(p.numel() for p in model.parameters())
    print(f"\nHunyuanVideo {base / 1e9:.2f} B parameters: shared reference stream {shared / base:.3f}x, merged "
          f"{merged / base:.3f}x")
    assert shared / base <= 1.05 and merged / base > 1.65, (shared / base, merged / base)


@pytest.mark.parametrize("ref_attention", ["full", "isolated"])
def test_shared_reference_stream_equals_the_merged_copy(mmdit_dir, tmp_path, ref_attention):
    """The default (``ref_weights="shared"``): the reference modules hold the video modules' tensors themselves and
    apply the adapter's pairs unmerged; the velocity is the merged copy's within float32 rounding."""
    from engine.adapters.reference_weights import holds_shared_weights, weight_bytes

    path, task, _ = mmdit_dir
    adapter = zero_lora_adapter(tmp_path / "adapter", SMALL_MMDIT, 13, scale_b=0.1)
    shared = load_denoiser(path, adapter, ref_attention=ref_attention)
    merged = load_denoiser(path, adapter, ref_attention=ref_attention, ref_weights="merged")
    assert shared.config.ref_weights == "shared" and holds_shared_weights(shared)
    assert merged.config.ref_weights == "merged" and not holds_shared_weights(merged)
    assert weight_bytes(shared) < 0.75 * weight_bytes(merged)
    x = mmdit_inputs(61, task, 2, 4, 6, refs=2)
    with torch.no_grad():
        got, want = shared(**x), merged(**x)
        assert rel_err(got, want) < PARITY_RTOL
        assert rel_err(got, shared(**{**x, "ref_latents": None})) > 1e-3


def test_step_cache_reuses_the_video_residual_on_redundant_steps(mmdit_dir):
    """TeaCache (``engine.runtime.step_cache``) on the MMDiT: the first dual-stream block's modulated video input
    decides; a computed step is the plain forward bit for bit, a skipped one adds the last residual of the video
    tokens, near the plain forward while the input barely moves."""
    from engine.runtime.step_cache import StepCache

    path, task, _ = mmdit_dir
    den = load_denoiser(path)
    x = mmdit_inputs(71, task, 2, 4, 6, refs=1)
    cache, skipped = StepCache(0.2), []
    with torch.no_grad():
        for i, t in enumerate((990.0, 985.0, 980.0, 600.0)):
            call = {**x, "timestep": torch.full((2,), t), "latents": x["latents"] * (1 + 0.01 * i)}
            before = cache.skipped
            got, plain = den(**call, step_cache=cache), den(**call)
            skipped.append(cache.skipped > before)
            if skipped[-1]:
                assert 0 < rel_err(got, plain) < 0.25  # random weights move more per step than trained ones
            else:
                assert torch.equal(got, plain)
    assert not skipped[0] and any(skipped) and not all(skipped[1:]), skipped
