"""The check primitives and the sequence-length budget the request's rules compare against."""
from __future__ import annotations

import pytest

from engine.errors import RequestError
from engine.validation import RequestLimits, check_frame_count, check_multiple, token_count


def test_token_count_counts_video_and_reference_tokens():
    # 81 frames -> 21 latent frames of 30x52 tokens at 480x832; 3 references of 480x832
    limits = RequestLimits(max_references=3)
    assert token_count(limits, 81, 480, 832, 0, (480, 832)) == 21 * 30 * 52
    assert token_count(limits, 81, 480, 832, 3, (480, 832)) == 21 * 30 * 52 + 3 * 30 * 52
    # references at their own size: 3 of 720x720 beside a 1280x720 video
    assert token_count(limits, 81, 720, 1280, 3, (720, 720)) == 21 * 45 * 80 + 3 * 45 * 45


@pytest.mark.parametrize("check, value, words", [
    (lambda v: check_multiple("height", v, 16), 100,
     "height must be a positive multiple of 16, got 100 (nearest: 96 or 112)"),
    (lambda v: check_multiple("width", v, 16), 8, "width must be a positive multiple of 16, got 8 (nearest: 16)"),
    (lambda v: check_frame_count("num_frames", v, 4), 10,
     "num_frames must be 4k+1 (1, 5, 9, ..., 81), got 10 (nearest: 9 or 13)"),
])
def test_refusals_name_the_value_and_the_nearest_allowed(check, value, words):
    with pytest.raises(RequestError) as error:
        check(value)
    assert str(error.value) == words
