"""Ulysses sequence parallel and CFG parallel (``engine.runtime.parallel``) on CPU over gloo equal one process.

One spawn of four processes runs every layout in turn (sp=2, sp=3, sp=2 with CFG parallel), each over its own
groups; each rank loads the same weights and inputs and rank 0 writes what it got. Token counts are chosen
so no layout divides them (25 video tokens, 7 reference tokens per view), heads (6) divide 2 and 3. Every case
runs twice: as served by default (within float32 rounding of one process: the CPU's kernels may round a row by
where it sits) and under ``--deterministic`` (``BatchInvariantOps``), where each rank's bits are one process's.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from engine.backbones.families import MMDIT
from engine.backbones.mmdit.model import MultiViewMMDiT
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.config import MvgenConfig
from engine.runtime.batch_invariance import BatchInvariantOps
from engine.runtime.parallel import Collectives, ParallelLayout, ParallelRuntime, SequenceParallel, connect
from engine.runtime.reference_cache import expand_rows
from engine.runtime.step_cache import StepCache
from server.launcher import free_port
from tests.goldens import check_golden

from .conftest import SMALL_WAN, inputs, rel_err

pytestmark = pytest.mark.slow  # spawns four gloo processes

LAYOUTS = {"sp2": ParallelLayout(2), "sp3": ParallelLayout(3), "sp2_cfg": ParallelLayout(2, cfg_parallel=True)}
WORLD = max(layout.world_size for layout in LAYOUTS.values())
VIDEO = (5, 2, 10)  # latent frames, height, width: 5 x 1 x 5 = 25 tokens
REF_HW = (2, 14)  # 1 x 7 = 7 tokens per reference
WIDE = dict(SMALL_WAN, num_attention_heads=6, attention_head_dim=12, added_kv_proj_dim=72)
# the families besides Wan2.1-I2V: T2V (Mv2ID reference-to-video) and a Wan2.2-I2V expert (no CLIP)
FAMILIES = {"joint": {}, "prototype": {}, "t2v": dict(in_channels=16, image_dim=None, added_kv_proj_dim=None),
            "wan22": dict(image_dim=None, added_kv_proj_dim=None), "multiview": dict(view_attention="multiview"),
            "mmdit": {}, "mmdit_multiview": dict(view_attention="multiview"),
            "mmdit_prototype": dict(ref_attention="prototype")}
# HunyuanVideo-I2V (an MMDiT: video, reference and text streams all sharded) with 6 heads of 12
WIDE_MMDIT = dict(
    in_channels=33, out_channels=16, num_attention_heads=6, attention_head_dim=12, num_layers=2, num_single_layers=2,
    num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=False,
    text_embed_dim=20, pooled_projection_dim=12, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
    image_condition_type="latent_concat",
)
# (model, config changes, references, batch, reference cache): every ref_attention mode, with and without
# references; the cached modes build their cache on every rank
CASES = {
    "full": ("joint", {}, 2, 2, False),
    "full_no_refs": ("joint", {}, 0, 2, False),
    "isolated": ("joint", dict(ref_attention="isolated"), 1, 2, False),
    "isolated_cached": ("joint", dict(ref_attention="isolated", ref_timestep="zero"), 2, 2, True),
    "shared_rope_odd_batch": ("joint", dict(ref_rope="shared"), 1, 3, False),
    "prototype": ("prototype", {}, 2, 2, False),
    "prototype_no_refs": ("prototype", {}, 0, 2, False),
    "prototype_cached": ("prototype", dict(ref_timestep="zero"), 2, 2, True),
    "t2v_full": ("t2v", {}, 2, 2, False),
    # Phantom-Wan: references as frames after the video, its three guidance rows split 2 | 1 (+ a pad row)
    "phantom_three_rows": ("t2v", dict(ref_mode="token_concat", ref_rope="shared"), 2, 3, False),
    # MVAnimate Eq. 2: shards start inside a frame (5 tokens per frame), every view read at the aligned cell
    "multiview": ("multiview", {}, 2, 2, False),
    "multiview_cached": ("multiview", dict(ref_attention="isolated", ref_timestep="zero"), 2, 2, True),
    "wan22_isolated_cached": ("wan22", dict(ref_attention="isolated", ref_timestep="zero"), 1, 2, True),
    # Stand-In: references past the video's grid, skipping the cross-attention: one cached row serves every row
    "standin_cached": ("t2v", dict(ref_rope="past_grid", ref_cross_attention=False, ref_attention="isolated",
                                   ref_timestep="zero"), 1, 2, True),
    # 8-bit attention: K's smoothing mean over the whole sequence (each rank holds every token of its heads)
    "int8": ("joint", dict(attention_precision="int8"), 2, 2, False),
    # TeaCache over 4 steps (engine.runtime.step_cache): every rank takes the one-process decisions (sums over all ranks)
    "step_cached": ("joint", {}, 2, 2, False),
    "step_cached_odd_batch": ("joint", {}, 1, 3, False),
    # the MMDiT: a triple-stream joint attention (text padding masked by key lengths), its reference cache, TeaCache
    "mmdit_full": ("mmdit", {}, 2, 2, False),
    "mmdit_no_refs_odd_batch": ("mmdit", {}, 0, 3, False),
    "mmdit_isolated_cached": ("mmdit", dict(ref_attention="isolated", ref_timestep="zero"), 2, 2, True),
    "mmdit_step_cached": ("mmdit", {}, 1, 2, False),
    # the seed modes on the MMDiT: Eq. 2 over views gathered from every rank; PPA's prototypes with the text stream
    "mmdit_multiview": ("mmdit_multiview", {}, 2, 2, False),
    "mmdit_multiview_cached": ("mmdit_multiview", dict(ref_attention="isolated", ref_timestep="zero"), 2, 2, True),
    "mmdit_prototype": ("mmdit_prototype", {}, 2, 2, False),
    "mmdit_prototype_cached": ("mmdit_prototype", dict(ref_timestep="zero"), 2, 2, True),
}


def model_config(kind: str) -> MvgenConfig:
    if kind.startswith("mmdit"):
        return MvgenConfig.from_dict(MMDIT.config_values(WIDE_MMDIT), **FAMILIES[kind])
    return MvgenConfig.from_dict({**WIDE, **FAMILIES[kind]}, ref_attention="prototype" if kind == "prototype" else "full")


def build_model(kind: str, seed: int = 0) -> MultiViewWanTransformer:
    torch.manual_seed(seed)
    model_class = MultiViewMMDiT if kind.startswith("mmdit") else MultiViewWanTransformer
    model = model_class(model_config(kind)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights everywhere (biases, modulation, reference stream)
            p.add_(torch.randn_like(p) * 0.05)
    return model


def case_inputs(name: str) -> dict:
    kind, _, refs, batch, _ = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if kind.startswith("mmdit"):
        cfg = model_config(kind)
        text_mask = torch.zeros(batch, cfg.text_len)
        for row in range(batch):  # a full prompt, then shorter ones: padding masked by key lengths
            text_mask[row, :cfg.text_len // (row + 1) - 3 * row] = 1
        x = dict(latents=torch.randn(batch, 16, *VIDEO, generator=gen),
                 condition=torch.randn(batch, cfg.condition_channels, *VIDEO, generator=gen),
                 timestep=torch.rand(batch, generator=gen) * 1000,
                 text=torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen), text_mask=text_mask,
                 pooled_text=torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
                 ref_latents=torch.randn(batch, refs, 16, *REF_HW, generator=gen))
    else:
        x = inputs(gen, batch=batch, frames=VIDEO[0], height=VIDEO[1], width=VIDEO[2], refs=refs, ref_hw=REF_HW,
                   config=model_config(kind))
    if kind.endswith("prototype"):
        x["frame_pose"] = torch.rand(batch, VIDEO[0], 3, *VIDEO[1:], generator=gen) * 2 - 1
        x["ref_pose"] = torch.rand(batch, refs, 3, *REF_HW, generator=gen) * 2 - 1
    return x


STEP_TIMESTEPS = (990.0, 985.0, 980.0, 600.0)
STEP_THRESHOLD = 0.2


def run_steps(model: MultiViewWanTransformer, x: dict, runtime: ParallelRuntime | None) -> torch.Tensor:
    """Four calls of one request with a step cache: the outputs stacked, then the decisions (1 = skipped)."""
    cache, outs, skipped = StepCache(STEP_THRESHOLD), [], []
    for i, t in enumerate(STEP_TIMESTEPS):
        call = dict(x, latents=x["latents"] * (1 + 0.01 * i), timestep=torch.full_like(x["timestep"], t))
        before = cache.skipped
        outs.append(model(**call, step_cache=cache) if runtime is None else runtime.forward(model, call,
                                                                                          step_cache=cache))
        skipped.append(float(cache.skipped > before))
    return torch.cat([torch.stack(outs).flatten(), torch.tensor(skipped)])


def run_case(model: MultiViewWanTransformer, name: str, x: dict, runtime: ParallelRuntime | None,
             exact: bool = False) -> torch.Tensor:
    """One case's output; ``exact``: under ``--deterministic``'s batch-invariant ops."""
    with BatchInvariantOps() if exact else contextlib.nullcontext():
        return _run_case(model, name, x, runtime)


def _run_case(model: MultiViewWanTransformer, name: str, x: dict, runtime: ParallelRuntime | None) -> torch.Tensor:
    kind, changes, refs, _, cached = CASES[name]
    if name.startswith("step_cached"):
        return run_steps(model, x, runtime)
    base = model.config
    model.config = base.replace(**changes)
    try:
        x = dict(x)
        cache = None
        if cached and refs:
            extras = {k: x[k] for k in ("text_mask", "pooled_text") if k in x}
            if model.config.shares_reference_rows:  # built from row 0 and read by every row, as the denoiser does
                first = {k: None if x.get(k) is None else x[k][:1] for k in ("ref_latents", "text", "image_context")}
                cache = expand_rows(model.precompute_reference(first["ref_latents"], first["text"],
                                                               first["image_context"], VIDEO, **extras),
                                    x["latents"].shape[0])
            else:
                cache = model.precompute_reference(x["ref_latents"], x["text"], x.get("image_context"), VIDEO,
                                                   **extras)
            x["ref_latents"] = None
        if runtime is None:
            return model(**x, ref_cache=cache)
        return runtime.forward(model, x, cache)
    finally:
        model.config = base


def _rank_main(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, WORLD, rank == 0, timeout=datetime.timedelta(seconds=60))
    models = {kind: build_model(kind) for kind in FAMILIES}
    for kind, model in models.items():
        model.load_state_dict(load_file(os.path.join(folder, f"{kind}.safetensors")))
    got = {}
    for layout_name, layout in LAYOUTS.items():
        if rank >= layout.world_size:
            continue
        runtime = connect(layout, rank, dist.PrefixStore(layout_name, store), timeout_s=60)
        for model in models.values():
            model.parallelize(runtime.sp)
        for name in CASES:
            x = {k: v for k, v in load_file(os.path.join(folder, f"in_{name}.safetensors")).items()}
            x.setdefault("condition", None)  # absent on T2V
            x.setdefault("image_context", None)  # absent without CLIP
            sent = runtime.sp.comm.bytes_sent
            out = run_case(models[CASES[name][0]], name, x, runtime)
            sent = runtime.sp.comm.bytes_sent - sent
            exact = run_case(models[CASES[name][0]], name, x, runtime, exact=True)
            if rank == 0:
                got[f"{layout_name}/{name}"] = out.contiguous()
                got[f"{layout_name}/{name}/exact"] = exact.contiguous()
                got[f"{layout_name}/{name}/bytes"] = torch.tensor([sent])
    if rank == 0:
        save_file(got, os.path.join(folder, "got.safetensors"))
    # every rank stays until rank 0 has written (the store lives in rank 0)
    store.set(f"done{rank}", "1")
    store.wait([f"done{r}" for r in range(WORLD)])


@pytest.fixture(scope="module")
def parallel_outputs(tmp_path_factory):
    """(single-process outputs, every layout's rank-0 outputs) of every case."""
    folder = tmp_path_factory.mktemp("parallel")
    want = {}
    for kind in FAMILIES:
        model = build_model(kind)
        save_file(model.state_dict(), str(folder / f"{kind}.safetensors"))
        for name, case in CASES.items():
            if case[0] == kind:
                x = case_inputs(name)
                save_file({k: v.contiguous() for k, v in x.items() if v is not None},
                          str(folder / f"in_{name}.safetensors"))
                with torch.no_grad():
                    want[name] = run_case(model, name, x, None)
                    want[f"{name}/exact"] = run_case(model, name, x, None, exact=True)
    mp.start_processes(_rank_main, args=(free_port(), str(folder)), nprocs=WORLD, start_method="spawn")
    return want, load_file(str(folder / "got.safetensors"))


@pytest.mark.golden
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_equals_one_process(parallel_outputs, layout, case):
    want, got = parallel_outputs
    out = got[f"{layout}/{case}"]
    check_golden(f"parallel_{layout}_{case}", {"parallel": out, "one_process": want[case]})
    if case.startswith("step_cached"):  # the same decisions, and some steps skipped
        decisions = want[case][-len(STEP_TIMESTEPS):]
        assert torch.equal(out[-len(STEP_TIMESTEPS):], decisions) and 0 < decisions.sum() < len(STEP_TIMESTEPS) - 1
    assert out.shape == want[case].shape
    assert rel_err(out, want[case]) < 1e-5
    assert (out - want[case]).abs().max().item() < 1e-5 * max(1.0, want[case].abs().max().item())


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_parallel_is_one_process_bit_for_bit(parallel_outputs, layout, case):
    """Under ``--deterministic`` sequence and CFG parallel change no bit: every rank's rows are computed by
    kernels that do not look at the batch or at where a token sits (``engine.runtime.batch_invariance``)."""
    want, got = parallel_outputs
    assert torch.equal(got[f"{layout}/{case}/exact"], want[f"{case}/exact"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_traffic_is_the_cost_model(parallel_outputs, layout):
    """The bytes rank 0 sent in the joint ``full`` case: the all-to-alls ``mvgen bench comm`` counts (float32
    here), plus the one all-gather of the output tokens (counted once: this rank's shard)."""
    from benchmarks.sp_comm import ulysses_bytes

    _, got = parallel_outputs
    sp, rows = LAYOUTS[layout].sp, 1 if LAYOUTS[layout].cfg_parallel else CASES["full"][3]
    cfg = model_config("joint")
    n_video = VIDEO[0] * (VIDEO[1] // 2) * (VIDEO[2] // 2)
    n_ref = CASES["full"][2] * (REF_HW[0] // 2) * (REF_HW[1] // 2)
    all_to_all = cfg.num_layers * ulysses_bytes((n_video, n_ref), cfg.num_attention_heads, cfg.attention_head_dim,
                                                sp, rows, dtype_bytes=4)
    gather = rows * -(-n_video // sp) * 16 * 4 * 4  # [rows, shard, 16 x 1x2x2 channels] float32
    assert got[f"{layout}/full/bytes"].item() == all_to_all + gather


def test_layout_refuses_heads_not_divisible():
    with pytest.raises(ValueError, match="divisible by sp; this model has 6 heads"):
        ParallelLayout(4).check_heads(6)
    model = build_model("joint")
    with pytest.raises(ValueError, match="6 heads"):
        model.parallelize(SequenceParallel(Collectives(None, 0, 4)))


@pytest.mark.parametrize("sp", [0, -1, 1.5])
def test_layout_refuses_bad_sp(sp):
    with pytest.raises(ValueError, match="sp .*positive integer"):
        ParallelLayout(sp)
