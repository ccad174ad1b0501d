"""The in-process multi-view image-to-video pipeline (Wan2.1-I2V + reference images).

It follows diffusers' ``WanImageToVideoPipeline`` step for step (prompt encoding padded to 512 tokens,
CLIP penultimate states, the 20-channel first-frame condition, latents normalised by the VAE's
mean/std, classifier-free guidance when ``guidance_scale > 1``, CPU generator seeds) and adds the
reference images, the first-frame inpainting mask and a reference K/V cache. The stages are public so the
server can run them one by one: ``encode_prompt``, ``encode_image``, ``prepare_condition``,
``encode_references``, ``prepare_latents``, ``prepare`` -> ``denoise_step`` ... -> ``decode``.
"""
from __future__ import annotations

import contextlib
import html
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .denoiser import MultiViewWanTransformer, ReferenceCache
from .loading import load_denoiser
from .media import fit_image
from .request import GenerationRequest, make_request
from .validation import DEFAULT_MAX_TOKENS, RequestLimits

SCHEDULERS = ("unipc", "euler")
# diffusers' WanImageToVideoPipeline defaults (480p checkpoint); a checkpoint may ship mvgen_defaults.json
WAN_DEFAULTS = {"num_frames": 81, "height": 480, "width": 832, "steps": 50, "guidance_scale": 5.0, "shift": 3.0}
GREY = 128

Callback = Callable[[int, int], None]


@dataclass
class DenoiseState:
    """One request's denoising loop: built once by ``MultiViewPipeline.prepare``, advanced by ``denoise_step``.

    Batched tensors hold [cond, uncond] along the batch when classifier-free guidance is on (B = 2), else B = 1.
    """

    latents: torch.Tensor  # [1, 16, f, h, w] float32, the sample being denoised
    condition: torch.Tensor  # [B, 20, f, h, w]: 4 mask channels + 16 first-frame latent channels
    text: torch.Tensor  # [B, 512, text_dim]
    image_context: torch.Tensor  # [B, 257, image_dim]
    ref_latents: torch.Tensor | None  # [B, R, 16, hr, wr] clean reference latents (None: no references)
    ref_cache: ReferenceCache | None  # reference K/V computed once (isolated + zero-timestep configs)
    scheduler: object  # a fresh diffusers flow-matching scheduler with its timesteps set
    guidance_scale: float
    step_index: int = 0

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def batch(self) -> int:
        return self.condition.shape[0]

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps


def classifier_free_guidance(velocity: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """[cond; uncond] batched velocity -> ``uncond + scale * (cond - uncond)``; a batch of 1 passes through."""
    if velocity.shape[0] == 1:
        return velocity
    cond, uncond = velocity.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def prompt_clean(text: str) -> str:
    """Wan's prompt normalisation (ftfy, HTML unescape, whitespace collapse), as diffusers applies it."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def resolve_model(model: str | Path, adapter: str | Path | None) -> tuple[Path, Path | None]:
    """``"tiny"`` -> the embedded tiny pipeline with its bundled adapter; any other value is a directory."""
    if str(model) == "tiny":
        from .tiny import ensure_tiny

        path = ensure_tiny()
        return path, Path(adapter) if adapter is not None else path / "adapter"
    return Path(model), Path(adapter) if adapter is not None else None


@contextlib.contextmanager
def quiet_hub_progress():
    """Hide transformers'/diffusers' per-file loading bars (restored afterwards); our own bar stays."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in was:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in was:
            if enabled:
                module.enable_progress_bar()


class MultiViewPipeline:
    """Text/image encoders, Wan VAE, flow-matching scheduler and the multi-view denoiser, in one process."""

    def __init__(self, *, tokenizer, text_encoder, image_processor, image_encoder, vae,
                 denoiser: MultiViewWanTransformer, scheduler_config: dict | None = None, scheduler: str = "unipc",
                 defaults: dict | None = None, max_tokens: int = DEFAULT_MAX_TOKENS):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.image_processor = image_processor
        self.image_encoder = image_encoder
        self.vae = vae
        self.denoiser = denoiser
        self.scheduler_kind = scheduler
        self.scheduler_config = dict(scheduler_config or {})
        shift = self.scheduler_config.get("flow_shift", self.scheduler_config.get("shift", WAN_DEFAULTS["shift"]))
        self.defaults = {**WAN_DEFAULTS, "shift": float(shift), **(defaults or {})}
        self.vae_scale_temporal = vae.config.scale_factor_temporal or 4
        self.vae_scale_spatial = vae.config.scale_factor_spatial or 8
        _, patch_h, patch_w = denoiser.config.patch_size
        self.limits = RequestLimits(
            max_references=denoiser.config.max_references, max_tokens=max_tokens,
            spatial_multiple=self.vae_scale_spatial * max(patch_h, patch_w), temporal_multiple=self.vae_scale_temporal,
        )
        z_dim = vae.config.z_dim
        self.latents_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
        self.latents_std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z_dim, 1, 1, 1)

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "tiny",
        adapter: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        scheduler: str = "unipc",
        max_tokens: int = DEFAULT_MAX_TOKENS,
        **config_overrides,
    ) -> "MultiViewPipeline":
        """Load a diffusers Wan2.1-I2V directory (or ``"tiny"``, with its bundled adapter) plus an adapter.

        The denoiser and text encoder run in ``dtype``; the VAE and CLIP image encoder stay float32 as in
        diffusers' Wan example. ``config_overrides`` go to the denoiser's ``MvgenConfig``.
        """
        from diffusers import AutoencoderKLWan
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

        path, adapter = resolve_model(model, adapter)
        with quiet_hub_progress():
            denoiser = load_denoiser(path, adapter, dtype=dtype, device=device, **config_overrides)
            components = dict(
                tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
                text_encoder=UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype).to(device).eval(),
                image_processor=AutoImageProcessor.from_pretrained(path / "image_processor"),
                image_encoder=CLIPVisionModel.from_pretrained(path / "image_encoder", dtype=torch.float32)
                .to(device).eval(),
                vae=AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32).to(device).eval(),
            )
        return cls(
            **components, denoiser=denoiser, scheduler=scheduler, max_tokens=max_tokens,
            scheduler_config=_read_json(path / "scheduler" / "scheduler_config.json"),
            defaults=_read_json(path / "mvgen_defaults.json"),
        )

    @property
    def device(self) -> torch.device:
        return self.denoiser.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.patch_embedding.weight.dtype

    @property
    def config(self):
        return self.denoiser.config

    # ---- requests -----------------------------------------------------------------------------------------
    def make_request(self, **fields) -> GenerationRequest:
        """Fill unset values from this model's defaults and validate (raises ``RequestError``); the keywords
        are the fields of ``engine.request.FIELDS`` (first_frame, references, prompt, ..., ref_size)."""
        return make_request(self.defaults, self.limits, **fields)

    def make_scheduler(self, shift: float):
        """A fresh flow-matching scheduler (schedulers are stateful: one per request)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        if self.scheduler_kind == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        base = self.scheduler_config if self.scheduler_config.get("_class_name") == "UniPCMultistepScheduler" else {}
        return UniPCMultistepScheduler.from_config(
            {**base, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": shift}
        )

    # ---- encoders -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str | None = "") -> tuple[torch.Tensor, torch.Tensor | None]:
        """umT5 states [1, 512, text_dim] of the prompt and of the negative prompt (None skips it)."""
        texts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        states = self._t5_states(texts)
        return states[:1], (states[1:] if negative_prompt is not None else None)

    def _t5_states(self, texts: list[str]) -> torch.Tensor:
        length = self.config.text_len
        tokens = self.tokenizer(
            [prompt_clean(t) for t in texts], padding="max_length", max_length=length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        states = self.text_encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        # Wan zeroes the states past each prompt's length (the encoder's padded rows are not zero)
        return (states * mask[..., None].to(states.dtype)).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, first_frame: np.ndarray) -> torch.Tensor:
        """CLIP vision penultimate hidden states [1, 257, image_dim] of the first frame (RGB uint8)."""
        pixels = self.image_processor(images=Image.fromarray(first_frame), return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.image_encoder.dtype)
        out = self.image_encoder(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].to(self.dtype)

    def condition_frame(self, first_frame: np.ndarray, mask: np.ndarray | None, height: int, width: int):
        """The first frame at video size with the masked region grey, and its known map [h, w] at latent size."""
        frame = fit_image(first_frame, height, width)
        h, w = height // self.vae_scale_spatial, width // self.vae_scale_spatial
        if mask is None:
            return frame, torch.ones(h, w, device=self.device)
        masked = fit_image(mask.astype(np.uint8) * 255, height, width, Image.NEAREST) > 127
        frame = np.where(masked[..., None], np.uint8(GREY), frame)
        # a latent cell that sees any masked pixel is unknown: its latent carries the grey fill
        cells = F.max_pool2d(torch.from_numpy(masked).float()[None, None], self.vae_scale_spatial)[0, 0]
        return frame, (1.0 - cells).to(self.device)

    @torch.no_grad()
    def prepare_condition(self, first_frame: np.ndarray, mask: np.ndarray | None, num_frames: int, height: int,
                          width: int) -> torch.Tensor:
        """Wan's I2V condition [1, 20, f, h, w]: 4 mask channels (1 = known) + the VAE latent of
        [first frame, zeros x (num_frames - 1)]; with an inpainting mask the masked region is grey and unknown."""
        frame, known = self.condition_frame(first_frame, mask, height, width)
        return self._condition(frame, known, num_frames)

    def _condition(self, frame: np.ndarray, known: torch.Tensor, num_frames: int) -> torch.Tensor:
        pixels = self._to_pixels(frame)[:, :, None]  # [1, 3, 1, H, W]
        video = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, *pixels.shape[-2:])], dim=2)
        latent = self._vae_encode(video)  # [1, 16, f, h, w]
        # diffusers builds a per-pixel-frame mask (first frame x4, then one per frame) viewed as 4 channels;
        # only latent frame 0 is known, and in it exactly the known cells
        mask = latent.new_zeros(1, self.vae_scale_temporal, *latent.shape[2:])
        mask[:, :, 0] = known
        return torch.cat([mask, latent], dim=1)

    @torch.no_grad()
    def encode_references(self, images: Sequence[np.ndarray], height: int, width: int) -> torch.Tensor | None:
        """Each reference fitted (centre crop + resize) to [height, width] and VAE-encoded as a one-frame video:
        [1, R, 16, height/8, width/8]; None when there are no references."""
        if len(images) == 0:
            return None
        pixels = torch.cat([self._to_pixels(fit_image(image, height, width)) for image in images])  # [R, 3, H, W]
        latents = self._vae_encode(pixels[:, :, None])  # [R, 16, 1, h, w]
        return latents[:, :, 0].unsqueeze(0)

    def prepare_latents(self, seed: int, num_frames: int, height: int, width: int) -> torch.Tensor:
        """Initial noise [1, 16, (F-1)/4+1, H/8, W/8] from a CPU generator (same numbers on every device)."""
        shape = (1, self.vae.config.z_dim, (num_frames - 1) // self.vae_scale_temporal + 1,
                 height // self.vae_scale_spatial, width // self.vae_scale_spatial)
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def _to_pixels(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1]."""
        return torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    def _vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode().float()
        return (latent - self.latents_mean.to(latent.device)) / self.latents_std.to(latent.device)

    # ---- denoising ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseState:
        """Run every once-per-request stage and return the loop's state (reference cache included)."""
        guided = request.guidance_scale > 1
        text, negative = self.encode_prompt(request.prompt, request.negative_prompt if guided else None)
        frame, known = self.condition_frame(
            request.first_frame, request.first_frame_mask, request.height, request.width
        )
        image_context = self.encode_image(frame)
        condition = self._condition(frame, known, request.num_frames)
        refs = self.encode_references(request.references, *request.reference_size)
        text = torch.cat([text, negative]) if guided else text
        return self.assemble_state(request, text, image_context, condition, refs)

    @torch.no_grad()
    def assemble_state(self, request: GenerationRequest, text: torch.Tensor, image_context: torch.Tensor,
                       condition: torch.Tensor, refs: torch.Tensor | None, cache_references: bool = True
                       ) -> DenoiseState:
        """The loop's state from the encoded request: text [B, 512, text_dim] (B = 2 with guidance: cond then
        uncond), image_context [1, 257, image_dim], condition [1, 20, f, h, w], refs [1, R, 16, hr, wr] or None.
        Builds the initial noise and a fresh scheduler, and the reference K/V cache where the config allows it
        (``cache_references``)."""
        batch = text.shape[0]
        image_context = image_context.expand(batch, -1, -1)
        condition = condition.expand(batch, -1, -1, -1, -1)
        refs = refs.to(self.dtype).expand(batch, -1, -1, -1, -1) if refs is not None else None
        latents = self.prepare_latents(request.seed, request.num_frames, request.height, request.width)
        cache = None
        if cache_references and refs is not None and self.config.caches_reference:
            cache = self.denoiser.precompute_reference(refs, text, image_context, latent_fhw=tuple(latents.shape[2:]))
        scheduler = self.make_scheduler(request.shift)
        scheduler.set_timesteps(request.steps, device=self.device)
        return DenoiseState(latents, condition, text, image_context, refs, cache, scheduler, request.guidance_scale)

    def denoiser_inputs(self, state: DenoiseState, timestep: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """One step's denoiser inputs with cond and uncond batched (``ref_latents`` None when cached)."""
        batch = state.batch
        return dict(
            latents=state.latents.expand(batch, -1, -1, -1, -1).to(self.dtype), condition=state.condition.to(self.dtype),
            timestep=timestep.expand(batch), text=state.text, image_context=state.image_context,
            ref_latents=None if state.ref_cache is not None else state.ref_latents,
        )

    @torch.no_grad()
    def predict_velocity(self, state: DenoiseState, timestep: torch.Tensor,
                         denoise: Callable[[dict], torch.Tensor] | None = None) -> torch.Tensor:
        """One denoiser call with cond and uncond batched, combined by classifier-free guidance: [1, 16, f, h, w].

        ``denoise(inputs) -> velocity`` replaces the in-process denoiser (the server calls its denoiser model)."""
        inputs = self.denoiser_inputs(state, timestep)
        velocity = denoise(inputs) if denoise is not None else self.denoiser(**inputs, ref_cache=state.ref_cache)
        return classifier_free_guidance(velocity.float(), state.guidance_scale)

    @torch.no_grad()
    def denoise_step(self, state: DenoiseState, denoise: Callable[[dict], torch.Tensor] | None = None) -> DenoiseState:
        """Advance the state by one scheduler step (in place; returned for chaining)."""
        if state.done:
            raise ValueError(f"denoising already finished ({state.total_steps} steps)")
        t = state.timesteps[state.step_index]
        velocity = self.predict_velocity(state, t, denoise)
        state.latents = state.scheduler.step(velocity, t, state.latents, return_dict=False)[0]
        state.step_index += 1
        return state

    def denoise(self, state: DenoiseState, callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
        """Run the remaining steps; ``callback(step, total)`` after each (step counts from 1)."""
        with tqdm(total=state.total_steps, initial=state.step_index, disable=not progress, desc="denoising",
                  unit="step", file=sys.stderr) as bar:
            while not state.done:
                self.denoise_step(state)
                bar.update()
                if callback is not None:
                    callback(state.step_index, state.total_steps)
        return state.latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents [1, 16, f, h, w] -> frames uint8 [F, H, W, 3]."""
        latents = latents.float() * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)
        video = self.vae.decode(latents.to(self.vae.dtype)).sample[0]  # [3, F, H, W] in [-1, 1]
        video = ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return video.permute(1, 2, 3, 0).cpu().numpy()

    # ---- one call -----------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, callback: Callback | None = None,
                 progress: bool = False) -> np.ndarray:
        """A validated request -> frames uint8 [F, H, W, 3]."""
        state = self.prepare(request)
        return self.decode(self.denoise(state, callback, progress))

    def __call__(self, first_frame, references: Sequence = (), prompt: str = "", negative_prompt: str = "", *,
                 callback: Callback | None = None, progress: bool = False, **fields) -> np.ndarray:
        """Validate (``RequestError`` on bad input), generate, and return frames uint8 [F, H, W, 3]."""
        request = self.make_request(first_frame=first_frame, references=references, prompt=prompt,
                                    negative_prompt=negative_prompt, **fields)
        return self.generate(request, callback, progress)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
