"""The PPA kernel (through Triton's interpreter) against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.prototype import prototype_aggregate_reference
from tests.kernels.conftest import needs_interpreter

pytestmark = needs_interpreter

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (batch, frames, queries per frame, references, tokens per reference, pose dim, channels)
SHAPES = {
    "1ref": (2, 3, 21, 1, 19, 24, 40),
    "5refs": (1, 2, 37, 5, 9, 64, 33),
    "3refs-wide": (1, 1, 5, 3, 17, 16, 70),
}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_float64_reference(name, dtype, gen):
    batch, frames, n_q, refs, tokens, dim, channels = SHAPES[name]
    pose_q = (2 * torch.randn(batch, frames, n_q, dim, generator=gen)).to(dtype)
    pose_k = torch.randn(batch, refs * tokens, dim, generator=gen).to(dtype)
    ref_feats = torch.randn(batch, refs, tokens, channels, generator=gen).to(dtype)
    expected = prototype_aggregate_reference(pose_q.double(), pose_k.double(), ref_feats.double())
    got = kernels.prototype_aggregate(pose_q, pose_k, ref_feats, backend="triton")
    for out, ref, tol in zip(got, expected, (TOLERANCE[dtype], 1e-5, 1e-5)):
        assert out.shape == ref.shape and not out.isnan().any()
        assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    token_scores = got[1]
    assert torch.allclose(token_scores.sum((-1, -2)), torch.ones(batch, frames), atol=1e-5)


def test_auto_on_cpu_is_the_reference(gen):
    pose_q, pose_k, feats = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 6, 8, generator=gen), \
        torch.randn(1, 2, 3, 4, generator=gen)
    for got, ref in zip(kernels.prototype_aggregate(pose_q, pose_k, feats),
                        prototype_aggregate_reference(pose_q, pose_k, feats)):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("pose_k_shape, message", [((1, 7, 8), "pose_k must be"), ((1, 6, 4), "pose_k must be")])
def test_bad_inputs(pose_k_shape, message):
    with pytest.raises(ValueError, match=message):
        kernels.prototype_aggregate(torch.zeros(1, 2, 5, 8), torch.zeros(pose_k_shape), torch.zeros(1, 2, 3, 4),
                                    backend="triton")
