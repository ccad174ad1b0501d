"""The 8-bit attention (INT8 QK^T with K smoothing, FP8 or 16-bit P.V): its quantisation kernels and its attention
kernel, through Triton's interpreter, against the float64 reference of the same arithmetic
(``kernels.quantized_attention.reference``) and against exact float64 attention
(``kernels.joint_attention.rotated_attention_reference``)."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels.joint_attention import attention_mask, rotated_attention_reference
from kernels.quantized_attention import (
    DEFAULT_BLOCKS,
    quantize_qk_reference,
    quantize_v_reference,
    quantized_attention_reference,
)
from tests.kernels.conftest import needs_interpreter

pytestmark = needs_interpreter

TILE = 16  # the interpreter's tiles (kernel.INTERPRETER_CONFIG), and so the quantisation blocks
# relative Frobenius error of the kernel against the reference of the same arithmetic, per (P.V precision, dtype).
# The kernel rounds P against the running maximum of its key tiles, the reference against the row's final one: with
# FP8's 3 mantissa bits that reorders roundings of a few percent each (measured 0.0064-0.0105 over the cases below);
# in 16 bits the difference is the output's rounding (measured up to 0.0015 in bf16, 0.0002 in fp16)
KERNEL_VS_REFERENCE = {("fp8", torch.bfloat16): 0.015, ("fp8", torch.float16): 0.015,
                       ("16bit", torch.bfloat16): 0.0025, ("16bit", torch.float16): 4e-4}
# and against exact attention the kernel is as accurate as the reference (measured ratios 0.959-1.0013)
EXACT_RATIO = 1.05


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def draw(batch, n_q, n_k, heads, head_dim, dtype, gen, offset=3.0):
    """Prologue-like operands: Q scaled as the prologue scales it (softmax scale times log2 e), K with a per-channel
    offset shared by every key (what smoothing removes), V Gaussian."""
    q = torch.randn(batch, n_q, heads, head_dim, generator=gen) * 2 * kernels.LOG2E / math.sqrt(head_dim)
    k = torch.randn(batch, n_k, heads, head_dim, generator=gen) + offset * torch.randn(heads, head_dim, generator=gen)
    v = torch.randn(batch, n_k, heads, head_dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --- quantisation --------------------------------------------------------------------------------------------
def codes_agree(codes: torch.Tensor, want: torch.Tensor, step: torch.Tensor | float) -> None:
    """Equal codes, except rounding ties the kernel's fp32 product and the reference's float64 one break
    differently: at most 0.2% of them (measured 2 in 14,784 INT8 codes, 9 in 20,352 e4m3 codes), each one grid step
    apart."""
    diff = (codes.double() - want.double()).abs()
    assert (diff <= step * 1.0001).all(), diff.max()
    assert (diff > 0).double().mean() <= 2e-3


@pytest.mark.parametrize("head_dim, dtype", [(64, torch.bfloat16), (128, torch.float16)], ids=["d64-bf16", "d128-fp16"])
def test_quantize_qk_matches_reference(head_dim, dtype, gen):
    from kernels.quantized_attention.quantize import quantize_qk_triton

    q, k, _ = draw(2, 77, 53, 3, head_dim, dtype, gen, offset=8.0)
    q[:, 32:48] = 0  # a zero block: scale at the floor, codes 0
    got = quantize_qk_triton(q, k, block_q=32, block_k=16)
    want = quantize_qk_reference(q, k, block_q=32, block_k=16)
    assert got.q.dtype == got.k.dtype == torch.int8 and got.q_scale.shape == (2, 3, 3) and got.k_scale.shape == (2, 3, 4)
    codes_agree(got.q, want.q, 1)
    codes_agree(got.k, want.k, 1)
    assert torch.equal(got.q[:, 32:48], torch.zeros_like(got.q[:, 32:48]))
    torch.testing.assert_close(got.q_scale, want.q_scale, rtol=1e-6, atol=0)  # fp32 amax / 127 both
    torch.testing.assert_close(got.k_scale, want.k_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.k_mean, want.k_mean, rtol=0, atol=1e-5)  # fp32 partial sums vs float64
    # smoothing moved the channel offsets out of the codes: K's blocks now use the INT8 range on the spread
    assert want.k_mean.abs().mean() > 3 and (want.k_scale.mean() < 0.5 * quantize_qk_reference(
        q, k, block_q=32, block_k=16, smooth=False).k_scale.mean())


def test_quantize_v_matches_reference(gen):
    from kernels.quantized_attention.quantize import mma_key_positions, quantize_v_triton

    _, _, v = draw(2, 1, 53, 3, 64, torch.bfloat16, gen)
    v[..., 5] *= 40  # a loud channel: per-channel scales keep the others' resolution
    got_t, scale = quantize_v_triton(v, emulate=True, block=32)
    want, want_scale = quantize_v_reference(v)
    assert got_t.shape == (2, 3, 64, 64) and got_t.dtype == torch.float8_e4m3fn  # V^T, keys padded to the tile
    in_key_order = got_t.double()[..., mma_key_positions(64)]  # V^T's columns hold the keys in the MMA's order
    codes = in_key_order[..., :53].permute(0, 3, 1, 2)  # back to [B, N, H, D]
    step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2.0 ** -6))) - 3)  # e4m3's grid step at the value
    codes_agree(codes, want, step)
    assert torch.equal(in_key_order[..., 53:], torch.zeros(2, 3, 64, 11, dtype=torch.float64))  # padding
    assert not torch.equal(in_key_order, got_t.double())  # the order is not the identity
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert want.abs().amax(1).min() == 448  # every channel spends the whole e4m3 range


# --- the attention kernel ------------------------------------------------------------------------------------------
# (query stream sizes, key stream sizes) as [video | reference | context]; prototype cases give (frames, tokens per
# frame, prototype tokens per frame) instead. With 16-token tiles these give blocks straddling every boundary,
# empty streams, key lengths cutting into the context and reference queries with no reference key (rows of 0)
CASES = {
    "full-3stream-keylen-d64-bf16-fp8": dict(mask="full", q=(37, 11, 13), k=(37, 11, 13), lengths=True, pv="fp8"),
    "full-3stream-d128-fp16-16bit": dict(mask="full", q=(37, 11, 13), k=(37, 11, 13), head_dim=128,
                                         dtype=torch.float16, pv="16bit"),
    "full-no-reference-keylen-16bit": dict(mask="full", q=(37, 0, 13), k=(37, 0, 13), lengths=True, pv="16bit"),
    "isolated-3stream-keylen-16bit": dict(mask="isolated", q=(37, 11, 13), k=(37, 11, 13), lengths=True,
                                          pv="16bit"),
    "isolated-20-40-9-fp16-fp8": dict(mask="isolated", q=(20, 40, 9), k=(20, 40, 9), dtype=torch.float16, pv="fp8"),
    "isolated-no-reference-keys-d128-fp8": dict(mask="isolated", q=(5, 11, 13), k=(37, 0, 13), head_dim=128,
                                                pv="fp8"),
    "isolated-video-queries-fp8": dict(mask="isolated", q=(37, 0, 0), k=(37, 11, 13), pv="fp8"),
    "prototype-d64-fp8": dict(mask="prototype", frames=(3, 6, 4), pv="fp8"),
    "prototype-video-queries-d128-fp16-16bit": dict(mask="prototype", frames=(4, 5, 3), video_queries=True,
                                                    head_dim=128, dtype=torch.float16, pv="16bit"),
    # the MMDiT's PPA: a text stream after the prototypes, its padding cut by key lengths
    "prototype-context-keylen-fp8": dict(mask="prototype", frames=(3, 6, 4), context=13, lengths=True, pv="fp8"),
}


def case_setup(case: dict) -> tuple[int, int, dict]:
    """(n_q, n_k, the attention's stream keywords) of a case."""
    if case["mask"] == "prototype":
        frames, per_frame, proto = case["frames"]
        video, context = frames * per_frame, case.get("context", 0)
        n_k = video + frames * proto + context
        n_q = video if case.get("video_queries") else n_k
        lengths = torch.tensor([n_k, n_k - context // 2]) if case.get("lengths") else None
        return n_q, n_k, dict(q_offsets=(video, min(n_q, n_k - context)), k_offsets=(video, n_k - context),
                              mask="prototype", tokens_per_frame=per_frame, proto_tokens=proto, key_lengths=lengths)
    q_sizes, k_sizes = case["q"], case["k"]
    n_k = sum(k_sizes)
    lengths = torch.tensor([n_k, k_sizes[0] + k_sizes[1] + k_sizes[2] // 2]) if case.get("lengths") else None
    return sum(q_sizes), n_k, dict(q_offsets=(q_sizes[0], q_sizes[0] + q_sizes[1]),
                                   k_offsets=(k_sizes[0], k_sizes[0] + k_sizes[1]), mask=case["mask"],
                                   key_lengths=lengths)


def rows_with_keys(kw: dict, batch: int, n_q: int, heads: int, n_k: int) -> torch.Tensor:
    """[B, Nq, H]: the query rows the mask leaves at least one key."""
    allowed = attention_mask(n_q, n_k, kw["q_offsets"], kw["k_offsets"], kw["mask"], kw.get("tokens_per_frame", 1),
                             kw.get("proto_tokens", 1), key_lengths=kw.get("key_lengths"))
    allowed = torch.ones(n_q, n_k, dtype=torch.bool) if allowed is None else allowed
    return allowed.reshape(-1, *allowed.shape[-2:]).expand(batch, n_q, n_k).any(-1)[..., None].expand(-1, -1, heads)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64(name, gen):
    """The kernel (poisoned output) against the reference of the same quantisation and against exact attention;
    rows with no allowed key give 0."""
    from kernels.quantized_attention.kernel import quantized_attention_triton

    case = CASES[name]
    dtype, head_dim, pv = case.get("dtype", torch.bfloat16), case.get("head_dim", 64), case["pv"]
    n_q, n_k, kw = case_setup(case)
    q, k, v = draw(2, n_q, n_k, 2 if head_dim == 64 else 1, head_dim, dtype, gen)
    out = torch.full_like(q, float("nan"))
    result = quantized_attention_triton(q, k, v, **kw, pv=pv, out=out)
    assert result is out
    want = quantized_attention_reference(q, k, v, **kw, pv=pv, block_q=TILE, block_k=TILE)
    exact = rotated_attention_reference(q.double(), k.double(), v.double(), **kw)
    has_key = rows_with_keys(kw, *q.shape[:3], n_k)
    assert not out.isnan().any(), "unwritten or NaN outputs"
    assert torch.equal(out[~has_key], torch.zeros_like(out[~has_key])), "rows without a key give 0"
    assert rel_err(out[has_key], want[has_key]) < KERNEL_VS_REFERENCE[pv, dtype]
    assert rel_err(out[has_key], exact[has_key]) < EXACT_RATIO * rel_err(want[has_key], exact[has_key])


def test_gpu_sized_tiles(gen):
    """64-row query tiles over 32-key tiles (one block straddling video | prototype, prototype ranges starting
    inside a tile): the quantisation blocks follow the tiles."""
    from kernels.quantized_attention.kernel import quantized_attention_triton

    n_q, n_k, kw = case_setup(dict(mask="prototype", frames=(5, 13, 7)))
    q, k, v = draw(1, n_q, n_k, 2, 64, torch.bfloat16, gen)
    out = torch.full_like(q, float("nan"))
    quantized_attention_triton(q, k, v, **kw, pv="fp8", out=out,
                               config=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1))
    want = quantized_attention_reference(q, k, v, **kw, pv="fp8", block_q=64, block_k=32)
    assert rel_err(out, want) < KERNEL_VS_REFERENCE["fp8", torch.bfloat16]


def test_key_tiles_of_several_blocks(gen):
    """The Hopper shape in small: key tiles of two and four K blocks (one scale per block, applied per column of the
    tile), with every mask's ranges starting and ending inside tiles; the same arithmetic as the reference with K's
    block, whatever the tile (measured 0.0095 prototype, 0.0026 isolated)."""
    from kernels.quantized_attention.kernel import quantized_attention_triton

    for case, tile in ((dict(mask="prototype", frames=(5, 13, 7), context=9, lengths=True), 32),
                       (dict(mask="isolated", q=(37, 11, 13), k=(37, 11, 13), lengths=True), 64)):
        n_q, n_k, kw = case_setup(case)
        q, k, v = draw(2, n_q, n_k, 2, 64, torch.bfloat16, gen)
        want = quantized_attention_reference(q, k, v, **kw, pv="fp8", block_q=16, block_k=16)
        has_key = rows_with_keys(kw, *q.shape[:3], n_k)
        out = torch.full_like(q, float("nan"))
        quantized_attention_triton(q, k, v, **kw, pv="fp8", out=out,
                                   config=dict(BLOCK_M=16, BLOCK_N=tile, K_BLOCK=16, num_warps=4, num_stages=1))
        assert not out.isnan().any() and torch.equal(out[~has_key], torch.zeros_like(out[~has_key]))
        assert rel_err(out[has_key], want[has_key]) < KERNEL_VS_REFERENCE["fp8", torch.bfloat16], (case, tile)


def _truncate(x: torch.Tensor, mantissa: int) -> torch.Tensor:
    """x rounded toward zero to ``mantissa`` explicit mantissa bits."""
    ulp = torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-300))) - mantissa)
    return torch.sign(x) * torch.floor(x.abs() / ulp) * ulp


def narrow_accumulator_pv(p8: torch.Tensor, v8: torch.Tensor, keys_per_tile: int, mantissa: int = 13) -> torch.Tensor:
    """P8 @ V8 as a model of Hopper's FP8 MMA: each 32-key step's products summed exactly and added to an accumulator
    kept to ``mantissa`` bits (SageAttention 2's "FP22": 13; DeepSeek-V3 measured about 14), truncated (the worst
    case); every ``keys_per_tile`` keys the accumulator is added to the fp32 one (here float64) and restarts at 0."""
    acc = torch.zeros(p8.shape[0], v8.shape[1], dtype=torch.float64)
    for tile in range(0, p8.shape[1], keys_per_tile):
        inner = torch.zeros_like(acc)
        for step in range(tile, min(tile + keys_per_tile, p8.shape[1]), 32):
            inner = _truncate(inner + p8[:, step:step + 32] @ v8[step:step + 32], mantissa)
        acc = acc + inner
    return acc


def test_fp8_accumulation_over_a_hopper_tile_is_bounded(gen):
    """The FP8 P.V MMA sums a whole key tile (256 keys on sm_90, 8 steps of 32) in its narrow accumulator before the
    fp32 one takes it: with a 13-bit accumulator truncating at every step, the error that adds (measured 2.0e-4 and
    2.3e-4 of the output; 1.6e-3 when never restarted) stays below 2% of what rounding P to e4m3 costs anyway (2.1e-2
    and 2.8e-2). A model of the hardware, not the hardware: ``benchmarks.kernels`` measures the kernel on a GPU."""
    from kernels.quantized_attention.kernel import GPU_CONFIGS
    from kernels.quantized_attention.reference import FP8_MAX, round_e4m3

    tile = GPU_CONFIGS[(9, 128)][1]
    for spread in (1.0, 3.0):  # base-2 logits' standard deviation: flat and peaked rows
        s = torch.randn(64, 2048, generator=gen, dtype=torch.float64) * spread
        p = torch.exp2(s - s.amax(1, keepdim=True)) * FP8_MAX
        v = torch.randn(2048, 64, generator=gen, dtype=torch.float64)
        p8, v8 = round_e4m3(p), round_e4m3(v * FP8_MAX / v.abs().amax(0))
        exact = p8 @ v8
        accumulation = rel_err(narrow_accumulator_pv(p8, v8, tile), exact)
        p_rounding = rel_err(exact, p @ v8)
        assert accumulation < 4e-4 and accumulation < 0.02 * p_rounding, (spread, accumulation, p_rounding)
        assert rel_err(narrow_accumulator_pv(p8, v8, 2048), exact) > 2 * accumulation  # the model can fail


def test_smoothing_matters(gen):
    """K with a few large-offset channels (what trained models' keys carry): without smoothing those channels set
    every block's INT8 step and the attention's error grows several-fold; with it, it does not depend on them."""
    from kernels.quantized_attention.kernel import quantized_attention_triton

    n_q, n_k, kw = case_setup(dict(mask="full", q=(48, 16, 0), k=(48, 16, 0)))
    q, k, v = draw(1, n_q, n_k, 2, 64, torch.float32, gen, offset=0.0)
    k[..., :4] += 30.0  # four channels offset by 30 standard deviations
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = rotated_attention_reference(q.double(), k.double(), v.double(), **kw)
    errors = {smooth: rel_err(quantized_attention_triton(q, k, v, **kw, pv="16bit", smooth=smooth), exact)
              for smooth in (True, False)}
    # measured: 0.0156 smoothed, 0.108 without
    assert errors[True] < 0.025 and errors[False] > 4 * errors[True], errors


# --- dispatch and errors ---------------------------------------------------------------------------------------
def test_cpu_dispatch_is_the_reference(gen, monkeypatch):
    """``kernels.attention(precision="int8")`` on CPU tensors runs the float64 reference with the GPU's blocks and
    FP8 P.V (the Hopper arithmetic) and never the kernel; its error against exact attention is the 8-bit one."""
    from kernels.quantized_attention import kernel

    def refuse(*args, **kwargs):
        raise AssertionError("auto must not launch the kernel for CPU tensors")

    monkeypatch.setattr(kernel, "quantized_attention_triton", refuse)
    n_q, n_k, kw = case_setup(CASES["isolated-3stream-keylen-16bit"])
    q, k, v = draw(2, n_q, n_k, 2, 64, torch.float32, gen)
    out = kernels.attention(q, k, v, **kw, precision="int8")
    want = quantized_attention_reference(q, k, v, **kw, pv="fp8", block_q=DEFAULT_BLOCKS[0], block_k=DEFAULT_BLOCKS[1])
    assert torch.equal(out, want)
    exact = rotated_attention_reference(q.double(), k.double(), v.double(), **kw)
    assert 1e-3 < rel_err(out, exact) < 0.05  # 8-bit, not 16-bit, error (measured 0.019)


@pytest.mark.parametrize("changes, message", [
    (dict(q=torch.zeros(1, 6, 2, 64), k=torch.zeros(1, 7, 2, 64), v=torch.zeros(1, 7, 2, 64)), "float16/bfloat16"),
    (dict(q=torch.zeros(1, 6, 2, 96).half(), k=torch.zeros(1, 7, 2, 96).half(), v=torch.zeros(1, 7, 2, 96).half()),
     "head_dim"),
    (dict(pv="fp4"), "pv must be one of"),
    (dict(mask="causal"), "mask must be one of"),
    (dict(k_offsets=(4, 9)), "k_offsets"),
])
def test_bad_inputs_give_one_line_errors(changes, message):
    from kernels.quantized_attention.kernel import quantized_attention_triton

    args = dict(q=torch.zeros(1, 6, 2, 64).half(), k=torch.zeros(1, 7, 2, 64).half(), v=torch.zeros(1, 7, 2, 64).half(),
                q_offsets=(4, 6), k_offsets=(4, 7), pv="fp8") | changes
    with pytest.raises(ValueError, match=message) as err:
        quantized_attention_triton(**args)
    assert "\n" not in str(err.value)


def test_unknown_precision():
    q = torch.zeros(1, 6, 2, 64)
    with pytest.raises(ValueError, match="attention precision must be one of"):
        kernels.attention(q, q, q, q_offsets=(6, 6), k_offsets=(6, 6), precision="fp4")


def test_heads_are_independent_so_ulysses_is_exact(gen):
    """Under Ulysses sequence parallel a rank quantises every token of a subset of heads (after the all-to-all):
    scales, K's mean and V's scales are per head, so the heads' outputs are those of one process bit for bit."""
    n_q, n_k, kw = case_setup(CASES["isolated-3stream-keylen-16bit"])
    q, k, v = draw(2, n_q, n_k, 4, 64, torch.float32, gen)
    whole = quantized_attention_reference(q, k, v, **kw)
    parts = [quantized_attention_reference(q[:, :, h], k[:, :, h], v[:, :, h], **kw) for h in (slice(0, 2), slice(2, 4))]
    assert torch.equal(torch.cat(parts, 2), whole)


@pytest.mark.parametrize("pv", ["fp8", "16bit"])
def test_pointer_entry_equals_descriptor_entry(pv, gen):
    """``_quantized_fwd`` (pointers and strides: what runs before Hopper) on the operands the launcher quantised gives
    the descriptor entry's output bit for bit (isolated mask, three streams, key lengths)."""
    import triton

    from kernels.quantized_attention import kernel
    from kernels.quantized_attention.quantize import quantize_qk_triton, quantize_v_triton

    n_q, n_k, kw = case_setup(CASES["isolated-3stream-keylen-16bit"])
    q, k, v = draw(2, n_q, n_k, 2, 64, torch.bfloat16, gen)
    want = kernel.quantized_attention_triton(q, k, v, **kw, pv=pv)
    config = kernel.INTERPRETER_CONFIG
    quantized = quantize_qk_triton(q, k, block_q=config["BLOCK_M"], block_k=config["BLOCK_N"])
    v_operand, v_scale = (quantize_v_triton(v, emulate=True, block=config["BLOCK_N"]) if pv == "fp8"
                          else (v, quantized.k_scale))
    out = torch.full_like(q, float("nan"))
    args, meta = kernel.pointer_args(quantized, v_operand, v_scale, out, **kw, pv=pv)
    kernel._quantized_fwd[(triton.cdiv(n_q, config["BLOCK_M"]), 2 * 2)](*args, **meta, num_warps=4, num_stages=1)
    assert torch.equal(out, want)
