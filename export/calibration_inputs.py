"""Real denoiser inputs to calibrate a ``--quantize fp8`` graph's activation scales on (``export.fp8_onnx``).

``generation_feeds`` runs a short generation of the checkpoint being exported (the demo first frame and reference
views of ``engine.demo_inputs``, a fixed prompt, ``GENERATION``'s sizes and steps, the same dtype and config) and keeps
what the exported expert's denoiser received at each step: the scheduler's latents and timesteps, the text encoder's
states, CLIP's image context, the VAE's condition and reference latents (cond and uncond rows batched, as served).
Those are the graph's inputs by name (``engine.denoiser_io``), so each is one feed of ``calibrate``. The pipeline is
dropped before the export loads its own copy of the denoiser.
"""
from __future__ import annotations

import numpy as np

# what a --quantize fp8 export may calibrate on: the exporter's sample inputs, or this module's generation
FP8_CALIBRATIONS = ("sample", "generation")
# the generation whose denoiser inputs calibrate: small, so that calibration costs a few denoiser calls
GENERATION = dict(num_frames=5, height=64, width=64, steps=3, seed=0)
PROMPT = "a person turns around slowly, showing the front, the side and the back of the outfit"


class _Recorder:
    """The pipeline's stages, keeping a copy of each graph input of ``expert``'s denoiser calls. A call that carries
    only the step's inputs (``engine.denoiser_io.step_only``: the denoiser keeps the rest) is completed with the
    request's last full inputs."""

    def __init__(self, stages, expert: int, names: list[str]):
        self._stages, self._expert, self._names = stages, expert, names
        self.feeds: list[dict] = []
        self._last: dict = {}

    def __getattr__(self, name):
        return getattr(self._stages, name)

    def denoise(self, inputs, cache_key, expert, cache_references):
        if expert == self._expert:
            self._last = {**self._last, **{k: v for k, v in inputs.items() if v is not None}}
            if all(name in self._last for name in self._names):
                self.feeds.append({name: self._last[name].detach().clone() for name in self._names})
        return self._stages.denoise(inputs, cache_key, expert, cache_references)


def generation_feeds(checkpoint, expert: int, names: list[str]) -> tuple[list[dict], str]:
    """(the graph inputs ``names`` of each denoiser call of ``expert`` in a short generation of ``checkpoint``, what
    they are in words for ``export.json``)."""
    from engine import generation
    from engine.demo_inputs import first_frame, reference
    from engine.pipeline import MultiViewPipeline

    pipe = MultiViewPipeline.from_checkpoint(checkpoint, reference_cache=False)
    scene, _ = first_frame()
    views = [np.asarray(reference(view)) for view in ("front", "back", "side")][:checkpoint.config.max_references]
    request = pipe.make_request(first_frame=np.asarray(scene) if pipe.limits.first_frame else None,
                                references=views, prompt=PROMPT, **GENERATION)
    recorder = _Recorder(pipe.stages, expert, names)
    state = generation.prepare(pipe.checkpoint, request, recorder)
    generation.denoise(state, recorder)
    if not recorder.feeds:
        raise ValueError(f"a generation of {checkpoint.path} never called expert {expert} with every graph input "
                         f"({', '.join(names)}): nothing to calibrate on")
    sizes = ", ".join(f"{k} {v}" for k, v in GENERATION.items())
    return recorder.feeds, (f"the denoiser inputs of a short generation of this checkpoint ({len(recorder.feeds)} "
                            f"calls: engine.demo_inputs' first frame and {len(views)} reference views, {sizes})")
