"""Pay a component's one-time costs at load, so the first request after "ready" runs as fast as the second.

Two costs land on a freshly loaded component's first call. Its weights are not all in memory: safetensors
files are mapped and read lazily (``shared/ENVIRONMENT.md``, 2026-12-07: at ready a denoiser process held 0.3 of
its 0.7 GiB), so the first call reads the rest from the page cache or the disk. And its first call pays for lazy
imports, kernel selection (oneDNN primitives, cuBLAS handles) and allocator growth. ``warm_*`` below pay both:

- ``weights``: every parameter and buffer page is read once (one byte per page; nothing is copied, so memory
  holds the weights once), which makes them resident in this process;
- ``full``: that, then one call of each of the component's kinds at ``default_request`` (``Checkpoint.defaults``:
  frames, height, width, guidance; ``max_references`` references). The denoiser's calls are the loop's own
  (``engine.generation`` over ``NullStages``, this denoiser the only real stage), so they are what a first
  request sends, whatever the family's inputs; the loop model, which holds no weights, runs the loop over
  ``NullStages`` alone (``warm_loop``).

Each is bounded by ``budget_s``: once over it, the remaining calls are skipped and logged (a call already running
is not interrupted). The denoiser's calls leave no request cache behind.
"""
from __future__ import annotations

import logging
import mmap
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .checkpoint import Checkpoint
from .runtime.denoiser import DenoiseCall
from .denoiser_io import config_specs, text_outputs
from .generation import generate, prepare, step
from .guidance import default_rows
from .request import make_request

log = logging.getLogger("mvgen.warmup")

WARMUP_MODES = ("full", "weights", "none")
DEFAULT_BUDGET_S = 300.0  # per served model; a call started within it runs to its end
WARMUP_PROMPT = "warm-up"


@dataclass(frozen=True)
class WarmupReport:
    """What one component's warm-up did: ``resident_bytes`` read into memory, the calls run and those skipped
    (over budget), and the seconds it took."""

    component: str
    mode: str
    resident_bytes: int
    calls: tuple[str, ...]
    skipped: tuple[str, ...]
    seconds: float

    def line(self) -> str:
        """One log line: ``warm-up full of the VAE: 0.3 MiB resident, calls: condition (0.21 s), ...; 0.62 s``."""
        calls = ", ".join(self.calls) or "none"
        skipped = f"; over budget, skipped {', '.join(self.skipped)}" if self.skipped else ""
        return (f"warm-up {self.mode} of the {self.component}: {self.resident_bytes / 2**20:.1f} MiB resident, "
                f"calls: {calls}{skipped}; {self.seconds:.2f} s")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of ``WARMUP_MODES``, else a ``ValueError`` naming them."""
    if mode not in WARMUP_MODES:
        raise ValueError(f"warmup must be one of {', '.join(WARMUP_MODES)}, got {mode!r}")
    return mode


def held_modules(component) -> list[torch.nn.Module]:
    """The torch modules a component holds: its attributes', and one level down those of an attribute that
    holds them (an MMDiT text encoder's diffusers pipeline, ``DistributedDenoiser.denoiser``)."""
    found: dict[int, torch.nn.Module] = {}
    for value in vars(component).values():
        inner = [value] if isinstance(value, torch.nn.Module) else list(getattr(value, "__dict__", {}).values())
        found.update({id(m): m for m in inner if isinstance(m, torch.nn.Module)})
    return list(found.values())


def make_resident(modules: list[torch.nn.Module], deadline: float = float("inf")) -> int:
    """Read one byte of every page of every host parameter and buffer (each tensor once), so that lazily mapped
    weights are in this process's memory; no tensor is copied. Returns the bytes covered. Device tensors are
    resident once allocated and are skipped; so is whatever is left once ``deadline`` (``time.perf_counter``)
    has passed."""
    seen, covered = set(), 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            key = (tensor.data_ptr(), tensor.nbytes)
            if tensor.device.type != "cpu" or not tensor.nbytes or key in seen:
                continue
            if time.perf_counter() > deadline:
                return covered
            seen.add(key)
            _read_pages(tensor.detach())
            covered += tensor.nbytes
    return covered


def _read_pages(tensor: torch.Tensor) -> int:
    """Read one byte per page of the tensor's span of its storage, and its last byte; their sum."""
    start = tensor.storage_offset() * tensor.element_size()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    end = start + extent * tensor.element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    return int(raw[start:end:mmap.PAGESIZE].sum()) + int(raw[end - 1])


def default_size(checkpoint: Checkpoint) -> tuple[int, int, int]:
    """(frames, height, width) of the checkpoint's default request."""
    d = checkpoint.defaults
    return d["num_frames"], d["height"], d["width"]


def default_request(checkpoint: Checkpoint):
    """The request a warm-up serves: the model's defaults (size, steps, guidance, so the negative prompt and the
    denoiser's two rows when they guide), a grey PNG first frame where the model takes one, and ``max_references``
    grey PNG references at the video's size. At most references, because a request may send that many: the first
    such request then meets no larger reference stream than the warm-up built (and a GPU's caching allocator has
    already reserved its peak); a prototype (PPA) model, which needs them, gets a grey pose image per frame and per
    reference; the optional seed-method inputs (identity, omega) stay unset, as in a default request."""
    frames, height, width = default_size(checkpoint)
    grey = _png(np.full((height, width, 3), 128, np.uint8))
    refs = checkpoint.config.max_references
    images = {"references": [grey] * refs}
    if checkpoint.limits.first_frame:
        images["first_frame"] = grey
    if checkpoint.limits.prototype and refs:
        images.update(frame_pose=[grey] * frames, reference_poses=[grey] * refs)
    return make_request(checkpoint.defaults, checkpoint.limits, prompt=WARMUP_PROMPT, **images)


def guided(checkpoint: Checkpoint) -> bool:
    """Does the default request guide (the negative prompt encoded beside the prompt)?"""
    return len(default_rows(checkpoint.defaults)) > 1


def _warm(component: str, modules: list[torch.nn.Module], calls: list[tuple[str, Callable[[], object]]],
          mode: str, budget_s: float) -> WarmupReport:
    """Residency (``weights``, ``full``), then ``calls`` in order (``full``) while within ``budget_s``."""
    start = time.perf_counter()
    deadline = start + budget_s
    resident = make_resident(modules, deadline) if check_mode(mode) != "none" else 0
    done, skipped = [], []
    for label, call in calls if mode == "full" else []:
        if time.perf_counter() > deadline:
            skipped.append(label)
            continue
        began = time.perf_counter()
        try:
            call()
        except Exception as error:  # a warm-up is an optimisation: the model still loads, its first request pays
            log.warning("warm-up of the %s: %s failed (%s: %s); the first request will pay for it", component, label,
                        type(error).__name__, error)
            skipped.append(f"{label} (failed: {type(error).__name__})")
            continue
        done.append(f"{label} ({time.perf_counter() - began:.2f} s)")
    report = WarmupReport(component, mode, resident, tuple(done), tuple(skipped), time.perf_counter() - start)
    if skipped:
        log.warning("%s: over its %.0f s budget", report.line(), budget_s)
    return report


def warm_text_encoder(encoder, checkpoint: Checkpoint, mode: str = "full",
                      budget_s: float = DEFAULT_BUDGET_S) -> WarmupReport:
    """The family's text encoder (``TextEncoder``, ``MMDiTTextEncoder``): the prompt, and the negative prompt
    when the default request guides (one call of two prompts, as the loop sends them)."""
    texts = [WARMUP_PROMPT, ""] if guided(checkpoint) else [WARMUP_PROMPT]
    return _warm("text encoder", held_modules(encoder), [("text", lambda: encoder(texts))], mode, budget_s)


def warm_image_encoder(encoder, checkpoint: Checkpoint, mode: str = "full",
                       budget_s: float = DEFAULT_BUDGET_S) -> WarmupReport:
    """CLIP on a grey frame of the default size."""
    _, height, width = default_size(checkpoint)
    frame = np.full((height, width, 3), 128, np.uint8)
    return _warm("image encoder", held_modules(encoder), [("frame", lambda: encoder(frame))], mode, budget_s)


def warm_vae(vae, checkpoint: Checkpoint, mode: str = "full", budget_s: float = DEFAULT_BUDGET_S) -> WarmupReport:
    """The family's VAE: the first-frame condition (checkpoints that take a first frame), ``max_references``
    references, and the decode of the default video's latents."""
    frames, height, width = default_size(checkpoint)
    spatial, refs = checkpoint.vae_scale_spatial, checkpoint.config.max_references
    frame = np.full((height, width, 3), 128, np.uint8)
    calls = []
    if checkpoint.limits.first_frame:
        known = np.ones((height // spatial, width // spatial), np.float32)
        calls.append(("condition", lambda: vae.encode_condition(frame, known, frames)))
    if refs:
        calls.append(("references", lambda: vae.encode_references(np.repeat(frame[None], refs, axis=0))))
    latents = torch.zeros(checkpoint.latent_shape(frames, height, width), device=checkpoint.device)
    calls.append(("decode", lambda: vae.decode(latents)))
    return _warm("VAE", held_modules(vae), calls, mode, budget_s)


def warm_denoiser(denoiser, checkpoint: Checkpoint, expert: int = 0, mode: str = "full", pad_to: int = 0,
                  budget_s: float = DEFAULT_BUDGET_S) -> WarmupReport:
    """One expert's denoiser (``Denoiser`` or ``DistributedDenoiser``: their ``run`` and ``release``), batched as
    served (``pad_to``), at the steps the loop sends it for ``default_request``: the loop itself runs
    (``engine.generation``) over ``NullStages`` with this denoiser as its one real stage, from the expert's first
    step (which sends everything a denoiser keeps per request: references, step-invariant inputs) to its second
    (which uses what it kept). So the inputs are whatever the loop sends this family, and the request's key is
    released afterwards, as the loop releases it: no request cache is left behind."""
    stages = DenoiserStages(checkpoint, denoiser, expert, pad_to)
    states = []

    def first_step() -> None:
        state = prepare(checkpoint, default_request(checkpoint), stages)
        states.append(state)
        state.step_index = stages.steps(state)[0]
        step(state, stages)

    def later_step() -> None:
        if states and states[0].step_index in stages.steps(states[0]):
            step(states[0], stages)

    try:
        return _warm(f"denoiser (expert {expert})", held_modules(denoiser),
                     [("first step", first_step), ("later step", later_step)], mode, budget_s)
    finally:
        if states and states[0].cache_key is not None:
            stages.release(states[0].cache_key)


class NullStages:
    """``engine.generation.Stages`` answering ones of the shapes the served stages answer (``denoiser_io``'s
    declaration of the denoiser's inputs), and a zero velocity: the loop's own code runs, no model does. (Ones, not
    zeros: an all-zero token mask would mask every token.)"""

    caches_references = caches_requests = False

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.specs = {spec.name: spec for spec in config_specs(checkpoint.config)}

    def _ones(self, name: str, **sizes) -> torch.Tensor:
        spec = self.specs[name]
        checkpoint = self.checkpoint
        return torch.ones(spec.shape(sizes), dtype=spec.torch_dtype(checkpoint.dtype), device=checkpoint.device)

    def encode_text(self, texts):
        return {name: self._ones(name, batch=len(texts)) for name in text_outputs(self.checkpoint.config)}

    def encode_image(self, frame):
        return self._ones("image_context", batch=1)

    def encode_condition(self, frame, known, num_frames):
        _, _, frames, height, width = self.checkpoint.latent_shape(num_frames, *frame.shape[:2])
        return self._ones("condition", batch=1, frames=frames, height=height, width=width)

    def encode_references(self, images):
        _, channels, _, height, width = self.checkpoint.latent_shape(1, *images.shape[1:3])
        return torch.ones(1, len(images), channels, height, width, device=self.checkpoint.device)

    def denoise(self, inputs, cache_key, expert, cache_references):
        return torch.zeros_like(inputs["latents"])

    def release(self, cache_key):
        pass

    def decode(self, latents):
        frames, height, width = default_size(self.checkpoint)
        return np.zeros((frames, height, width, 3), np.uint8)


class DenoiserStages(NullStages):
    """``NullStages`` whose denoiser is a real one: one expert's, called as the server's denoiser model calls it
    (``run`` of one call, batched to ``pad_to`` rows)."""

    def __init__(self, checkpoint: Checkpoint, denoiser, expert: int, pad_to: int):
        super().__init__(checkpoint)
        self.denoiser, self.expert, self.pad_to = denoiser, expert, pad_to
        config = checkpoint.experts[expert].config
        self.caches_references, self.caches_requests = config.caches_reference, config.caches_requests

    def steps(self, state) -> list[int]:
        """The indices of the request's steps this expert denoises (Wan2.2's experts split them)."""
        return [i for i, t in enumerate(state.timesteps) if self.checkpoint.expert_at(t) == self.expert]

    def denoise(self, inputs, cache_key, expert, cache_references):
        result = self.denoiser.run([DenoiseCall(inputs, cache_key, cache_references)], self.pad_to)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def release(self, cache_key):
        self.denoiser.release(cache_key)


def warm_loop(checkpoint: Checkpoint, mode: str = "full", budget_s: float = DEFAULT_BUDGET_S) -> WarmupReport:
    """The generation loop, which holds no weights: ``default_request`` validated (its PNGs decoded) and generated
    over ``NullStages``, so image decoding, validation, the scheduler's steps and guidance pay their first-call
    costs here."""
    def run() -> None:
        generate(checkpoint, default_request(checkpoint), NullStages(checkpoint))

    return _warm("generation loop", [], [("request", run)], mode, budget_s)


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
