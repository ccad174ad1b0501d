"""Memory options: ``--offload`` (engine.runtime.offload), ``--vae-tiling``, ``--dtype`` (auto, and which tensors stay fp32).

What a CPU can show and what it cannot. Offloading moves weights between host memory and an accelerator; here both
are the CPU, so no byte moves and no memory is saved: the peak-memory saving is for a GPU run (the bench) to
report. What these tests do show is that the hooks put every weight where it must be when it is used: each
"offloaded" parameter is pointed at NaNs instead of its host copy, so a weight used while offloaded poisons the
output, and every mode's denoising (joint, cached, PPA, MVAnimate, identity) must still equal the plain model
bit for bit; the hooks' counts show what moved. VAE tiling is checked against diffusers' own tiled decode and
against whole-frame decoding, and its peak memory is measured on the CPU, where it does change.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine import devices
from engine.checkpoint import Checkpoint, VaeTiling
from engine.runtime.denoiser import Denoiser
from engine.devices import default_dtype, resolve_dtype
from engine.runtime.offload import OFFLOAD_MODES, WINDOW, Offload, OffloadedBlocks, apply_offload
from engine.pipeline import LocalStages, MultiViewPipeline
from engine.tiny import TINY_VERSION

SMALL = dict(num_frames=5, height=32, width=32, steps=2, seed=3)
CACHED = dict(ref_attention="isolated", ref_timestep="zero")
# (adapter, config overrides, request inputs of the mode): every path through the layers
PATHS = {
    "joint": ("adapter", {}, {}),
    "cached": ("adapter", CACHED, {}),
    "prototype": ("adapter_prototype", {}, {"frame_pose": 5, "reference_poses": 2}),
    "prototype_cached": ("adapter_prototype", {"ref_timestep": "zero"}, {"frame_pose": 5, "reference_poses": 2}),
    "multiview": ("adapter_multiview", {}, {"view_omega": [0.25, 0.25]}),
    "identity": ("adapter_identity", {}, {"identity": 1}),
}


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return tiny_cache / TINY_VERSION


@pytest.fixture(scope="module")
def pipes(tiny):
    loaded = {}

    def get(path: str) -> MultiViewPipeline:
        if path not in loaded:
            adapter, overrides, _ = PATHS[path]
            loaded[path] = MultiViewPipeline.from_pretrained(tiny, adapter=tiny / adapter, **overrides)
        return loaded[path]

    return get


def _images(rng, count):
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


def _request(pipe, path: str, rng):
    first, *refs = _images(rng, 3)
    values = {}
    for name, value in PATHS[path][2].items():
        values[name] = value if name == "view_omega" else _images(rng, value)
    if "identity" in values:
        values["identity"] = values["identity"][0]
    return pipe.make_request(first_frame=first, references=refs, prompt="a person turns", **SMALL, **values)


def _with_denoiser(pipe: MultiViewPipeline, denoiser: Denoiser) -> MultiViewPipeline:
    """The same encoders and VAE around another denoiser (loading one costs milliseconds; the encoders seconds)."""
    s = pipe.stages
    return MultiViewPipeline(pipe.checkpoint, LocalStages(s.text_encoder, s.image_encoder, s.vae, [denoiser],
                                                          s.reference_cache))


def _poison(offload: Offload) -> None:
    """On the CPU a parameter's host copy is its device copy; point every offloaded one at NaNs instead."""
    for group in offload.groups:
        group.parked = [torch.full_like(t, float("nan")) if t.is_floating_point() else t for t in group.host]
        group.offload()


def _parked(offload: Offload) -> bool:
    """Every tensor of every group points at its parked (poisoned) copy: nothing is left on the device."""
    return all(torch.isnan(t).all() for group in offload.groups for owner, name, is_param, _ in group.slots
               for t in [(owner._parameters if is_param else owner._buffers)[name]] if t.is_floating_point())


# (path, mode, window): window 1 evicts layer i as soon as layer i + 1 is reached, which shows each path lets go of
# a layer when it says it does; not on "prototype", whose reference stream finishes layer i one layer late (WINDOW)
CASES = [(path, mode, window) for path in PATHS for mode, window in (("model", WINDOW), ("block", WINDOW), ("block", 1))
         if (path, window) != ("prototype", 1)]


@pytest.mark.parametrize("path, mode, window", CASES)
def test_offloaded_denoising_equals_the_plain_model_bit_for_bit(pipes, path, mode, window):
    rng = np.random.default_rng(7)
    pipe = pipes(path)
    request = _request(pipe, path, rng)
    expected = pipe.denoise(pipe.prepare(request))

    denoiser = Denoiser(pipe.checkpoint)
    offload = denoiser.offload = Offload(denoiser.model, mode, "cpu", window=window)
    _poison(offload)
    assert _parked(offload)
    offloaded = _with_denoiser(pipe, denoiser)
    got = offloaded.denoise(offloaded.prepare(request))

    assert torch.equal(got, expected), f"{path}: a weight was used while offloaded"
    assert not offload.recent and _parked(offload), "after each call every group is back in host memory"
    layers = pipe.checkpoint.config.num_layers
    if mode == "model":
        assert len(offload.groups) == 1 and offload.peak_resident == 1
        assert offload.onloads == SMALL["steps"]  # once per call (cond + uncond share a batch)
    else:
        assert len(offload.groups) == layers and offload.peak_resident == min(window, layers)
        assert offload.onloads >= SMALL["steps"] * layers


def test_block_offload_keeps_the_rest_of_the_model_on_the_device(pipes):
    """Under ``block`` only the layers move: embeddings, head and tables are never parked."""
    denoiser = Denoiser(pipes("joint").checkpoint)
    _poison(Offload(denoiser.model, "block", "cpu"))
    for name, tensor in denoiser.model.named_parameters():
        assert bool(torch.isnan(tensor).all()) == name.startswith(("blocks.", "ref_blocks.")), name


def test_offload_none_applies_nothing(pipes):
    denoiser = Denoiser(pipes("joint").checkpoint)
    assert denoiser.offload is None and apply_offload(denoiser.model, "none", "cpu") is None
    assert not isinstance(denoiser.model.blocks, OffloadedBlocks)


def test_offload_is_refused_on_the_cpu_and_kept_for_an_accelerator(tiny_cache):
    with pytest.raises(ValueError, match="offload 'block' moves the denoiser between host memory and an accelerator, "
                                         "and the device is the CPU"):
        Checkpoint.load("tiny", cache_root=tiny_cache, offload="block", device="cpu")
    with pytest.raises(ValueError, match="offload must be one of none, model, block, got 'layer'"):
        Checkpoint.load("tiny", cache_root=tiny_cache, offload="layer", device="cuda")
    for mode in OFFLOAD_MODES:  # a description only: no CUDA call
        checkpoint = Checkpoint.load("tiny", cache_root=tiny_cache, dtype="auto", offload=mode, device="cuda",
                                     vae_tiling=True)
        assert checkpoint.offload == mode
        assert checkpoint.weights_device == torch.device("cpu" if mode != "none" else "cuda")
        again = Checkpoint.load(**json.loads(json.dumps(checkpoint.load_arguments())))
        assert (again.offload, again.vae_tiling, again.dtype) == (mode, VaeTiling(), torch.bfloat16)


# ---- dtype ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, torch.float32),  # AVX2 EPYC: bf16 emulated, ~9x slower than fp32
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "amx_tile", "amx_bf16"}, torch.bfloat16),
    (set(), torch.float32),  # no /proc/cpuinfo
])
def test_auto_dtype_on_the_cpu_follows_native_bf16_matmul(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    assert default_dtype("cpu") == resolve_dtype("auto", "cpu") == expected
    assert default_dtype("cuda") == resolve_dtype("auto", "cuda:1") == torch.bfloat16


def test_dtype_names(tiny_cache):
    assert resolve_dtype("float16", "cpu") == resolve_dtype(torch.float16, "cuda") == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'float64'"):
        Checkpoint.load("tiny", cache_root=tiny_cache, dtype="float64")


@pytest.mark.parametrize("adapter", ["adapter", "adapter_all", "adapter_multiview"])
def test_bfloat16_keeps_norms_and_modulation_tables_float32(tiny, adapter):
    """Oracle: diffusers' own rule for Wan (``_keep_in_fp32_modules``, matched against a name's dotted parts) and
    diffusers' own bf16 load of the same transformer; our view tables (logit scales, Eq. 2's omega) stay float32
    too. Everything else floating is bfloat16."""
    from diffusers import WanTransformer3DModel

    from engine.runtime.denoiser import load_expert

    keep = WanTransformer3DModel._keep_in_fp32_modules

    def rule(name: str) -> torch.dtype:
        parts = name.split(".")
        return torch.float32 if any(m in parts for m in keep) or name in ("view_logit_scales", "view_omega") \
            else torch.bfloat16

    model = load_expert(Checkpoint.load(tiny, tiny / adapter, dtype=torch.bfloat16))
    ours = {k: v.dtype for k, v in model.state_dict().items() if v.is_floating_point()}
    theirs = WanTransformer3DModel.from_pretrained(tiny / "transformer", torch_dtype=torch.bfloat16).state_dict()
    for name, tensor in theirs.items():
        assert ours[name] == tensor.dtype == rule(name), name
    assert {k: v for k, v in ours.items() if v != rule(k)} == {}
    fp32 = sorted({re.sub(r"\.\d+\.", ".N.", k) for k, v in ours.items() if v == torch.float32})
    assert "blocks.N.scale_shift_table" in fp32 and "scale_shift_table" in fp32 and "blocks.N.norm2.weight" in fp32
    assert any(k.startswith("condition_embedder.time_embedder.") for k in fp32)


# ---- VAE tiling ----------------------------------------------------------------------------------------------------
TILES = dict(tile_height=96, tile_width=96, stride_height=64, stride_width=64)  # small enough to tile at test sizes


def _latents(seed: int, shape=(1, 16, 3, 16, 16)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_tiled_decode_is_diffusers_tiled_decode_and_close_to_whole_frames(tiny):
    """The option reaches diffusers (bit-identical to ``enable_tiling`` on diffusers' own VAE); tiles change the
    video only by the seams: mean |difference| under 2 uint8 levels at 128 x 128 in 96-pixel tiles (the tiny
    VAE's random weights see far past a tile's 32-pixel blend band, so its seams are larger than a trained VAE's
    at diffusers' 256/192). A frame no larger than a tile is decoded whole, bit for bit."""
    from diffusers import AutoencoderKLWan

    from engine.backbones.wan.components import Vae

    tiled = Vae(Checkpoint.load(tiny, dtype=torch.float32, vae_tiling=TILES))
    whole = Vae(Checkpoint.load(tiny, dtype=torch.float32))
    latents = _latents(0)
    got, plain = tiled.decode(latents), whole.decode(latents)

    reference = AutoencoderKLWan.from_pretrained(tiny / "vae").eval()
    reference.enable_tiling(*TILES.values())
    with torch.no_grad():
        video = reference.decode(latents * whole.std + whole.mean).sample[0]
    expected = ((video / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(got, expected)

    diff = np.abs(got.astype(np.int16) - plain.astype(np.int16))
    assert got.shape == plain.shape == (9, 128, 128, 3) and 0 < diff.mean() < 2.0
    small = _latents(1, (1, 16, 2, 12, 12))  # 96 x 96: one tile
    assert np.array_equal(tiled.decode(small), whole.decode(small))


_PEAK = """
import re, sys, torch
from engine.backbones.wan.components import Vae
from engine.checkpoint import Checkpoint
torch.set_num_threads(1)


def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))


def peak(vae, latents):
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts at the current RSS
    before = status("VmRSS")
    vae.decode(latents)
    return status("VmHWM") - before


tiled = Vae(Checkpoint.load(sys.argv[1], vae_tiling={tiles!r}))
whole = Vae(Checkpoint.load(sys.argv[1]))
latents = torch.randn(1, 16, 2, 32, 32, generator=torch.Generator().manual_seed(0))
tiled.decode(latents[:, :, :1, :8, :8])
print(peak(tiled, latents), peak(whole, latents))
"""


@pytest.mark.slow
def test_tiled_decode_peaks_lower(tiny):
    """Peak resident memory above the start (KiB) of decoding 5 frames at 256 x 256, in a fresh process, the
    kernel's high-water mark reset before each decode (``/proc/self/clear_refs``) and glibc's mmap threshold fixed
    (else freed activations stay in the heap and the tiled peak wanders between 25 and 150 MiB). Measured here in
    64-pixel tiles: 25 MiB against 287 MiB for whole frames."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no writable /proc/self/clear_refs (Linux) to reset the peak RSS")
    script = _PEAK.format(tiles={**TILES, "tile_height": 64, "tile_width": 64, "stride_height": 48,
                                 "stride_width": 48})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", script, str(tiny)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    tiled, whole = map(int, done.stdout.split())
    assert tiled < whole / 4, (tiled, whole)


@pytest.mark.parametrize("tiling, words", [
    (dict(tile_height=100), "tile_height must be a positive multiple of 8 pixels, got 100"),
    (dict(stride_width=320), "stride_width must be a multiple of 8 pixels in (0, tile_width = 256], got 320"),
    (dict(tile=64), "vae_tiling takes tile_height, tile_width, stride_height, stride_width; got tile"),
    ("yes", "vae_tiling must be True, a dict of tile sizes or a VaeTiling, got 'yes'"),
])
def test_bad_tiling_is_refused(tiny, tiling, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        Checkpoint.load(tiny, vae_tiling=tiling)
