"""Where a denoiser's weights come from, end to end: base-model LoRAs merged at load (diffusers' fused pipeline as
the oracle), single-file transformers next to the diffusers layout, per-expert sources on Wan2.2, the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.adapters.base_lora import LoraSpec
from engine.checkpoint import Checkpoint
from engine.runtime.denoiser import load_expert
from engine.backbones.registry import load_denoiser
from engine.pipeline import MultiViewPipeline
from engine.tiny import TINY_VERSION, ensure_tiny

from .original_wan import to_original_wan
from .test_base_lora import Writer, lightx2v_tensors

MVGEN = str(Path(sys.executable).parent / "mvgen")
SIZE = dict(num_frames=9, height=64, width=64)


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return tiny_cache / TINY_VERSION


@pytest.fixture(scope="module")
def distill_lora(tiny, tmp_path_factory):
    """A LightX2V-style distillation LoRA (ComfyUI pairs + alphas, bias and head deltas) for the tiny model."""
    from diffusers import WanTransformer3DModel

    path = tmp_path_factory.mktemp("lora") / "lightx2v_tiny.safetensors"
    save_file(lightx2v_tensors(Writer(WanTransformer3DModel.from_pretrained(tiny / "transformer"), seed=11)), path)
    return path


@pytest.fixture(scope="module")
def single_file(tiny, tmp_path_factory):
    """The tiny transformer as one ComfyUI-style file (original Wan names under ``model.diffusion_model.``)."""
    from diffusers import WanTransformer3DModel

    state = WanTransformer3DModel.from_pretrained(tiny / "transformer").state_dict()
    path = tmp_path_factory.mktemp("single") / "wan2.1_i2v_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in to_original_wan(state).items()}, path)
    return path


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_a_distillation_lora_at_4_steps_equals_diffusers_fused(tiny, distill_lora):
    from diffusers import WanImageToVideoPipeline

    frame = _frame(1)
    ours = MultiViewPipeline.from_pretrained(tiny, loras=[f"{distill_lora}:0.7"])(
        frame, [], "a person turns", seed=2, steps=4, guidance_scale=1.0, **SIZE)
    oracle = WanImageToVideoPipeline.from_pretrained(tiny)
    oracle.set_progress_bar_config(disable=True)
    oracle.load_lora_weights(str(distill_lora), adapter_name="distill")
    oracle.set_adapters(["distill"], [0.7])
    oracle.fuse_lora(components=["transformer"])
    oracle.unload_lora_weights()
    want = oracle(image=Image.fromarray(frame), prompt="a person turns", height=64, width=64, num_frames=9,
                  num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(2),
                  output_type="np").frames[0]
    plain = MultiViewPipeline.from_pretrained(tiny)(frame, [], "a person turns", seed=2, steps=4,
                                                    guidance_scale=1.0, **SIZE)
    assert np.abs(ours.astype(int) - np.round(want * 255)).max() <= 1
    assert np.abs(ours.astype(int) - plain.astype(int)).max() > 1  # the LoRA changed the video


def test_the_reference_stream_takes_the_base_lora_only_when_asked(tiny, distill_lora):
    spec = [LoraSpec(distill_lora)]
    plain = load_denoiser(tiny)
    merged = load_denoiser(tiny, loras=spec)
    shared = load_denoiser(tiny, loras=spec, lora_reference=True)
    for name, weight in merged.blocks.state_dict().items():
        torch.testing.assert_close(shared.ref_blocks.state_dict()[name], weight, rtol=0, atol=0)
        torch.testing.assert_close(merged.ref_blocks.state_dict()[name], plain.blocks.state_dict()[name],
                                   rtol=0, atol=0)
    assert not torch.equal(merged.blocks[0].attn1.to_q.weight, plain.blocks[0].attn1.to_q.weight)


def test_a_single_file_transformer_loads_the_same_weights(tiny, single_file):
    want = load_denoiser(tiny).state_dict()
    got = load_denoiser(tiny, weights_file=single_file).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_wan22_sources_are_per_expert(tiny_cache, tmp_path):
    from diffusers import WanTransformer3DModel

    wan22 = ensure_tiny(tiny_cache, "tiny-wan22")
    lora = tmp_path / "low_noise.safetensors"
    save_file(lightx2v_tensors(Writer(WanTransformer3DModel.from_pretrained(wan22 / "transformer_2"), seed=3)), lora)
    plain = Checkpoint.load("tiny-wan22", cache_root=tiny_cache)
    styled = Checkpoint.load("tiny-wan22", cache_root=tiny_cache, loras_2=[str(lora)])
    assert styled.experts[1].loras == (LoraSpec(lora),) and styled.experts[0].loras == ()
    q = lambda checkpoint, expert: load_expert(checkpoint, expert).blocks[0].attn1.to_q.weight  # noqa: E731
    assert torch.equal(q(styled, 0), q(plain, 0)) and not torch.equal(q(styled, 1), q(plain, 1))


def _generate(tiny_cache, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    Image.fromarray(_frame(4)).save(tmp_path / "first.png")
    command = [MVGEN, "--cache-dir", str(tiny_cache), "generate", "--model", "tiny", "--device", "cpu",
               "--dtype", "float32",
               "--first-frame", str(tmp_path / "first.png"), "--prompt", "a person turns", "--steps", "4",
               "--guidance-scale", "1", "--seed", "5", *flags, "--out", str(tmp_path / "v.mp4")]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_runs_a_single_file_with_a_distillation_lora(tiny_cache, tmp_path, single_file, distill_lora):
    done = _generate(tiny_cache, tmp_path, "--transformer", str(single_file), "--lora", f"{distill_lora}:0.7")
    assert done.returncode == 0, done.stderr[-3000:]
    api = MultiViewPipeline.from_pretrained("tiny", cache_root=tiny_cache, loras=[f"{distill_lora}:0.7"])(
        _frame(4), [], "a person turns", steps=4, guidance_scale=1.0, seed=5)
    from engine.media import contact_sheet

    assert np.array_equal(np.asarray(Image.open(tmp_path / "v.png").convert("RGB")), contact_sheet(api))


@pytest.mark.slow
def test_cli_refuses_a_lora_with_keys_it_cannot_apply(tiny_cache, tmp_path):
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 48),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(48, 2),
               "diffusion_model.blocks.0.mystery.diff_m": torch.ones(48)}, tmp_path / "odd.safetensors")
    done = _generate(tiny_cache, tmp_path, "--lora", str(tmp_path / "odd.safetensors"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mvgen: error: ") and "blocks.0.mystery.diff_m" in lines[0]
