"""The seed methods' request fields: who may send them, how many, and what the loop makes of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli_args import map_images
from engine.errors import RequestError
from engine.generation import frame_pose_per_latent_frame, pose_latents
from engine.media import frame_sources, write_mp4
from engine.request import make_request
from engine.validation import RequestLimits

DEFAULTS = dict(num_frames=9, height=32, width=32, steps=2, guidance_scale=5.0, shift=3.0)
MODES = {"prototype": RequestLimits(3, prototype=True), "identity": RequestLimits(3, identity=True),
         "multiview": RequestLimits(3, multiview=True), "plain": RequestLimits(3)}


def _images(count, seed=0, size=(32, 32)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def _request(mode: str, **values):
    return make_request(DEFAULTS, MODES[mode], prompt="x", first_frame=_images(1)[0], **values)


@pytest.mark.parametrize("mode, values, words", [
    ("plain", dict(frame_pose=_images(9), reference_poses=_images(2), references=_images(2)), "prototype models"),
    ("prototype", dict(references=_images(2)), "give frame_pose"),
    ("prototype", dict(frame_pose=_images(9)), "give references too"),
    ("prototype", dict(references=_images(2), frame_pose=_images(9), reference_poses=_images(1)),
     "1 reference pose(s) for 2 reference(s)"),
    ("prototype", dict(references=_images(2), frame_pose=_images(5), reference_poses=_images(2)),
     "5 frame pose image(s) for 9 frames"),
    ("plain", dict(identity=_images(1)[0]), "identity adapter"),
    ("multiview", dict(references=_images(2), view_omega=[1.0]), "1 view_omega value(s) for 2 reference(s)"),
    ("identity", dict(references=_images(2), view_omega=[1.0, 2.0]), "multi-view attention"),
    ("multiview", dict(references=_images(1), view_omega=[-1.0]), "view_omega 1 must be a number >= 0"),
])
def test_mode_inputs_are_refused_where_they_do_not_belong(mode, values, words):
    with pytest.raises(RequestError) as caught:
        _request(mode, **values)
    assert words in str(caught.value)


def test_each_mode_takes_its_inputs():
    assert len(_request("prototype", references=_images(2), frame_pose=_images(9),
                        reference_poses=_images(2)).frame_pose) == 9
    assert _request("identity", identity=_images(1)[0]).identity.shape == (32, 32, 3)
    assert _request("multiview", references=_images(3), view_omega=[0.25, 0.25, 0.1]).view_omega == (0.25, 0.25, 0.1)
    assert _request("prototype").frame_pose == ()  # no references: nothing to aggregate, no poses needed


def test_latent_frame_i_takes_pixel_frame_4i():
    frames = list(range(17))
    assert frame_pose_per_latent_frame(frames, 4) == [0, 4, 8, 12, 16]
    assert frame_pose_per_latent_frame(frames[:1], 4) == [0]


def test_pose_images_land_on_the_latent_grid_in_minus_one_to_one():
    white, black = np.full((64, 48, 3), 255, np.uint8), np.zeros((40, 40, 3), np.uint8)
    poses = pose_latents([white, black], 32, 48, 8)
    assert poses.shape == (1, 2, 3, 4, 6) and poses.dtype == torch.float32
    assert torch.all(poses[0, 0] == 1) and torch.all(poses[0, 1] == -1)


def test_frames_come_from_a_directory_or_a_video(tmp_path):
    frames = _images(9, size=(32, 48))
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"pose_{i:03d}.png")
    read = map_images({"frame_pose": tmp_path}, lambda path, flag: np.asarray(Image.open(path).convert("RGB")))
    assert all(np.array_equal(a, b) for a, b in zip(read["frame_pose"], frames))
    video = write_mp4(np.stack(frames), tmp_path / "poses.mp4")
    decoded = frame_sources(video)
    assert len(decoded) == 9 and decoded[0].shape == (32, 48, 3)
    with pytest.raises(RequestError, match="no images"):
        frame_sources(_empty(tmp_path))
    with pytest.raises(RequestError, match="not found"):
        frame_sources(tmp_path / "missing.mp4")


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder
