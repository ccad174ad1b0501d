"""The small fusion kernels (through Triton's interpreter) against their float64 references."""
from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.conftest import needs_interpreter

pytestmark = needs_interpreter

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(TOLERANCE)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def poison(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("param_shape", ["per-sample", "per-token", "shared"])
@pytest.mark.parametrize("channels", [96, 200])
def test_adaln_layernorm(dtype, param_shape, channels, gen):
    x = (3 * torch.randn(2, 7, channels, generator=gen) + 1).to(dtype)
    shape = {"per-sample": (2, 1, channels), "per-token": (2, 7, channels), "shared": (channels,)}[param_shape]
    shift, scale = torch.randn(shape, generator=gen), 0.3 * torch.randn(shape, generator=gen)
    ref = kernels.adaln_layernorm_reference(x.double(), shift.double(), scale.double())
    out = kernels.adaln_layernorm(x, shift, scale, backend="triton")
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_residual(dtype, gen):
    x, y = torch.randn(2, 11, 72, generator=gen).to(dtype), torch.randn(2, 11, 72, generator=gen).to(dtype)
    gate = torch.randn(2, 1, 72, generator=gen)
    ref = kernels.gated_residual_reference(x.double(), y.double(), gate.double())
    assert rel_err(kernels.gated_residual(x, y, gate, backend="triton"), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_distribution_fusion(dtype, gen):
    za = (4 * torch.randn(3, 5, 130, generator=gen) - 2).to(dtype)
    zb = (0.5 * torch.randn(3, 5, 130, generator=gen) + 1).to(dtype)
    ref = kernels.distribution_fusion_reference(za.double(), zb.double())
    out = kernels.distribution_fusion(za, zb, backend="triton")
    assert rel_err(out, ref) < TOLERANCE[dtype]
    # the fused output minus zb has zb's per-token mean and standard deviation
    moved = (out.double() - zb.double())
    assert torch.allclose(moved.mean(-1), zb.double().mean(-1), atol=5e-2)


def test_auto_on_cpu_is_the_reference(gen):
    x = torch.randn(1, 3, 16, generator=gen)
    p = torch.randn(1, 1, 16, generator=gen)
    assert torch.equal(kernels.adaln_layernorm(x, p, p), kernels.adaln_layernorm_reference(x, p, p))
    assert torch.equal(kernels.gated_residual(x, x, p), kernels.gated_residual_reference(x, x, p))
    assert torch.equal(kernels.distribution_fusion(x, x), kernels.distribution_fusion_reference(x, x))


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.adaln_layernorm(torch.zeros(2, 3, 8), torch.zeros(2, 1, 4), torch.zeros(2, 1, 8),
                                     backend="triton"), "shift"),
    (lambda: kernels.adaln_layernorm(torch.zeros(2, 8, 3).transpose(1, 2), torch.zeros(8), torch.zeros(8),
                                     backend="triton"), "contiguous"),
    (lambda: kernels.gated_residual(torch.zeros(2, 3, 8), torch.zeros(2, 4, 8), torch.zeros(8),
                                    backend="triton"), "y must be"),
    (lambda: kernels.distribution_fusion(torch.zeros(2, 8, dtype=torch.int32), torch.zeros(2, 8),
                                         backend="triton"), "za dtype"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
