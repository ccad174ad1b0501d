"""Guidance recipes of the generation loop: which denoiser rows a step runs and how their velocities combine.

A recipe declares its rows once: the request's text each row reads and whether it sees the request's reference
latents or zeros of their shape. The loop (``engine.generation``) encodes each distinct text once and batches the
rows into one denoiser call, the server sends that batch as one call (its BLS loop batches requests' rows), CFG
parallel splits the rows between its two groups (``engine.runtime.parallel.CfgParallel``), and the server's call
bounds count them (``server.call_bounds``); none of them knows a recipe by name.

- ``cfg``: classifier-free guidance, rows [cond, uncond] = [prompt, negative prompt], both with the references,
  combined as ``uncond + s (cond - uncond)`` with s = ``guidance_scale`` (diffusers' Wan pipelines); at a scale of
  at most 1 the cond row runs alone.
- ``phantom``: Phantom-Wan's subject-to-video guidance (Phantom-video/Phantom, ``Phantom_Wan_S2V.generate`` in
  ``phantom_wan/subject2video.py``): rows [pos_it, pos_i, neg] = [prompt + references, negative prompt + references,
  negative prompt + zero reference latents], combined as ``neg + s_img (pos_i - neg) + s_text (pos_it - pos_i)``
  with s_text = ``guidance_scale`` (the authors' ``guide_scale_text``, 7.5) and s_img = ``guidance_scale_image``
  (their ``guide_scale_img``, 5.0). The authors run all three rows at every step, whatever the scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

PROMPT, NEGATIVE = "prompt", "negative_prompt"  # the request fields a row's text comes from


@dataclass(frozen=True)
class Row:
    """One row of the guidance batch."""

    name: str
    text: str  # PROMPT or NEGATIVE
    references: bool  # the request's reference latents (True) or zeros of their shape (False)


@dataclass(frozen=True)
class GuidanceRecipe:
    name: str
    rows: tuple[Row, ...]  # row 0 is the conditional row: the one an unguided step runs alone
    # (velocity [rows, ...], text scale, image scale) -> the guided velocity [1, ...]
    combine: Callable[[torch.Tensor, float, float], torch.Tensor]
    drops_rows_unguided: bool  # at a text scale of at most 1 the conditional row runs alone
    needs_references: bool

    def rows_at(self, text_scale: float) -> tuple[Row, ...]:
        """The rows a step at ``text_scale`` runs (a prefix of ``rows``)."""
        return self.rows[:1] if self.drops_rows_unguided and text_scale <= 1 else self.rows


def classifier_free_guidance(velocity: torch.Tensor, guidance_scale: float, image_scale: float = 0.0) -> torch.Tensor:
    """[cond; uncond] batched velocity -> ``uncond + scale * (cond - uncond)``; a batch of 1 passes through
    (``image_scale``: the recipes' common signature, unused here)."""
    if velocity.shape[0] == 1:
        return velocity
    cond, uncond = velocity.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def phantom_guidance(velocity: torch.Tensor, text_scale: float, image_scale: float) -> torch.Tensor:
    """[pos_it; pos_i; neg] batched velocity -> ``neg + image_scale (pos_i - neg) + text_scale (pos_it - pos_i)``."""
    pos_it, pos_i, neg = velocity.chunk(3)
    return neg + image_scale * (pos_i - neg) + text_scale * (pos_it - pos_i)


RECIPES = {
    "cfg": GuidanceRecipe("cfg", (Row("cond", PROMPT, True), Row("uncond", NEGATIVE, True)),
                          classifier_free_guidance, drops_rows_unguided=True, needs_references=False),
    "phantom": GuidanceRecipe("phantom", (Row("pos_it", PROMPT, True), Row("pos_i", NEGATIVE, True),
                                          Row("neg", NEGATIVE, False)),
                              phantom_guidance, drops_rows_unguided=False, needs_references=True),
}
GUIDANCE_RECIPES = tuple(RECIPES)
# the request fields' defaults where a checkpoint's mvgen_defaults.json does not set them (Wan's own guidance; the
# image scale is Phantom's guide_scale_img, used by the phantom recipe only)
GUIDANCE_DEFAULTS = {"guidance": "cfg", "guidance_scale_image": 5.0}


def request_rows(request) -> tuple[Row, ...]:
    """The rows a request's loop holds: those of its most guided expert (Wan2.2's ``guidance_scale_2``)."""
    recipe = RECIPES[request.guidance]
    return recipe.rows_at(max(request.guidance_scale, request.guidance_scale_2 or 0.0))


def default_rows(defaults: dict) -> tuple[Row, ...]:
    """The rows of a checkpoint's default request (``Checkpoint.defaults``)."""
    recipe = RECIPES[defaults.get("guidance", GUIDANCE_DEFAULTS["guidance"])]
    return recipe.rows_at(max(defaults["guidance_scale"], defaults.get("guidance_scale_2") or 0.0))


def row_texts(rows: tuple[Row, ...]) -> tuple[tuple[str, ...], list[int]]:
    """The distinct request text fields the rows read, in first-use order, and each row's index into them."""
    fields = tuple(dict.fromkeys(row.text for row in rows))
    return fields, [fields.index(row.text) for row in rows]
