"""``engine.warmup``: the weights resident (every page present in this process's page tables, read from
``/proc/self/pagemap``: the kernel's account, not ours), one call per kind at the default request, no request cache
left behind, and the time budget."""
from __future__ import annotations

import os
import struct

import pytest
import torch

from engine import warmup
from engine.checkpoint import Checkpoint
from engine.runtime.denoiser import Denoiser
from engine.backbones.wan.components import ImageEncoder
from engine.backbones.registry import text_encoder_class, vae_class
from engine.runtime.parallel import ParallelLayout
from engine.tiny import ensure_tiny
from engine.runtime.workers import DistributedDenoiser

PAGE = os.sysconf("SC_PAGE_SIZE")


def present_fraction(tensors) -> float:
    """The fraction of the pages under the tensors' bytes that are present in this process (pagemap bit 63)."""
    pages = set()
    for t in tensors:
        if t.nbytes:
            pages.update(range(t.data_ptr() // PAGE, (t.data_ptr() + t.nbytes - 1) // PAGE + 1))
    with open("/proc/self/pagemap", "rb") as pagemap:
        present = 0
        for page in pages:
            pagemap.seek(8 * page)
            present += struct.unpack("<Q", pagemap.read(8))[0] >> 63
    return present / len(pages)


def weights(component) -> list[torch.Tensor]:
    return [t for m in warmup.held_modules(component) for t in (*m.parameters(), *m.buffers())]


class Recording:
    """A denoiser that records the calls and releases it gets (what ``warm_denoiser`` sends)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls, self.released = denoiser, [], []

    def run(self, calls, pad_to=0):
        self.calls += calls
        return self.denoiser.run(calls, pad_to)

    def release(self, key):
        self.released.append(key)
        self.denoiser.release(key)


def test_make_resident_reads_lazily_mapped_weights_in_without_copying_them(tmp_path):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    save_file({f"w{i}": torch.randn(1024, 1024, generator=gen) for i in range(4)}, tmp_path / "w.safetensors")
    module = torch.nn.Module()
    for name, tensor in load_file(tmp_path / "w.safetensors").items():  # mapped, read lazily
        module.register_buffer(name, tensor)
    pointers = [t.data_ptr() for t in module.buffers()]
    assert present_fraction(module.buffers()) < 0.5
    assert warmup.make_resident([module]) == 4 * 1024 * 1024 * 4
    assert present_fraction(module.buffers()) == 1.0
    assert [t.data_ptr() for t in module.buffers()] == pointers  # read where they are, not copied


@pytest.fixture(scope="module", params=["tiny", "tiny-wan22", "tiny-mmdit"])
def checkpoint(request, tiny_cache):
    ensure_tiny(tiny_cache, request.param)
    return Checkpoint.load(request.param, cache_root=tiny_cache)


def test_each_encoder_and_the_vae_is_resident_and_has_run_at_the_default_request(checkpoint):
    parts = [(warmup.warm_text_encoder, text_encoder_class(checkpoint)), (warmup.warm_vae, vae_class(checkpoint))]
    if checkpoint.has_image_encoder:
        parts.append((warmup.warm_image_encoder, ImageEncoder))
    for warm, load in parts:
        component = load(checkpoint)
        report = warm(component, checkpoint)
        assert report.calls and not report.skipped, report.line()
        assert report.resident_bytes > 0 and present_fraction(weights(component)) == 1.0


def test_the_denoiser_runs_a_first_requests_steps_and_keeps_nothing_of_it(checkpoint):
    frames, height, width = warmup.default_size(checkpoint)
    for expert, spec in enumerate(checkpoint.experts):
        denoiser = Recording(Denoiser(checkpoint, expert))
        report = warmup.warm_denoiser(denoiser, checkpoint, expert)
        assert len(report.calls) == 2 and not report.skipped, report.line()
        first = denoiser.calls[0].inputs
        # guidance 5: cond and uncond rows; the default video's latents; max_references references
        assert first["latents"].shape == (2, *checkpoint.latent_shape(frames, height, width)[1:])
        assert first["ref_latents"].shape[1] == spec.config.max_references
        (key,) = {call.cache_key for call in denoiser.calls}  # one request's, released as the loop releases it
        assert (key is not None) == spec.config.caches_requests
        assert denoiser.released == ([key] if key is not None else [])
        assert len(denoiser.denoiser.caches) == 0 and len(denoiser.denoiser.requests) == 0
        assert present_fraction(weights(denoiser)) == 1.0


@pytest.mark.parametrize("mode, budget_s, calls", [("weights", 60, 0), ("none", 60, 0), ("full", 0, 0)])
def test_weights_only_none_and_a_spent_budget_run_no_call(tiny_cache, mode, budget_s, calls):
    checkpoint = Checkpoint.load("tiny", cache_root=tiny_cache)
    denoiser = Recording(Denoiser(checkpoint))
    report = warmup.warm_denoiser(denoiser, checkpoint, mode=mode, budget_s=budget_s)
    assert len(denoiser.calls) == len(report.calls) == calls
    assert report.skipped == (("first step", "later step") if mode == "full" else ())
    assert (report.resident_bytes > 0) == (mode == "weights")  # budget 0: no time for residency either
    assert len(denoiser.denoiser.caches) == 0 and len(denoiser.denoiser.requests) == 0


def test_the_loop_warms_up_over_null_stages(checkpoint):
    report = warmup.warm_loop(checkpoint)
    assert len(report.calls) == 1 and report.resident_bytes == 0


def test_a_parallel_denoiser_warms_up_through_its_workers(tiny_cache):
    checkpoint = Checkpoint.load("tiny", cache_root=tiny_cache)
    group = DistributedDenoiser(checkpoint, layout=ParallelLayout(2), timeout_s=60, resident_workers=True)
    try:
        report = warmup.warm_denoiser(group, checkpoint)
        assert len(report.calls) == 2 and group.healthy and len(group.caches) == 0
        assert present_fraction(weights(group)) == 1.0
    finally:
        group.close()


def test_an_unknown_mode_is_refused(tiny_cache):
    checkpoint = Checkpoint.load("tiny", cache_root=tiny_cache)
    with pytest.raises(ValueError, match="warmup must be one of full, weights, none, got 'fast'"):
        warmup.warm_loop(checkpoint, mode="fast")
