"""Step caching (the TeaCache family): skip the block stack on steps where its output would barely change.

Between neighbouring denoising steps a DiT's block stack turns nearly the same input into nearly the same
residual ``blocks(x) - x``. TeaCache (Liu et al., 2024, "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model") estimates that change from something cheap: the first block's *timestep-modulated input*
``AdaLN(x; t)``, whose relative L1 change between steps tracks the change of the stack's output. The change
accumulates over skipped steps; while the sum stays under the user's ``threshold`` the step reuses the last
computed residual (``x + residual``), and once it crosses the threshold the stack runs again and the sum
restarts from 0. The first step always runs. diffusers, ComfyUI and LightX2V ship the same rule.

What is adapted: TeaCache rescales the raw distance with a polynomial fitted per checkpoint (e.g. Wan2.1
1.3B/14B); those fits are for the published weights, so this engine uses the raw relative L1 distance (the
polynomial is monotone; the threshold absorbs the scale) and says so rather than reuse a fit made for other
weights. The decision is one per call over all its rows and tokens (cond and uncond of a request decide
together), so a request decides the same alone, under sequence/CFG parallel (the sums are reduced over every
rank; padding rows and tokens are left out) and in any batch (``engine.checkpoint.Denoiser`` gives every
step-cached request its own call). Each expert of Wan2.2 keeps its own state (one ``StepCache`` per denoiser).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class StepCache:
    """One request's step-caching state in one denoiser (expert): created at its first step, dropped with it."""

    threshold: float
    previous: torch.Tensor | None = None  # the first block's modulated input at the last step [B, N, D] fp32
    residual: torch.Tensor | None = None  # the block stack's output minus its input at the last computed step
    accumulated: float = 0.0
    computed: int = 0
    skipped: int = 0
    # set per call by whoever splits the call: rows of this rank that are real (the rest pad a batch), and a sum
    # over every rank of the call (sequence/CFG parallel); defaults: every row, this process alone
    real_rows: int | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)

    def __post_init__(self):
        if not self.threshold > 0:
            raise ValueError(f"the step-cache threshold must be > 0 (0 turns step caching off), got {self.threshold}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.previous, self.residual) if t is not None)

    def skip(self, indicator: torch.Tensor, real_tokens: int) -> bool:
        """Whether this step reuses the last residual, given the first block's modulated input [B, N, D] of
        this call (its first ``real_tokens`` tokens are real). Updates the state either way."""
        indicator = indicator.float()
        previous, self.previous = self.previous, indicator
        if previous is None or self.residual is None or previous.shape != indicator.shape:
            return False
        rows = indicator.shape[0] if self.real_rows is None else self.real_rows
        diff = (indicator - previous)[:rows, :real_tokens].abs().sum()
        base = previous[:rows, :real_tokens].abs().sum()
        diff, base = self.reduce(torch.stack([diff, base]).double()).tolist()
        self.accumulated += diff / max(base, 1e-12)
        if self.accumulated < self.threshold:
            self.skipped += 1
            return True
        return False

    def computed_residual(self, residual: torch.Tensor) -> None:
        self.residual = residual
        self.accumulated = 0.0
        self.computed += 1
