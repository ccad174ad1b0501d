"""Request validation: every bad field is refused with one line naming it and the allowed values."""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import RequestError
from engine.validation import RequestLimits, token_count, validate_request

LIMITS = RequestLimits(max_references=3, max_tokens=4096)


def _image(rng, h=32, w=32):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _request(**changes):
    rng = np.random.default_rng(7)
    fields = dict(first_frame=_image(rng), references=[_image(rng)], prompt="p", num_frames=9, height=64, width=64,
                  steps=4, guidance_scale=5.0, seed=0, shift=3.0)
    return validate_request(LIMITS, **{**fields, **changes})


def test_a_good_request_passes_and_decodes_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    path = tmp_path / "frame.png"
    Image.fromarray(_image(rng, 40, 48)).save(path)
    request = _request(first_frame=path, references=[path.read_bytes(), path], first_frame_mask=np.ones((40, 48), bool))
    assert request.first_frame.shape == (40, 48, 3) and request.first_frame.dtype == np.uint8
    assert len(request.references) == 2 and request.first_frame_mask.all()
    assert request.reference_size == (64, 64)


@pytest.mark.parametrize("changes, words", [
    (dict(height=100), "height must be a positive multiple of 16, got 100 (nearest: 96 or 112)"),
    (dict(width=0), "width must be a positive multiple of 16"),
    (dict(height=64.0), "height must be a positive multiple of 16"),
    (dict(num_frames=10), "frames must be 4k+1"),
    (dict(num_frames=0), "frames must be 4k+1"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=True), "steps must be a positive integer"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a number >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a number >= 0"),
    (dict(seed=-1), "seed must be an integer in [0,"),
    (dict(shift=0), "shift must be a number > 0"),
    (dict(prompt=None), "prompt must be text"),
    (dict(ref_size=(64, 40)), "reference width must be a positive multiple of 16"),
    (dict(references=[np.zeros((8, 8, 3), np.uint8)] * 4), "got 4 references, this model takes at most 3"),
    (dict(num_frames=81, height=512, width=512), "tokens, more than the limit of 4096"),
    (dict(first_frame="/nonexistent/frame.png"), "first frame: file not found"),
    (dict(references=[b"not an image"]), "reference 1: cannot read image data as an image"),
    (dict(first_frame=np.zeros((8, 8, 3), np.float32)), "first frame: expected a uint8 image array"),
    (dict(first_frame_mask=np.zeros((16, 16), bool)), "first-frame mask is 16x16 but the first frame is 32x32"),
])
def test_bad_fields_are_refused_in_one_line(changes, words):
    with pytest.raises(RequestError) as error:
        _request(**changes)
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("hello")
    with pytest.raises(RequestError, match="cannot read .*broken.png as an image"):
        _request(first_frame=bad)


def test_token_count_counts_video_and_reference_tokens():
    # 81 frames -> 21 latent frames of 30x52 tokens at 480x832; 3 references of 480x832
    limits = RequestLimits(max_references=3)
    assert token_count(limits, 81, 480, 832, 0, (480, 832)) == 21 * 30 * 52
    assert token_count(limits, 81, 480, 832, 3, (480, 832)) == 21 * 30 * 52 + 3 * 30 * 52
