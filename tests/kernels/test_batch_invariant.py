"""The batch-invariant linear, kernel (through Triton's interpreter) and reference: against a float64 matmul written
here, and bit for bit against itself with the same rows batched among other rows (its production tiles compiled
for sm_90 and sm_80: tests/kernels/test_compile.py)."""
from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.conftest import needs_interpreter

BACKENDS = [pytest.param("triton", marks=needs_interpreter), "reference"]

# relative Frobenius error against float64, per dtype: one rounding of the output (the inputs are in the dtype
# already). Measured over the oracle cases below with 4 seeds: fp32 <= 1.4e-7 (kernel; reference 3e-8, float64
# sums), fp16 <= 2.3e-4, bf16 <= 2.3e-3 (both backends).
TOLERANCE = {torch.float32: 3e-7, torch.float16: 5e-4, torch.bfloat16: 4e-3}
SHAPES = [(24, 32), (40, 48)]  # (N, K): neither a multiple of the interpreter's 16x16x32 tiles in every dim


def oracle(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def operands(gen, m, n, k, dtype, bias):
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    return x, w, torch.randn(n, generator=gen).to(dtype) if bias else None


def rel_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("n, k", SHAPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17, 70])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_matches_float64_oracle(dtype, m, n, k, bias, backend, gen):
    x, w, b = operands(gen, m, n, k, dtype, bias)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned: every element must be written
    got = kernels.batch_invariant_linear(x, w, b, backend=backend, out=out)
    assert got is out and torch.isfinite(got).all()
    assert rel_error(got, oracle(x, w, b)) < TOLERANCE[dtype]


def _batched(backend, small, others, pre, post, w, b):
    """``small``'s rows computed with ``pre`` other rows before them and ``post`` after."""
    x = torch.cat([others[:pre], small, others[pre:pre + post]])
    return kernels.batch_invariant_linear(x, w, b, backend=backend)[pre:pre + len(small)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_rows_are_bitwise_batch_invariant(dtype, bias, backend, gen):
    """A block of rows alone and the same rows among others (shifted across tile boundaries, in more tiles than
    programs) give the same bits; so does one request of a [B, T, K] batch."""
    n, k = 40, 48
    small, w, b = operands(gen, 17, n, k, dtype, bias)
    others = torch.randn(53, k, generator=gen).to(dtype)
    for rows, placements in ((1, [(1, 0), (37, 16)]), (3, [(0, 5), (16, 1)]), (17, [(7, 13), (53, 0)])):
        alone = kernels.batch_invariant_linear(small[:rows], w, b, backend=backend)
        for pre, post in placements:
            assert torch.equal(_batched(backend, small[:rows], others, pre, post, w, b), alone), (rows, pre, post)
    requests = torch.randn(3, 5, k, generator=gen).to(dtype)
    batch = kernels.batch_invariant_linear(requests, w, b, backend=backend)
    assert batch.shape == (3, 5, n)
    assert torch.equal(kernels.batch_invariant_linear(requests[1:2], w, b, backend=backend), batch[1:2])


@needs_interpreter
@pytest.mark.parametrize("k", [48, 64], ids=["k-tail", "even-k"])
@pytest.mark.parametrize("dtype, major", [(torch.bfloat16, 9), (torch.float16, 9), (torch.float32, 9),
                                          (torch.bfloat16, 8)], ids=str)
def test_production_tiles(dtype, major, k, gen):
    """The GPU configuration (``tile_config``), interpreted: one 128-row tile holds the batch, the rows sit at other
    positions in it, and K is below one slab (masked tail) or one whole slab (``EVEN_K``)."""
    from kernels.batch_invariant.kernel import batch_invariant_linear_triton, tile_config

    config = tile_config(dtype, major)
    small, w, b = operands(gen, 3, 40, k, dtype, True)
    others = torch.randn(60, k, generator=gen).to(dtype)
    alone = batch_invariant_linear_triton(small, w, b, config=config)
    batched = batch_invariant_linear_triton(torch.cat([others[:41], small, others[41:]]), w, b, config=config)
    assert torch.equal(batched[41:44], alone)
    assert rel_error(alone, oracle(small, w, b)) < TOLERANCE[dtype]


@needs_interpreter
def test_writes_into_a_column_slice(gen):
    """``out`` a [rows, N] view inside a wider buffer: the slice is written, the columns around it are not."""
    x, w, b = operands(gen, 19, 24, 32, torch.float32, True)
    buffer = torch.full((19, 40), float("nan"))
    out = buffer[:, 8:32]
    assert kernels.batch_invariant_linear(x, w, b, backend="triton", out=out) is out
    assert torch.equal(out, kernels.batch_invariant_linear(x, w, b, backend="triton"))
    assert buffer[:, :8].isnan().all() and buffer[:, 32:].isnan().all()


def test_auto_on_cpu_is_the_reference(gen):
    x, w, b = operands(gen, 5, 24, 32, torch.float32, True)
    assert torch.equal(kernels.batch_invariant_linear(x, w, b), kernels.batch_invariant_linear_reference(x, w, b))


def _call(backend, **changes):
    args = dict(x=torch.zeros(4, 32), weight=torch.zeros(24, 32), bias=torch.zeros(24)) | changes
    return lambda: kernels.batch_invariant_linear(**args, backend=backend)


SHAPE_ERRORS = [
    (dict(weight=torch.zeros(24, 48)), r"weight must be \[N, K\] with K = x's last dim 32, got shape \(24, 48\)"),
    (dict(weight=torch.zeros(24, 32, 1)), r"weight must be \[N, K\]"),
    (dict(bias=torch.zeros(23)), r"bias must be \[24\] \(N, weight's rows\), got shape \(23,\)"),
    (dict(x=torch.zeros(())), r"x must be \[\.\.\., K\]"),
]
KERNEL_ERRORS = [
    (dict(weight=torch.zeros(24, 32, dtype=torch.float16)), "weight dtype torch.float16 must be x's dtype"),
    (dict(x=torch.zeros(4, 32, dtype=torch.int32), weight=torch.zeros(24, 32, dtype=torch.int32)),
     "x dtype must be one"),
    (dict(x=torch.zeros(32, 4).T), r"x must be contiguous in K \(stride\(-1\) == 1\)"),
    (dict(weight=torch.zeros(32, 24).T), r"weight must be contiguous in K \(stride\(-1\) == 1\)"),
    (dict(bias=torch.zeros(48)[::2]), r"bias must be contiguous in N"),
    (dict(out=torch.zeros(4, 25)), r"out must be torch.float32 \(4, 24\) on cpu, got torch.float32 \(4, 25\)"),
    (dict(out=torch.zeros(4, 24, dtype=torch.float16)), r"out must be torch.float32 \(4, 24\)"),
    (dict(out=torch.zeros(24, 4).T), r"out must be viewable as \[rows, N\] with stride\(-1\) == 1"),
    (dict(x=torch.zeros(2, 3, 32), out=torch.zeros(3, 2, 24).transpose(0, 1)), "out must be viewable"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("changes, message", SHAPE_ERRORS)
def test_bad_shapes(backend, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        _call(backend, **changes)()
    assert "\n" not in str(err.value)


@needs_interpreter
@pytest.mark.parametrize("changes, message", KERNEL_ERRORS)
def test_bad_kernel_inputs(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        _call("triton", **changes)()
    assert "\n" not in str(err.value)
