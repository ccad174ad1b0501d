"""``engine.runtime.workers.DistributedDenoiser``: a leader and its worker processes (gloo on CPU) answer as one process
would; a hung worker fails the batch within the timeout, and the leader refuses calls from then on."""
from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.runtime.denoiser import DenoiseCall, Denoiser
from engine.runtime.parallel import ParallelLayout
from engine.runtime.workers import DistributedDenoiser
from engine.errors import WorkersLost

pytestmark = pytest.mark.slow  # worker processes, a hung one waited out

TIMEOUT_S = 6


def _inputs(checkpoint, seed: int) -> dict:
    cfg, gen = checkpoint.config, torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return dict(latents=r(2, 16, 3, 6, 10), condition=r(2, 20, 3, 6, 10), timestep=torch.tensor([700.0, 700.0]),
                text=r(2, 512, cfg.text_dim), image_context=r(2, 257, cfg.image_dim), ref_latents=r(2, 2, 16, 6, 6))


@pytest.fixture(scope="module")
def checkpoint(tiny_cache):
    return Checkpoint.load("tiny", cache_root=tiny_cache)


def test_heads_not_divisible_refused_before_any_process(checkpoint):
    with pytest.raises(ValueError, match="divisible by sp; this model has 2 heads"):
        DistributedDenoiser(checkpoint, layout=ParallelLayout(3))


def test_leader_and_worker_equal_one_process_and_a_hung_worker_fails_the_batch(checkpoint):
    lost = []
    group = DistributedDenoiser(checkpoint, layout=ParallelLayout(2), timeout_s=TIMEOUT_S, on_lost=lost.append)
    try:
        alone = Denoiser(checkpoint)
        calls = [DenoiseCall(_inputs(checkpoint, 1)), DenoiseCall(_inputs(checkpoint, 2))]
        for got, want in zip(group.run(calls), alone.run(calls)):
            assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
        assert group.healthy and not lost

        (worker,) = group.workers
        os.kill(worker.pid, signal.SIGSTOP)  # alive but silent: only the collective timeout can tell
        start = time.monotonic()
        with pytest.raises(WorkersLost, match="workers are lost .*[Tt]imed out"):
            group.run(calls[:1])
        assert time.monotonic() - start < TIMEOUT_S + 10
        assert not group.healthy and len(lost) == 1
        start = time.monotonic()
        with pytest.raises(WorkersLost, match="it is restarting"):  # refused at once from then on
            group.run(calls[:1])
        assert time.monotonic() - start < 1
        assert worker.wait(10) == -signal.SIGKILL  # the leader killed it
    finally:
        group.close()
        del group
        # collected now: left for interpreter exit, the leader's gloo groups (whose peer died mid-collective)
        # aborted the process ("terminate called without an active exception") when this was the last test run
        gc.collect()
