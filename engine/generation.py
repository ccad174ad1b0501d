"""The one generation loop, over a small stages interface.

It follows diffusers' ``WanImageToVideoPipeline`` / ``WanPipeline`` step for step (prompt padded to 512
tokens, CLIP penultimate states where the checkpoint has CLIP, the 20-channel first-frame condition on I2V,
latents normalised by the VAE's mean/std, classifier-free guidance with cond and uncond batched, CPU
generator seeds, Wan2.2's switch from the high-noise to the low-noise expert at ``boundary_ratio``); on an
MMDiT (HunyuanVideo) the text encoder's token mask and pooled text travel beside its states, the condition
has HunyuanVideo-I2V's 17 channels and the sigmas are its pipeline's (``Checkpoint.set_timesteps``). It adds
the reference views (T2V: reference-to-video with no first frame), the first-frame inpainting mask and the
reference K/V cache (one per expert). The in-process
pipeline supplies local stages (``engine.pipeline.LocalStages``), the server supplies stages that call its
sub-models; both run ``generate`` below, so the CLI, the Python API, the benchmarks and the server produce
the same video for the same request and seed.
"""
from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .backbones.families import family_of
from .checkpoint import Checkpoint
from .denoiser_io import config_specs
from .guidance import classifier_free_guidance  # noqa: F401 (its home before engine.guidance; callers import it here)
from .guidance import RECIPES, request_rows, row_texts
from .media import fit_image, fit_reference
from .errors import ReferenceCacheMiss
from .request import GenerationRequest

GREY = 128
# the denoiser's inputs, in the order of ``MultiViewWanTransformer.forward`` (then its keyword-only mode inputs),
# then the text entries an MMDiT's text encoder returns beside ``text`` (``denoiser_io.TEXT_OUTPUTS``)
DENOISER_INPUTS = ("latents", "condition", "timestep", "text", "image_context", "ref_latents",
                   "frame_pose", "ref_pose", "identity_context", "view_omega", "text_mask", "pooled_text")
# the inputs the loop sends with every call when the request has them (``Generation.modes``: the seed methods'
# inputs, engine.modes, and the text encoder's entries beside ``text``); absent: None
MODE_INPUTS = DENOISER_INPUTS[6:]

StepCallback = Callable[[int, int, float], None]  # (step, total, seconds)


class Stages(Protocol):
    """Where the once-per-request encoders, the per-step denoiser and the decoder run."""

    # N prompts -> the family's ``denoiser_io.text_outputs``, [N, ...] each: {"text": [N, 512, text_dim]} on Wan;
    # an MMDiT adds "text_mask" [N, 256] (float32, 1 = token) and "pooled_text" [N, pooled_projection_dim]
    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]: ...
    def encode_image(self, frame: np.ndarray) -> torch.Tensor: ...  # [1, 257, image_dim]
    def encode_condition(self, frame: np.ndarray, known: np.ndarray, num_frames: int) -> torch.Tensor: ...
    def encode_references(self, images: np.ndarray) -> torch.Tensor: ...  # [R, H, W, 3] -> [1, R, 16, h, w]
    # one step of expert ``expert`` (Checkpoint.experts; 0 unless Wan2.2's low-noise steps)
    def denoise(self, inputs: dict[str, torch.Tensor | None], cache_key: str | None, expert: int,
                cache_references: bool) -> torch.Tensor: ...
    def release(self, cache_key: str) -> None: ...  # drop the request's reference caches (every expert's)
    def decode(self, latents: torch.Tensor) -> np.ndarray: ...  # [1, 16, f, h, w] -> uint8 [F, H, W, 3]

    @property
    def caches_references(self) -> bool: ...  # the denoiser keeps per-request reference K/V

    @property
    def caches_requests(self) -> bool: ...  # the denoiser keeps per-request state (context K/V, step cache)


class Cancelled(Exception):
    """The client went away; the loop stopped."""


@dataclass
class Generation:
    """One request's loop state. Batched tensors hold the guidance recipe's rows along the batch
    (``engine.guidance``: [cond, uncond] under classifier-free guidance, B = 2, or the cond row alone, B = 1;
    Phantom's [pos_it, pos_i, neg], B = 3)."""

    request: GenerationRequest
    checkpoint: Checkpoint
    latents: torch.Tensor  # [1, 16, f, h, w] float32, the sample being denoised
    condition: torch.Tensor | None  # [B, 20, f, h, w] (Wan; an MMDiT's 17 channels; None on T2V)
    text: torch.Tensor  # [B, 512, text_dim] (an MMDiT's [B, 256, text_dim])
    image_context: torch.Tensor | None  # [B, 257, image_dim]
    ref_latents: torch.Tensor | None  # [B, R, 16, hr, wr] (None: no references)
    cache_key: str | None  # set when the denoiser keeps anything of this request (reference or context K/V, ...)
    cache_references: bool  # the denoiser keeps this request's reference K/V (sent at each expert's first step)
    scheduler: object  # a fresh diffusers flow-matching scheduler with its timesteps set
    # the other per-request inputs by MODE_INPUTS name ([B, ...]): the seed methods' (``mode_inputs``) and the text
    # encoder's entries beside ``text`` (rows as in ``text``)
    modes: dict = field(default_factory=dict)
    step_index: int = 0
    cache_built: set = field(default_factory=set)  # the experts that hold this request's reference cache
    inputs_sent: set = field(default_factory=set)  # the experts that keep this request's step-invariant inputs

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    def guidance_scale(self, expert: int) -> float:
        """The expert's guidance scale: Wan2.2's low-noise expert takes ``guidance_scale_2`` (default: the first)."""
        second = self.request.guidance_scale_2
        return self.request.guidance_scale if expert == 0 or second is None else second


def condition_frame(checkpoint: Checkpoint, first_frame: np.ndarray, mask: np.ndarray | None, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
    """The first frame at video size with the masked region grey, and its known map (float32 [h, w], 1 = known)
    at latent size."""
    frame = fit_image(first_frame, height, width)
    s = checkpoint.vae_scale_spatial
    if mask is None:
        return frame, np.ones((height // s, width // s), np.float32)
    masked = fit_image(mask.astype(np.uint8) * 255, height, width, Image.NEAREST) > 127
    frame = np.where(masked[..., None], np.uint8(GREY), frame)
    # a latent cell that sees any masked pixel is unknown: its latent carries the grey fill
    cells = F.max_pool2d(torch.from_numpy(masked).float()[None, None], s)[0, 0]
    return frame, (1.0 - cells).numpy()


def fit_references(images, size: tuple[int, int], fit: str = "crop") -> np.ndarray | None:
    """Reference views fitted to ``size`` (height, width) as ``fit`` says (``media.REFERENCE_FITS``: centre-cropped
    and resized, or letterboxed on white): uint8 [R, H, W, 3]; None if none."""
    if len(images) == 0:
        return None
    return np.stack([fit_reference(image, *size, fit) for image in images])


def pose_latents(images, height: int, width: int, spatial: int) -> torch.Tensor:
    """Rendered pose images fitted to (height, width), then area-resized to the latent grid: float32
    [1, N, 3, height / spatial, width / spatial] in [-1, 1] (ProFashion PPA's pose inputs)."""
    fitted = [Image.fromarray(fit_image(image, height, width)).resize((width // spatial, height // spatial),
                                                                      Image.BOX) for image in images]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in fitted])).permute(0, 3, 1, 2)
    return (pixels.float() / 127.5 - 1.0).unsqueeze(0)


def frame_pose_per_latent_frame(poses, temporal: int) -> list:
    """One pose image per latent frame: Wan's VAE encodes pixel frame 0 alone, then each group of ``temporal``
    (4) frames causally into one latent frame, so latent frame i takes the group's last pixel frame, 4i, the
    pose the latent ends on (ProFashion instantiates one prototype per output frame, Eq. 10)."""
    return [poses[i * temporal] for i in range((len(poses) - 1) // temporal + 1)]


def mode_inputs(checkpoint: Checkpoint, request: GenerationRequest, stages: Stages) -> dict:
    """The seed methods' inputs of a request, batch 1 ([1, ...] tensors in the checkpoint's dtype)."""
    dtype, spatial = checkpoint.dtype, checkpoint.vae_scale_spatial
    out = {}
    if request.frame_pose:
        frames = frame_pose_per_latent_frame(request.frame_pose, checkpoint.vae_scale_temporal)
        out["frame_pose"] = pose_latents(frames, request.height, request.width, spatial).to(checkpoint.device, dtype)
        out["ref_pose"] = pose_latents(request.reference_poses, *request.reference_size, spatial).to(
            checkpoint.device, dtype)
    if request.identity is not None:  # the checkpoint's CLIP on the identity image at the video's size
        out["identity_context"] = stages.encode_image(fit_image(request.identity, request.height, request.width)).to(
            dtype)
    if request.view_omega:
        out["view_omega"] = torch.tensor([request.view_omega], dtype=torch.float32, device=checkpoint.device)
    return out


def prepare(checkpoint: Checkpoint, request: GenerationRequest, stages: Stages,
            cancelled: Callable[[], bool] = lambda: False) -> Generation:
    """Every once-per-request stage: prompts, image context, condition, references, noise, scheduler."""
    # the recipe's rows at its most guided expert (guidance_scale_2: Wan2.2's second expert, or None); each distinct
    # text is encoded once
    rows = request_rows(request)
    texts, text_rows = row_texts(rows)
    _check(cancelled)
    encoded = stages.encode_text([getattr(request, name) for name in texts])
    if text_rows != list(range(len(texts))):
        encoded = {name: value[text_rows] for name, value in encoded.items()}
    text = encoded.pop("text")  # the rest (an MMDiT's mask and pooled text) travel as mode inputs, rows as in text
    specs = {spec.name: spec for spec in config_specs(checkpoint.config)}
    batch = text.shape[0]
    image_context = condition = refs = None
    if request.first_frame is not None:  # image-to-video (validation refuses a first frame on T2V)
        frame, known = condition_frame(checkpoint, request.first_frame, request.first_frame_mask, request.height,
                                       request.width)
        if checkpoint.has_image_encoder:
            _check(cancelled)
            image_context = stages.encode_image(frame).to(checkpoint.dtype).expand(batch, -1, -1)
        _check(cancelled)
        condition = stages.encode_condition(frame, known, request.num_frames)
    views = fit_references(request.references, request.reference_size, request.reference_fit)
    if views is not None:
        _check(cancelled)
        refs = stages.encode_references(views)

    cached = refs is not None and stages.caches_references and any(
        e.config.caches_reference for e in checkpoint.experts)
    keyed = cached or stages.caches_requests
    latents = checkpoint.initial_noise(request.seed, request.num_frames, request.height, request.width)
    noise_weight = family_of(checkpoint.config).i2v_noise_weight
    if condition is not None and noise_weight is not None:
        # HunyuanVideo-I2V's prepare_latents: noise x 0.999 + the first frame's latent (every frame) x 0.001
        first = condition[:, :checkpoint.latent_channels, :1].to(latents)
        latents = latents * noise_weight + first * (1 - noise_weight)
    scheduler = checkpoint.make_scheduler(request.shift)
    checkpoint.set_timesteps(scheduler, request.steps)
    return Generation(
        request=request,
        checkpoint=checkpoint,
        latents=latents,
        condition=condition.to(checkpoint.dtype).expand(batch, -1, -1, -1, -1) if condition is not None else None,
        text=text.to(checkpoint.dtype),
        image_context=image_context,
        ref_latents=_reference_rows(refs.to(checkpoint.dtype), rows) if refs is not None else None,
        cache_key=uuid.uuid4().hex if keyed else None,
        cache_references=cached,
        scheduler=scheduler,
        modes={**{name: value.expand(batch, *value.shape[1:]) for name, value in
                  mode_inputs(checkpoint, request, stages).items()},
               **{name: value.to(specs[name].torch_dtype(checkpoint.dtype)) for name, value in encoded.items()}},
    )


def _reference_rows(refs: torch.Tensor, rows) -> torch.Tensor:
    """[1, R, 16, hr, wr] -> [B, R, 16, hr, wr]: the references on the rows that see them, zeros on the others
    (Phantom's neg row)."""
    if all(row.references for row in rows):
        return refs.expand(len(rows), -1, -1, -1, -1)
    zeros = torch.zeros_like(refs)
    return torch.cat([refs if row.references else zeros for row in rows])


def denoiser_inputs(state: Generation, timestep: torch.Tensor, with_references: bool, rows: int | None = None,
                    step_only: bool = False) -> dict:
    """One step's denoiser inputs with the guidance recipe's rows batched (the first ``rows`` rows: 1 = cond only);
    references left out once the denoiser caches them; ``step_only``: the ``STEP_INPUTS`` alone (the denoiser
    keeps the request's others), every other name None."""
    rows = state.batch if rows is None else rows
    first = (lambda t: t[:rows] if t is not None else None)
    step = dict(latents=state.latents.expand(rows, -1, -1, -1, -1).to(state.text.dtype), timestep=timestep.expand(rows))
    if step_only:
        return {name: step.get(name) for name in DENOISER_INPUTS}
    return dict(
        **step, condition=first(state.condition), text=first(state.text), image_context=first(state.image_context),
        ref_latents=first(state.ref_latents) if with_references else None,
        **{name: first(state.modes.get(name)) for name in MODE_INPUTS},
    )


def predict_velocity(state: Generation, stages: Stages, timestep: torch.Tensor) -> torch.Tensor:
    """One denoiser call of the step's expert with the guidance recipe's rows batched, combined by the recipe at
    that expert's scale (``engine.guidance``): [1, 16, f, h, w]. Under ``cfg`` an expert whose scale is at most 1
    runs the cond row alone.

    A cached request sends its references at each expert's first step only (that expert builds its cache from
    them); a denoiser that keeps requests' step-invariant inputs (``inputs_once``) gets them at each expert's
    first step only, later steps carrying the latents and the timestep. When the denoiser has dropped what it
    kept in the meantime, the step is sent again with everything."""
    expert = state.checkpoint.expert_at(timestep)
    config = state.checkpoint.experts[expert].config
    scale = state.guidance_scale(expert)
    recipe = RECIPES[state.request.guidance]
    rows = len(recipe.rows_at(scale))
    with_refs = state.ref_latents is not None and expert not in state.cache_built
    keeps_inputs = state.cache_key is not None and stages.caches_requests and config.inputs_once
    step_only = keeps_inputs and expert in state.inputs_sent
    try:
        velocity = stages.denoise(denoiser_inputs(state, timestep, with_refs, rows, step_only), state.cache_key,
                                  expert, state.cache_references)
    except ReferenceCacheMiss:
        velocity = stages.denoise(denoiser_inputs(state, timestep, True, rows), state.cache_key, expert,
                                  state.cache_references)
    if state.cache_key is not None and state.cache_references and config.caches_reference:
        state.cache_built.add(expert)
    if keeps_inputs:
        state.inputs_sent.add(expert)
    return recipe.combine(velocity.float(), scale, state.request.guidance_scale_image)


@torch.no_grad()
def step(state: Generation, stages: Stages) -> Generation:
    """Advance the state by one scheduler step (in place; returned for chaining)."""
    if state.done:
        raise ValueError(f"denoising already finished ({state.total_steps} steps)")
    t = state.timesteps[state.step_index]
    velocity = predict_velocity(state, stages, t)
    state.latents = state.scheduler.step(velocity, t, state.latents, return_dict=False)[0]
    state.step_index += 1
    return state


@torch.no_grad()
def denoise(state: Generation, stages: Stages, on_step: StepCallback | None = None,
            cancelled: Callable[[], bool] = lambda: False, progress: bool = False) -> torch.Tensor:
    """Run the remaining steps; ``on_step(step, total, seconds)`` after each (step counts from 1). The request's
    reference cache is released when the loop ends, however it ends."""
    try:
        with tqdm(total=state.total_steps, initial=state.step_index, disable=not progress, desc="denoising",
                  unit="step", file=sys.stderr) as bar:
            while not state.done:
                _check(cancelled)
                start = time.perf_counter()
                step(state, stages)
                bar.update()
                if on_step is not None:
                    on_step(state.step_index, state.total_steps, time.perf_counter() - start)
    finally:
        if state.cache_key is not None:
            stages.release(state.cache_key)
    return _with_known_frames(state)


def _with_known_frames(state: Generation) -> torch.Tensor:
    """TI2V (``MvgenConfig.condition_optional``): the known first-frame latents replace the sample's, as diffusers'
    TI2V pipelines end (the denoiser read them in place of the noisy ones at every step)."""
    if state.condition is None or not state.checkpoint.config.condition_optional:
        return state.latents
    condition = state.condition[:1].to(state.latents)
    known = condition[:, :1]
    return known * condition[:, 1:] + (1 - known) * state.latents


@torch.no_grad()
def generate(checkpoint: Checkpoint, request: GenerationRequest, stages: Stages,
             on_step: StepCallback | None = None, cancelled: Callable[[], bool] = lambda: False,
             progress: bool = False, on_prepared: Callable[[], None] | None = None) -> np.ndarray:
    """A validated request -> frames uint8 [F, H, W, 3]. ``cancelled()`` is checked before every stage and
    step: a cancelled request raises ``Cancelled`` within one step. ``on_prepared()`` runs once the encoders are
    done, before the first denoiser step (the server's queue gauge)."""
    state = prepare(checkpoint, request, stages, cancelled)
    if on_prepared is not None:
        on_prepared()
    latents = denoise(state, stages, on_step, cancelled, progress)
    _check(cancelled)
    return stages.decode(latents)


def _check(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled("request cancelled by the client")
