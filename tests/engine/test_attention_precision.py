"""``attention_precision="int8"`` through the whole tiny denoiser (the 8-bit joint attention's CPU path, the float64
reference of ``kernels.quantized_attention``): the velocity of every step and the final latent of a short flow-matching
generation against float32 attention, beside the bf16 denoiser's own error; and the switch from the command line to
the config."""
from __future__ import annotations

import argparse

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from engine.backbones.registry import load_denoiser
from engine.cli_args import add_memory_arguments, add_step_cache_argument, config_flag_overrides
from engine.config import MvgenConfig

from .conftest import SMALL_WAN, inputs, rel_err

STEPS = 6


def _generate(denoiser, x: dict, dtype: torch.dtype, teacher: list[torch.Tensor] | None = None):
    """(final latents, velocity of each step) of an Euler flow-matching generation from x's latents; with
    ``teacher`` (latents per step of another run) each step's velocity is taken at the teacher's latents."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    latents, velocities, visited = x["latents"].to(dtype), [], []
    cast = {k: v.to(dtype) if v is not None and v.is_floating_point() and k != "timestep" else v for k, v in x.items()}
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            at = latents if teacher is None else teacher[i].to(dtype)
            visited.append(at)
            velocity = denoiser(**dict(cast, latents=at, timestep=t.expand(at.shape[0])))
            velocities.append(velocity.float())
            latents = scheduler.step(velocity, t, latents).prev_sample
    return latents.float(), velocities, visited


@pytest.fixture(scope="module")
def runs(wan_dir):
    """float32 (the oracle), int8 attention in the float32 denoiser, bf16 denoiser, int8 attention in the bf16
    denoiser: (final latents, velocities per step on the float32 trajectory)."""
    path, _ = wan_dir
    x = inputs(torch.Generator().manual_seed(21), refs=2)
    out = {}
    fp32 = load_denoiser(path)
    final, velocities, trajectory = _generate(fp32, x, torch.float32)
    out["fp32"] = (final, velocities)
    bf16 = load_denoiser(path, dtype=torch.bfloat16)
    for name, denoiser, dtype in (("int8", fp32, torch.float32), ("bf16", bf16, torch.bfloat16),
                                  ("bf16+int8", bf16, torch.bfloat16)):
        if name.endswith("int8"):
            denoiser.config = denoiser.config.replace(attention_precision="int8")
        final, _, _ = _generate(denoiser, x, dtype)
        _, velocities, _ = _generate(denoiser, x, dtype, teacher=trajectory)
        out[name] = (final, velocities)
    return out


# relative errors against float32 attention (AMD EPYC, torch 2.13), per-step velocity / final latent, measured:
# int8 attention in the float32 denoiser 0.00080-0.00088 / 0.00026; the bf16 denoiser 0.0052-0.0057 / 0.0045; int8
# attention in the bf16 denoiser 0.0054-0.0057 / 0.0045 (bf16's rounding dominates)
BOUNDS = {"int8": (0.0015, 0.0006), "bf16": (0.009, 0.008), "bf16+int8": (0.009, 0.008)}


@pytest.mark.parametrize("name", list(BOUNDS))
def test_velocity_and_final_latent_track_float32(runs, name):
    want_final, want_velocities = runs["fp32"]
    final, velocities = runs[name]
    per_step = [rel_err(v, w) for v, w in zip(velocities, want_velocities)]
    step_bound, final_bound = BOUNDS[name]
    assert max(per_step) < step_bound, per_step
    assert rel_err(final, want_final) < final_bound
    assert min(per_step) > 1e-4  # the switch took effect: not float32 attention bit for bit


def test_int8_attention_changes_only_the_attention(runs):
    """int8 in the float32 denoiser is a smaller change than the bf16 denoiser's rounding everywhere."""
    want_final, _ = runs["fp32"]
    assert rel_err(runs["int8"][0], want_final) < rel_err(runs["bf16"][0], want_final)


def test_flag_reaches_the_config():
    parser = argparse.ArgumentParser()
    add_memory_arguments(parser)
    add_step_cache_argument(parser)  # config_flag_overrides reads every config flag
    assert config_flag_overrides(parser.parse_args([]), {}).get("attention_precision") is None
    overrides = config_flag_overrides(parser.parse_args(["--attention-precision", "int8"]), {})
    assert MvgenConfig.from_dict(SMALL_WAN, **overrides).attention_precision == "int8"
    explicit = config_flag_overrides(parser.parse_args(["--attention-precision", "int8"]),
                                     {"attention_precision": "bf16"})
    assert explicit["attention_precision"] == "bf16"  # --set wins
    assert MvgenConfig.from_dict(SMALL_WAN).attention_precision == "bf16"  # off by default
    assert "attention_precision" in MvgenConfig.from_dict(SMALL_WAN).to_dict()  # what exports record
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-precision", "fp4"])


def test_bad_value_is_one_line():
    with pytest.raises(ValueError, match="attention_precision") as err:
        MvgenConfig.from_dict(SMALL_WAN, attention_precision="fp4")
    assert "\n" not in str(err.value) and "int8" in str(err.value)


@pytest.mark.parametrize("ref_attention", ["full", "isolated"])
def test_mmdit_triple_stream(tmp_path, ref_attention):
    """HunyuanVideo's [video | reference | text] streams with the text's padding masked by key lengths: int8 attention
    against float32 attention on one step."""
    from .test_mmdit import make_hunyuan, mmdit_inputs

    make_hunyuan(5, in_channels=16, image_condition_type=None).save_pretrained(tmp_path / "transformer",
                                                                               safe_serialization=True)
    denoiser = load_denoiser(tmp_path, ref_attention=ref_attention)
    x = mmdit_inputs(17, "t2v", 2, 6, 8, refs=2)
    with torch.no_grad():
        want = denoiser(**x)
        denoiser.config = denoiser.config.replace(attention_precision="int8")
        got = denoiser(**x)
    assert 1e-4 < rel_err(got, want) < 0.003  # measured 0.0017 (full), 0.0016 (isolated)
