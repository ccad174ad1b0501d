"""The joint-attention kernel (through Triton's interpreter) against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels.joint_attention import joint_attention_reference
from tests.kernels.conftest import needs_interpreter

pytestmark = needs_interpreter

# relative Frobenius error allowed per input dtype (inputs are rounded to the dtype before the oracle runs)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(TOLERANCE)


def grid_positions(t_values, height: int, width: int, h0: int = 0, w0: int = 0) -> torch.Tensor:
    """(t, h, w) integer positions of a [len(t_values), height, width] token grid, row-major."""
    t, h, w = torch.meshgrid(torch.as_tensor(t_values), torch.arange(height) + h0, torch.arange(width) + w0,
                             indexing="ij")
    return torch.stack([t, h, w], -1).reshape(-1, 3)


def rd_rope(num_refs: int, height: int, width: int, stride: int = 7) -> torch.Tensor:
    """RD-RoPE-style reference positions: reference k at t = -(k + 1) * stride, grid shifted negative in w."""
    return torch.cat([grid_positions([-(k + 1) * stride], height, width, w0=-2) for k in range(num_refs)])


def make_case(case: dict, gen: torch.Generator) -> dict:
    """Positions, token counts and key scales of a case; q/k/v are drawn by ``draw``."""
    frames, height, width = case["video"]
    video = grid_positions(range(frames), height, width)
    mask = case["mask"]
    if mask == "prototype":
        other = grid_positions(range(frames), 1, case["proto_tokens"], h0=-3)  # frame f's prototype at t = f
    elif case.get("ref_rope") == "none":
        other = torch.zeros(case["refs"] * case["ref_hw"][0] * case["ref_hw"][1], 3, dtype=torch.long)
    else:
        other = rd_rope(case["refs"], *case["ref_hw"])
    k_pos = torch.cat([video, other])
    q_pos = video if case.get("video_queries_only") else k_pos
    n_k = k_pos.shape[0]
    key_scale = None
    if case.get("key_scale", True):
        views = torch.rand(max(case.get("refs", 1), 1), generator=gen) * 1.5 + 0.25  # omega_m per view
        key_scale = torch.cat([torch.ones(video.shape[0]), views.repeat_interleave(
            math.ceil(other.shape[0] / views.numel()))[: other.shape[0]]])
    return dict(q_pos=q_pos, k_pos=k_pos, q_offsets=(video.shape[0], q_pos.shape[0]),
                k_offsets=(video.shape[0], n_k), mask=mask,
                tokens_per_frame=height * width, proto_tokens=case.get("proto_tokens", 1), key_scale=key_scale,
                n_k=n_k, sm_scale=case.get("sm_scale"))


def draw(batch, n_q, n_k, heads, head_dim, dtype, gen, packed=False):
    """q, k, v rounded to ``dtype``; ``packed`` takes them as strided views of one [B, N, 3, H, D] tensor."""
    if packed:
        qkv = torch.randn(batch, n_q, 3, heads, head_dim, generator=gen).to(dtype)
        return qkv.unbind(2)
    q = (2 * torch.randn(batch, n_q, heads, head_dim, generator=gen)).to(dtype)
    k = torch.randn(batch, n_k, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, n_k, heads, head_dim, generator=gen).to(dtype)
    return q, k, v


CASES = {
    # video (F, H, W) tokens; refs x ref_hw reference tokens
    "full-1ref-d64": dict(video=(2, 3, 5), refs=1, ref_hw=(4, 4), mask="full", head_dim=64, heads=2, batch=1),
    "full-5refs-d128": dict(video=(2, 3, 3), refs=5, ref_hw=(2, 3), mask="full", head_dim=128, heads=1, batch=2),
    "isolated-1ref-d128": dict(video=(3, 2, 3), refs=1, ref_hw=(3, 5), mask="isolated", head_dim=128, heads=1,
                               batch=1),
    "isolated-5refs-d64": dict(video=(2, 2, 5), refs=5, ref_hw=(3, 3), mask="isolated", head_dim=64, heads=2,
                               batch=1),
    "isolated-video-queries": dict(video=(2, 3, 3), refs=3, ref_hw=(2, 4), mask="isolated", head_dim=64, heads=1,
                                   batch=2, video_queries_only=True),
    "prototype-d64": dict(video=(3, 2, 3), proto_tokens=4, mask="prototype", head_dim=64, heads=2, batch=1),
    "prototype-d128-video-queries": dict(video=(4, 3, 3), proto_tokens=3, mask="prototype", head_dim=128, heads=1,
                                         batch=1, video_queries_only=True),
    "full-no-key-scale-sm-scale": dict(video=(1, 4, 5), refs=1, ref_hw=(3, 3), mask="full", head_dim=64, heads=1,
                                       batch=1, key_scale=False, sm_scale=0.07),
    "full-ref-rope-none": dict(video=(2, 2, 4), refs=2, ref_hw=(2, 2), mask="full", head_dim=128, heads=1,
                               batch=1, ref_rope="none"),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, dtype, backend, gen):
    """The prologue + attention pair on each backend against the float64 oracle (RoPE inside the softmax)."""
    case = CASES[name]
    setup = make_case(case, gen)
    n_q, n_k = setup["q_pos"].shape[0], setup.pop("n_k")
    q, k, v = draw(case["batch"], n_q, n_k, case["heads"], case["head_dim"], dtype, gen)
    oracle_kw = dict(setup, key_scale=None if setup["key_scale"] is None else setup["key_scale"].double())
    ref = joint_attention_reference(q.double(), k.double(), v.double(), **oracle_kw)
    out = torch.full_like(q, float("nan"))
    result = kernels.joint_attention(q, k, v, **setup, backend=backend, out=out)
    assert result is out
    assert not out.isnan().any(), "unwritten or NaN outputs"
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_of_packed_qkv(dtype, gen):
    """q, k, v as views of one packed projection (token stride 3*H*D), negative positions, two heads."""
    n = 29
    q, k, v = draw(2, n, n, 2, 64, dtype, gen, packed=True)
    pos = torch.randint(-40, 40, (n, 3), generator=gen)
    kw = dict(q_offsets=(20, n), k_offsets=(20, n), mask="isolated", key_scale=torch.rand(n, generator=gen) + 0.5)
    ref = joint_attention_reference(q.double(), k.double(), v.double(), pos, pos,
                                    **dict(kw, key_scale=kw["key_scale"].double()))
    out = kernels.joint_attention(q, k, v, pos, pos, **kw, backend="triton")
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_auto_on_cpu_is_the_reference(gen, monkeypatch):
    from kernels.joint_attention import kernel

    def refuse(*args, **kwargs):
        raise AssertionError("auto must not launch the kernel for CPU tensors")

    monkeypatch.setattr(kernel, "attention_triton", refuse)
    q, k, v = draw(1, 12, 12, 2, 64, torch.bfloat16, gen)
    pos = torch.randint(-5, 5, (12, 3), generator=gen)
    kw = dict(q_offsets=(8, 12), k_offsets=(8, 12), mask="prototype", tokens_per_frame=4, proto_tokens=2)
    assert kernels.attention_path("auto", q, "prototype") == "reference"
    out = kernels.joint_attention(q, k, v, pos, pos, **kw)
    assert torch.equal(kernels.joint_attention(q, k, v, pos, pos, **kw, backend="reference"), out)
    want = joint_attention_reference(q.double(), k.double(), v.double(), pos, pos, **kw)
    assert rel_err(out, want) < TOLERANCE[torch.bfloat16]


def _bad(**changes):
    """Valid arguments for a small problem, with ``changes`` applied."""
    q = torch.zeros(1, 6, 2, 64)
    args = dict(q=q, k=torch.zeros(1, 7, 2, 64), v=torch.zeros(1, 7, 2, 64), q_pos=torch.zeros(6, 3, dtype=torch.long),
                k_pos=torch.zeros(7, 3, dtype=torch.long), q_offsets=(4, 6), k_offsets=(4, 7))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(q=torch.zeros(1, 6, 2, 96), k=torch.zeros(1, 7, 2, 96), v=torch.zeros(1, 7, 2, 96)), "head_dim"),
    (dict(k=torch.zeros(1, 7, 2, 64, dtype=torch.float16)), "share a dtype"),
    (dict(q=torch.zeros(1, 6, 2, 64, dtype=torch.float64)), "dtype must be one of"),
    (dict(v=torch.zeros(1, 8, 2, 64)), "k and v must be"),
    (dict(q=torch.zeros(1, 6, 64, 2).transpose(2, 3)), "contiguous in head_dim"),
    (dict(q_pos=torch.zeros(6, 3)), "q_pos must be integer"),
    (dict(k_pos=torch.zeros(6, 3, dtype=torch.long)), "k_pos must be integer \\[7, 3\\]"),
    (dict(key_scale=torch.ones(6)), "key_scale must be \\[7\\]"),
    (dict(k_offsets=(4, 9)), "k_offsets"),
    (dict(mask="causal"), "mask must be one of"),
    (dict(tokens_per_frame=0), "tokens_per_frame"),
    (dict(out=torch.zeros(1, 6, 2, 32)), "out must be"),
])
def test_bad_inputs_give_one_line_errors(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        kernels.joint_attention(**_bad(**changes), backend="triton")
    assert "\n" not in str(err.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.joint_attention(**_bad(), backend="cuda")


def test_autotune_prune_keeps_a_config():
    from kernels.joint_attention import kernel

    configs = kernel._attention_tuned.configs
    for n_q in (1, 128, 131072):  # the autotuner's key is the bucketed count
        for head_dim in kernel.HEAD_DIMS:
            for precision in ("tf32", "ieee"):
                for mask, mode in kernel.MASK_IDS.items():
                    kept = kernel._prune_configs(configs, dict(q_bucket=n_q), HEAD_DIM=head_dim,
                                                 DOT_PRECISION=precision, MASK_MODE=mode)
                    assert kept and all(c in configs for c in kept)
                    if mask == "prototype":  # the configs compile_check saw spill are never tried
                        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in kept)


@pytest.mark.parametrize("block_m, block_n", [(64, 32), (32, 64)])
def test_gpu_sized_tiles(block_m, block_n, gen):
    """Tiles as large as the autotune configs' (every query block straddles a boundary), on the rotated
    attention kernel after the prologue."""
    from kernels.joint_attention.kernel import attention_triton

    case = CASES["prototype-d64"] | dict(video=(5, 3, 5))
    setup = make_case(case, gen)
    n_q, n_k = setup["q_pos"].shape[0], setup.pop("n_k")
    q, k, v = draw(1, n_q, n_k, 1, 64, torch.float32, gen)
    ref = joint_attention_reference(q.double(), k.double(), v.double(),
                                    **dict(setup, key_scale=setup["key_scale"].double()))
    attn = {k: setup.pop(k) for k in ("q_offsets", "k_offsets", "mask", "tokens_per_frame", "proto_tokens")}
    q_rot, k_rot = kernels.qk_prologue(q, k, setup["q_pos"], setup["k_pos"], q_scale=kernels.LOG2E / 8,
                                       key_scale=setup["key_scale"], backend="triton")
    out = attention_triton(q_rot, k_rot, v, **attn, config=dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
                                                                num_stages=1, WARP_SPECIALIZE=False))
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


# --- three streams by offsets, per-row key lengths ------------------------------------------------------------
# (video, reference, context) token counts of the queries and of the keys; with the interpreter's 16-row query
# blocks these give blocks wholly inside a stream, blocks straddling video|reference and reference|context,
# empty streams, and reference queries without reference keys (rows with no key under ``isolated``)
STREAM_CASES = {
    "37-11-13": dict(q=(37, 11, 13), k=(37, 11, 13)),
    "20-40-9": dict(q=(20, 40, 9), k=(20, 40, 9)),
    "no-reference": dict(q=(37, 0, 13), k=(37, 0, 13)),
    "no-video": dict(q=(0, 11, 13), k=(0, 11, 13)),
    "no-context": dict(q=(37, 11, 0), k=(37, 11, 0)),
    "video-queries-only": dict(q=(37, 0, 0), k=(37, 11, 13)),
    "reference-queries-no-reference-keys": dict(q=(5, 11, 13), k=(37, 0, 13), head_dim=128),
}


def stream_offsets(sizes) -> tuple[int, int]:
    return sizes[0], sizes[0] + sizes[1]


def ragged_lengths(sizes) -> torch.Tensor:
    """Key lengths of three batch rows: every key, half the context padded, all the context padded."""
    n_k, ctx = sum(sizes), sizes[0] + sizes[1]
    return torch.tensor([n_k, ctx + sizes[2] // 2, ctx])


# ``prototype``: video tokens per frame and prototype tokens per frame of the stream cases (awkward: the last
# frames' prototypes run past the reference stream, which the mask must clip)
PROTOTYPE_LAYOUT = dict(tokens_per_frame=6, proto_tokens=2)


def stream_oracle(q, k, v, q_sizes, k_sizes, mask, key_lengths):
    """float64 softmax over the allowed keys of base-2 logits ``q . k``, the allowed set written per (row, query,
    key) from the stream definitions; rows with no allowed key come back 0 with ``has_key`` False."""
    def stream(i, sizes):
        return 0 if i < sizes[0] else (1 if i < sizes[0] + sizes[1] else 2)

    def sees(i, j):
        qs, ks = stream(i, q_sizes), stream(j, k_sizes)
        if mask == "full":
            return True
        if mask == "isolated":  # reference queries see reference keys only
            return qs != 1 or ks == 1
        if qs == 0:  # prototype: a video query sees video keys, its own frame's prototype, the context
            frame = i // PROTOTYPE_LAYOUT["tokens_per_frame"]
            return ks != 1 or (j - k_sizes[0]) // PROTOTYPE_LAYOUT["proto_tokens"] == frame
        return ks != 1 if qs == 2 else ks != 0  # context: video and context keys; reference range: non-video

    batch, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    allowed = torch.zeros(batch, n_q, n_k, dtype=torch.bool)
    for b in range(batch):
        length = n_k if key_lengths is None else int(key_lengths[b])
        for i in range(n_q):
            for j in range(min(length, n_k)):
                allowed[b, i, j] = sees(i, j)
    logits = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * math.log(2.0)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)  # rows without a key: 0
    out = torch.einsum("bhij,bjhd->bihd", weights, v.double())
    return out, allowed.any(-1)  # [B, Nq, H, D], [B, Nq]


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [False, True], ids=["all-keys", "key-lengths"])
@pytest.mark.parametrize("mask", ["full", "isolated", "prototype"])
@pytest.mark.parametrize("name", list(STREAM_CASES))
def test_three_streams_match_float64_oracle(name, mask, lengths, dtype, backend, gen):
    """``kernels.attention`` on rotated Q/K over [video | reference | context] streams given by offsets, with and
    without per-row key lengths, against the float64 oracle on the rows that have a key (the kernel gives 0 on
    the others, the reference NaN)."""
    case = STREAM_CASES[name]
    q_sizes, k_sizes, head_dim = case["q"], case["k"], case.get("head_dim", 64)
    n_q, n_k = sum(q_sizes), sum(k_sizes)
    q, k, v = draw(3, n_q, n_k, 2, head_dim, dtype, gen)
    q = (q.double() * kernels.LOG2E / math.sqrt(head_dim)).to(dtype)  # what the prologue folds into Q
    key_lengths = ragged_lengths(k_sizes) if lengths else None
    want, has_key = stream_oracle(q, k, v, q_sizes, k_sizes, mask, key_lengths)
    out = torch.full_like(q, float("nan"))  # poisoned
    layout = PROTOTYPE_LAYOUT if mask == "prototype" else {}
    result = kernels.attention(q, k, v, q_offsets=stream_offsets(q_sizes), k_offsets=stream_offsets(k_sizes),
                               key_lengths=key_lengths, mask=mask, backend=backend, out=out, **layout)
    assert result is out
    assert not out[has_key].isnan().any(), "unwritten or NaN outputs"
    if backend == "triton":
        assert torch.equal(out[~has_key], torch.zeros_like(out[~has_key])), "rows without a key give 0"
    assert rel_err(out[has_key], want[has_key]) < TOLERANCE[dtype]


@pytest.mark.parametrize("block_m, block_n", [(32, 16), (16, 32)])
def test_three_streams_gpu_sized_tiles(block_m, block_n, gen):
    """Larger tiles than the interpreter's default: a 32-row block holding all three query streams, with key
    lengths cutting into the context (fp32)."""
    from kernels.joint_attention.kernel import attention_triton

    sizes = (21, 9, 17)
    q, k, v = draw(3, 47, 47, 2, 64, torch.float32, gen)
    q = q * kernels.LOG2E / 8
    key_lengths = torch.tensor([47, 36, 30], dtype=torch.int32)
    for mask in ("full", "isolated", "prototype"):
        want, _ = stream_oracle(q, k, v, sizes, sizes, mask, key_lengths)
        out = attention_triton(q, k, v, q_offsets=(21, 30), k_offsets=(21, 30), key_lengths=key_lengths, mask=mask,
                               config=dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1,
                                           WARP_SPECIALIZE=False), **(PROTOTYPE_LAYOUT if mask == "prototype" else {}))
        assert rel_err(out, want) < TOLERANCE[torch.float32]


def test_attention_mask_of_three_streams():
    """The reference's boolean mask: ``isolated`` isolates only the reference queries; key lengths cut every
    query's keys per batch row ([B, 1, Nq, Nk])."""
    from kernels.joint_attention import attention_mask

    q_sizes = k_sizes = (3, 2, 4)
    mask = attention_mask(9, 9, (3, 5), (3, 5), "isolated")
    assert mask.shape == (9, 9)
    assert mask[[0, 1, 2, 5, 6, 7, 8]].all() and mask[3:5].sum() == 4 and mask[3:5, 3:5].all()
    lengths = torch.tensor([9, 6, 5])
    full = attention_mask(9, 9, (3, 5), (3, 5), "full", key_lengths=lengths)
    assert full.shape == (3, 1, 1, 9)  # the same for every query: broadcast
    assert [int(full[b, 0, 0].sum()) for b in range(3)] == [9, 6, 5]
    oracle_allowed = stream_oracle(torch.zeros(3, 9, 1, 1), torch.zeros(3, 9, 1, 1), torch.zeros(3, 9, 1, 1),
                                   q_sizes, k_sizes, "isolated", lengths)
    isolated = attention_mask(9, 9, (3, 5), (3, 5), "isolated", key_lengths=lengths)
    assert torch.equal(isolated[:, 0].any(-1), oracle_allowed[1])


def _streams_call(backend, **changes):
    q = torch.zeros(1, 6, 2, 64)
    args = dict(q=q, k=torch.zeros(1, 7, 2, 64), v=torch.zeros(1, 7, 2, 64), q_offsets=(4, 6), k_offsets=(4, 7))
    args.update(changes)
    return lambda: kernels.attention(**args, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("changes, message", [
    (dict(q_offsets=(5, 4)), "q_offsets must satisfy"),
    (dict(q_offsets=(-1, 4)), "q_offsets must satisfy"),
    (dict(k_offsets=(4, 8)), "k_offsets must satisfy"),
    (dict(k_offsets=(4,)), "k_offsets must be"),
    (dict(key_lengths=torch.tensor([3, 4])), "key_lengths must be int32/int64 \\[1\\]"),
    (dict(key_lengths=torch.tensor([3.0])), "key_lengths must be int32/int64"),
    (dict(key_lengths=torch.tensor([8])), "key_lengths must lie in \\[0, 7\\]"),
    (dict(key_lengths=torch.tensor([-1])), "key_lengths must lie"),
])
def test_bad_streams_give_one_line_errors(backend, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        _streams_call(backend, **changes)()
    assert "\n" not in str(err.value)
