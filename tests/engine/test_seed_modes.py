"""The seed methods end to end on the tiny model: each mode's adapter loads, its request inputs reach the
denoiser and change the video, from the Python API and the command line (their ONNX graphs: tests/export/
test_cli.py). The equations themselves are checked against float64 formulations in tests/engine/modes/."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import AdapterError
from engine.pipeline import MultiViewPipeline
from engine.tiny import TINY_VERSION
from tests.commands import run_mvgen

MVGEN = str(Path(sys.executable).parent / "mvgen")
SMALL = dict(num_frames=5, height=32, width=32, steps=2, seed=3)
MODES = ("prototype", "multiview", "identity")
ALL = ("prototype", "identity")  # the modes of the tiny "all" adapter (multiview and prototype do not combine)


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return tiny_cache / TINY_VERSION


def _images(count, seed, size=(32, 32)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def mode_values(mode: str, variant: int = 0) -> dict:
    """A request's mode inputs; ``variant`` 1 changes them (other poses, omegas, identity)."""
    if mode == "prototype":
        return dict(frame_pose=_images(SMALL["num_frames"], 10 + variant), reference_poses=_images(2, 20 + variant))
    if mode == "multiview":
        return dict(view_omega=[0.25, 0.25] if variant == 0 else [2.0, 0.1])
    return dict(identity=_images(1, 30 + variant)[0])


@pytest.fixture(scope="module")
def pipes(tiny):
    loaded = {}

    def get(mode):
        if mode not in loaded:
            loaded[mode] = MultiViewPipeline.from_pretrained(tiny, adapter=tiny / f"adapter_{mode}")
        return loaded[mode]

    return get


def _latents(pipe, values: dict) -> torch.Tensor:
    first, *refs = _images(3, 1)
    request = pipe.make_request(first_frame=first, references=refs, prompt="a person turns", **SMALL, **values)
    return pipe.denoise(pipe.prepare(request))


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_runs_and_its_inputs_reach_the_video(pipes, mode):
    pipe = pipes(mode)
    first = _latents(pipe, mode_values(mode))
    again = _latents(pipe, mode_values(mode))
    other = _latents(pipe, mode_values(mode, variant=1))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    # PPA's literal Eq. 7 averages over all R*T reference tokens, so on the random tiny adapter a prototype is
    # ~1/T of a feature and the poses move the latents by ~1e-4 (tests/engine/modes checks the equations)
    assert ((first - other).norm() / first.norm()).item() > 1e-5, f"{mode}: its inputs change nothing"


def test_modes_at_once(pipes):
    values = {k: v for mode in ALL for k, v in mode_values(mode).items()}
    assert _latents(pipes("all"), values).isfinite().all()


def test_an_adapter_missing_a_modes_tensors_is_refused(tiny, tmp_path):
    import shutil

    adapter = shutil.copytree(tiny / "adapter_prototype", tmp_path / "adapter")
    (adapter / "mode.safetensors").unlink()  # the PPA pose encoder and selectors are gone
    with pytest.raises(AdapterError, match="missing"):
        MultiViewPipeline.from_pretrained(tiny, adapter=adapter)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_from_the_command_line(tiny_cache, tmp_path, mode):
    first, *refs = _images(3, 1)
    paths = {}
    for name, image in (("first", first), ("ref0", refs[0]), ("ref1", refs[1])):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    command = [MVGEN, "--cache-dir", str(tiny_cache), "generate", "--model", "tiny", "--device", "cpu",
               "--adapter", str(tiny_cache / TINY_VERSION / f"adapter_{mode}"), "--first-frame", str(tmp_path / "first.png"),
               "--reference", str(tmp_path / "ref0.png"), "--reference", str(tmp_path / "ref1.png"),
               "--prompt", "a person turns", "--frames", "5", "--height", "32", "--width", "32", "--steps", "2"]
    values = mode_values(mode)
    if mode == "prototype":
        (tmp_path / "poses").mkdir()
        for i, pose in enumerate(values["frame_pose"]):
            Image.fromarray(pose).save(tmp_path / "poses" / f"{i:02d}.png")
        command += ["--frame-pose", str(tmp_path / "poses")]
        for i, pose in enumerate(values["reference_poses"]):
            Image.fromarray(pose).save(tmp_path / f"rp{i}.png")
            command += ["--reference-pose", str(tmp_path / f"rp{i}.png")]
    elif mode == "multiview":
        for omega in values["view_omega"]:
            command += ["--view-omega", str(omega)]
    else:
        Image.fromarray(values["identity"]).save(tmp_path / "id.png")
        command += ["--identity", str(tmp_path / "id.png")]
    paths["video"] = tmp_path / "v.mp4"
    command += ["--out", str(paths["video"])]
    run_mvgen(command, process=mode == MODES[0])  # one mode as a shell runs it, the others in this process
    assert paths["video"].is_file()


def test_prototype_reference_features_cached_per_request_equal_recomputation(tiny):
    pipe = MultiViewPipeline.from_pretrained(tiny, adapter=tiny / "adapter_prototype", ref_timestep="zero")
    first, *refs = _images(3, 1)
    request = pipe.make_request(first_frame=first, references=refs, prompt="turn", **SMALL, **mode_values("prototype"))
    cached, recomputed = pipe.prepare(request), pipe.prepare(request)
    assert cached.cache_key is not None
    recomputed.cache_key = None
    builds = pipe.stages.denoisers[0].caches.builds
    latents = pipe.denoise(cached)
    assert pipe.stages.denoisers[0].caches.builds == builds + 1
    torch.testing.assert_close(latents, pipe.denoise(recomputed), rtol=1e-5, atol=1e-5)
