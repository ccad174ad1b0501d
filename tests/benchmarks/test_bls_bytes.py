"""``mvgen bench bls``: bytes per denoiser step from the I/O declaration, checked against the shapes written out."""
from __future__ import annotations

import argparse

from benchmarks import bls_bytes


def test_wan14b_480p_bytes_are_the_wire_shapes_written_out():
    args = argparse.Namespace(model=["14B"], resolution=["480p"], refs=3, dtype="bf16")
    full, cached = bls_bytes.rows(args)
    rows, frames, h, w, r = 2, 21, 60, 104, 60  # cond + uncond; 81 frames, 480x832, 480x480 references
    latents, condition = rows * 16 * frames * h * w * 2, rows * 20 * frames * h * w * 2
    text, clip, refs, timestep = rows * 512 * 4096 * 2, rows * 257 * 1280 * 2, rows * 3 * 16 * r * r * 2, rows * 4
    every = latents + condition + text + clip + refs + timestep
    assert full["first_step_mib"] * 2**20 == every == cached["first_step_mib"] * 2**20
    assert full["before_later_mib"] * 2**20 == every  # full attention: the references at every step too
    assert cached["before_later_mib"] * 2**20 == every - refs
    assert full["after_later_mib"] * 2**20 == latents + timestep == cached["after_later_mib"] * 2**20
