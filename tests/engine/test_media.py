"""Media helpers: image decoding with clear errors, mp4 round trip, contact sheet layout."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.errors import RequestError
from engine.media import contact_sheet, fit_image, load_image, write_mp4


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_load_image_any_mode_to_rgb_uint8(mode):
    rng = np.random.default_rng(len(mode))
    image = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).convert(mode)
    data = io.BytesIO()
    image.save(data, format="PNG")
    out = load_image(data.getvalue())
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


def test_load_image_errors_name_the_image():
    with pytest.raises(RequestError, match="^reference 2: empty image data$"):
        load_image(b"", "reference 2")
    with pytest.raises(RequestError, match="expected an image array"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def test_fit_image_centre_crops_then_resizes():
    image = np.zeros((40, 100, 3), np.uint8)
    image[:, 30:70] = 255  # the centre 40x40 square is white
    out = fit_image(image, 16, 16)
    assert out.shape == (16, 16, 3) and out.min() == 255
    assert fit_image(image, 40, 100) is image


def test_write_mp4_round_trip_pads_odd_sizes(tmp_path):
    import imageio.v3 as iio

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (5, 33, 47, 3), dtype=np.uint8)
    video = iio.imread(write_mp4(frames, tmp_path / "v.mp4", fps=8), plugin="FFMPEG")
    assert video.shape == (5, 34, 48, 3)


def test_contact_sheet_grid():
    frames = np.stack([np.full((4, 6, 3), i * 20, np.uint8) for i in range(5)])
    sheet = contact_sheet(frames, gap=1)
    assert sheet.shape == (2 * 4 + 1, 3 * 6 + 2, 3)
    assert sheet[5, 0, 0] == 60 and sheet[5, 7, 0] == 80 and sheet[5, 14, 0] == 255  # 4th, 5th, empty cell
