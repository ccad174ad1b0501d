"""The MMDiT family's (HunyuanVideo's) parts against diffusers' own code: the embedded ``tiny-mmdit`` build, the text
encoders (``HunyuanVideoPipeline.encode_prompt``), the VAE's I2V condition and the loop's first latents
(``HunyuanVideoImageToVideoPipeline.prepare_latents``), the scheduler and the denoiser's declared inputs."""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline,
                       HunyuanVideoPipeline, HunyuanVideoTransformer3DModel)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from diffusers.video_processor import VideoProcessor
from PIL import Image

from engine import generation
from engine.checkpoint import Checkpoint
from engine.files import quiet_hub_progress
from engine.denoiser_io import config_specs, text_outputs
from engine.backbones.mmdit.components import MMDiTTextEncoder, MMDiTVae, prompt_template
from engine.pipeline import LocalStages
from engine.request import make_request
from engine.tiny import VARIANTS, build_tiny, ensure_tiny

PROMPTS = ["a cat", "a person in a red jacket turns around slowly, showing the embroidered back of the jacket"]


@pytest.fixture(scope="module")
def mmdit(tiny_cache):
    """The tiny-mmdit checkpoint (built under the session's cache root), its text encoder and VAE."""
    ensure_tiny(tiny_cache, "tiny-mmdit")
    checkpoint = Checkpoint.load("tiny-mmdit", cache_root=tiny_cache)
    return SimpleNamespace(checkpoint=checkpoint, text=MMDiTTextEncoder(checkpoint), vae=MMDiTVae(checkpoint))


@pytest.fixture(scope="module")
def diffusers_pipe(mmdit):
    """diffusers' own HunyuanVideoPipeline loaded from the directory (the oracle's components)."""
    with quiet_hub_progress():
        return HunyuanVideoPipeline.from_pretrained(mmdit.checkpoint.path)


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _frame(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_build_is_bit_identical_and_diffusers_loads_it(mmdit, diffusers_pipe, tmp_path):
    path = mmdit.checkpoint.path
    assert path.name == VARIANTS["tiny-mmdit"].directory
    assert _digests(path) == _digests(build_tiny(tmp_path / "again", "tiny-mmdit"))
    shards = set(json.loads((path / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
                 ["weight_map"].values())
    assert len(shards) > 1
    transformer = diffusers_pipe.transformer
    assert isinstance(transformer, HunyuanVideoTransformer3DModel)
    assert (transformer.config.in_channels, transformer.config.image_condition_type) == (33, "latent_concat")
    assert isinstance(diffusers_pipe.vae, AutoencoderKLHunyuanVideo)
    assert (diffusers_pipe.vae_scale_factor_temporal, diffusers_pipe.vae_scale_factor_spatial) == (4, 8)
    assert isinstance(diffusers_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert diffusers_pipe.scheduler.config.shift == 7.0
    assert len(diffusers_pipe.tokenizer) <= diffusers_pipe.text_encoder.config.vocab_size
    assert diffusers_pipe.text_encoder_2.config.eos_token_id == diffusers_pipe.tokenizer_2.eos_token_id


def test_bundled_adapter_is_a_peft_lora_on_the_reference_blocks(mmdit):
    """Rank-4 PEFT pairs on each reference block's attention and FFN linears (read as safetensors: engine.adapters.lora's
    reader knows Wan's block names only)."""
    from safetensors.torch import load_file

    tensors = load_file(mmdit.checkpoint.path / "adapter" / "adapter_model.safetensors")
    cfg, dim = mmdit.checkpoint.config, mmdit.checkpoint.config.inner_dim
    assert len(tensors) == 2 * (cfg.num_layers * 6 + cfg.num_single_layers * 5)
    assert tensors["transformer.ref_blocks.1.ff.net.2.lora_A.weight"].shape == (4, cfg.ffn_dim)
    assert tensors["transformer.ref_single_blocks.1.proj_out.lora_A.weight"].shape == (4, dim + cfg.ffn_dim)
    assert tensors["transformer.ref_single_blocks.1.proj_out.lora_B.weight"].shape == (dim, 4)
    config = json.loads((mmdit.checkpoint.path / "adapter" / "mvgen_config.json").read_text())
    assert (config["ref_mode"], config["ref_rope"], config["lora_rank"], config["lora_alpha"]) == (
        "dual_stream", "decoupled", 4, 4)


def test_checkpoint_describes_hunyuan_video(mmdit, tiny_cache):
    ckpt = mmdit.checkpoint
    assert (ckpt.config.family, ckpt.config.task, ckpt.has_image_encoder) == ("mmdit", "i2v", False)
    assert (ckpt.vae_scale_temporal, ckpt.vae_scale_spatial, ckpt.latent_channels) == (4, 8, 16)
    assert ckpt.defaults["shift"] == 7.0 and ckpt.limits.first_frame
    for asked in ("unipc", "euler"):  # an MMDiT runs its own Euler scheduler whatever the command's default
        scheduler = Checkpoint.load("tiny-mmdit", cache_root=tiny_cache, scheduler=asked).make_scheduler(5.0)
        assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 5.0


def test_text_encoder_is_diffusers_encode_prompt(mmdit, diffusers_pipe):
    out = mmdit.text(PROMPTS)
    assert tuple(out) == text_outputs(mmdit.checkpoint.config)
    # the byte tokenizer is not Llama-3's: the crop is its count of the template's bytes before the prompt
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop = len(template.split("{}")[0].encode("utf-8"))
    want, pooled, mask = diffusers_pipe.encode_prompt(PROMPTS, prompt_template={"template": template,
                                                                                "crop_start": crop},
                                                      device=torch.device("cpu"), dtype=torch.float32,
                                                      max_sequence_length=256)
    assert out["text"].shape == (2, 256, 32) and torch.equal(out["text"], want)
    assert out["text_mask"].dtype == torch.float32 and torch.equal(out["text_mask"], mask.float())
    assert out["text_mask"][0].sum() < out["text_mask"][1].sum()  # the prompts' lengths differ
    assert out["pooled_text"].shape == (2, 32) and torch.equal(out["pooled_text"], pooled)


def test_an_empty_prompt_keeps_its_closing_tokens(mmdit):
    """The negative prompt is empty by default: its states must keep tokens (the refiner's masked mean divides by
    their count), as Llama-3's crop keeps the closing <|eot_id|>."""
    out = mmdit.text(["", "x"])
    assert 0 < out["text_mask"][0].sum() < out["text_mask"][1].sum()
    assert torch.isfinite(out["text"]).all() and torch.isfinite(out["pooled_text"]).all()


def test_llama3_tokenizer_keeps_the_fixed_crop(mmdit):
    tokenizer = mmdit.text.pipeline.tokenizer
    assert prompt_template(tokenizer)["crop_start"] != DEFAULT_PROMPT_TEMPLATE["crop_start"]
    llama3 = type(tokenizer)()
    llama3.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    assert prompt_template(llama3)["crop_start"] == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95


def _diffusers_i2v_latents(vae, frame: np.ndarray, noise: torch.Tensor, num_frames: int):
    """HunyuanVideo-I2V's latent preparation by diffusers' own ``prepare_latents`` (on a light object holding the VAE)
    and its ``latent_concat`` lines after it: (first latents, image_latents + mask channel)."""
    height, width = frame.shape[:2]
    image = VideoProcessor(vae_scale_factor=8).preprocess(Image.fromarray(frame), height, width)
    host = SimpleNamespace(vae=vae, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8,
                           vae_scaling_factor=vae.config.scaling_factor)
    latents, image_latents = HunyuanVideoImageToVideoPipeline.prepare_latents(
        host, image, 1, 16, height, width, num_frames, torch.float32, torch.device("cpu"), None, noise, "latent_concat")
    image_latents[:, :, 1:] = 0
    mask = image_latents.new_ones(image_latents.shape[0], 1, *image_latents.shape[2:])
    mask[:, :, 1:] = 0
    return latents, torch.cat([image_latents, mask], dim=1)


def test_condition_is_hunyuan_i2v_latent_concat(mmdit):
    frame = _frame(1)
    condition = mmdit.vae.encode_condition(frame, np.ones((8, 8), np.float32), 9)
    _, want = _diffusers_i2v_latents(mmdit.vae.model, frame, torch.zeros(1, 16, 3, 8, 8), 9)
    assert condition.shape == (1, 17, 3, 8, 8) == want.shape
    # diffusers scales pixels as x / 255 * 2 - 1, the engine as x / 127.5 - 1 (float rounding apart, equal)
    torch.testing.assert_close(condition, want, rtol=1e-4, atol=1e-5)
    known = np.ones((8, 8), np.float32)
    known[2:5, 3:] = 0
    masked = mmdit.vae.encode_condition(frame, known, 9)
    assert torch.equal(masked[0, 16, 0], torch.from_numpy(known)) and not masked[0, 16, 1:].any()


def test_references_and_decode(mmdit):
    vae = mmdit.vae
    views = np.stack([_frame(2), _frame(3)])
    refs = vae.encode_references(views)
    assert refs.shape == (1, 2, 16, 8, 8)
    first = vae.encode_condition(views[1], np.ones((8, 8), np.float32), 1)  # a one-frame video each, the same way
    torch.testing.assert_close(refs[0, 1], first[0, :16, 0])  # batched, so rounding apart
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    video = vae.decode(latents)
    assert video.shape == (9, 64, 64, 3) and video.dtype == np.uint8
    with torch.no_grad():
        want = vae.model.decode(latents / vae.model.config.scaling_factor).sample[0]
    want = ((want / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(video, want)


def test_prepare_matches_diffusers_i2v(mmdit):
    """The loop's once-per-request work on an MMDiT: text rows [cond, uncond] with their mask and pooled text,
    the 17-channel condition, HunyuanVideo-I2V's first latents and its pipelines' sigmas."""
    ckpt = mmdit.checkpoint
    stages = LocalStages(mmdit.text, None, mmdit.vae, [], reference_cache=False)
    frame = _frame(5)
    request = make_request(ckpt.defaults, ckpt.limits, first_frame=frame, prompt=PROMPTS[1], negative_prompt="blurry",
                           seed=7)
    state = generation.prepare(ckpt, request, stages)
    encoded = mmdit.text([PROMPTS[1], "blurry"])
    assert state.batch == 2 and torch.equal(state.text, encoded["text"])
    assert torch.equal(state.modes["text_mask"], encoded["text_mask"])
    assert torch.equal(state.modes["pooled_text"], encoded["pooled_text"])
    inputs = generation.denoiser_inputs(state, state.timesteps[0], True, rows=1)
    assert inputs["text_mask"].shape == (1, 256) and inputs["pooled_text"].shape == (1, 32)
    assert inputs["condition"].shape == (1, 17, 3, 8, 8)
    noise = ckpt.initial_noise(7, 9, 64, 64)
    want, _ = _diffusers_i2v_latents(mmdit.vae.model, frame, noise, 9)
    torch.testing.assert_close(state.latents, want, rtol=1e-4, atol=1e-5)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(ckpt.path / "scheduler")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, request.steps + 1)[:-1])  # the pipelines' own sigmas
    assert torch.equal(state.timesteps, scheduler.timesteps)


def test_denoiser_inputs_are_declared_by_family(mmdit):
    specs = {spec.name: spec for spec in config_specs(mmdit.checkpoint.config)}
    assert specs["text"].dims == ("batch", 256, 32) and specs["condition"].dims[1] == 17
    assert specs["text_mask"].dims == ("batch", 256) and specs["text_mask"].dtype == "float32"
    assert specs["pooled_text"].dims == ("batch", 32) and specs["pooled_text"].dtype == "model"
    assert "image_context" not in specs
    wan = config_specs(mmdit.checkpoint.config.replace(family="wan", qk_norm="rms_norm_across_heads",
                                                       in_channels=36, text_len=512))
    assert not {"text_mask", "pooled_text"} & {spec.name for spec in wan}


def test_loop_without_references_is_diffusers_i2v(mmdit):
    """The whole loop (prepare, true CFG, Euler steps) with R = 0 against diffusers' HunyuanVideoImageToVideoPipeline
    on the same transformer, VAE and scheduler, fed the same prompt states (its own prompt path reads the image
    through a Llava) and noise; diffusers returns the latents after frame 0. Needs the MMDiT denoiser (engine.backbones.mmdit.model)."""
    from engine.pipeline import MultiViewPipeline

    ckpt = mmdit.checkpoint
    pipe = MultiViewPipeline.from_checkpoint(ckpt)
    frame = _frame(6)
    request = pipe.make_request(first_frame=frame, prompt=PROMPTS[0], negative_prompt="blurry", seed=3)
    ours = pipe.denoise(pipe.prepare(request))
    with quiet_hub_progress():
        oracle = HunyuanVideoImageToVideoPipeline(
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, image_processor=None,
            transformer=HunyuanVideoTransformer3DModel.from_pretrained(ckpt.path / "transformer"),
            vae=AutoencoderKLHunyuanVideo.from_pretrained(ckpt.path / "vae"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(ckpt.path / "scheduler"))
        oracle.set_progress_bar_config(disable=True)
    text = mmdit.text([PROMPTS[0], "blurry"])
    want = oracle(image=Image.fromarray(frame), prompt_embeds=text["text"][:1],
                  pooled_prompt_embeds=text["pooled_text"][:1], prompt_attention_mask=text["text_mask"][:1],
                  negative_prompt_embeds=text["text"][1:],
                  negative_pooled_prompt_embeds=text["pooled_text"][1:],
                  negative_prompt_attention_mask=text["text_mask"][1:], true_cfg_scale=request.guidance_scale,
                  guidance_scale=1.0, height=64, width=64, num_frames=9, num_inference_steps=request.steps,
                  latents=ckpt.initial_noise(3, 9, 64, 64), output_type="latent", return_dict=False)[0]
    torch.testing.assert_close(ours[:, :, 1:], want, rtol=1e-4, atol=1e-5)
