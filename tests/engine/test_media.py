"""Media helpers: image decoding with clear errors, mp4 round trip, contact sheet layout."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.errors import RequestError
from engine.media import (
    MAX_ENCODED_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, contact_sheet, fit_image, load_image, write_mp4,
)


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


# ---- images that are not what they claim: one-line RequestError naming the image and the problem ----------
def _png(array: np.ndarray, **save) -> bytes:
    data = io.BytesIO()
    Image.fromarray(array).save(data, format="PNG", **save)
    return data.getvalue()


def _claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR (CRC fixed) claims width x height: a few bytes that would decode to gigabytes."""
    import struct
    import zlib

    data = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature (8) + length + type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _refused(source, *words, what="reference 1"):
    with pytest.raises(RequestError) as caught:
        load_image(source, what)
    message = str(caught.value)
    assert message.startswith(f"{what}: ") and "\n" not in message
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("side", [9000, 10_000, 100_000], ids=["under PIL's limit", "PIL warns", "PIL refuses"])
def test_oversized_image_refused_from_its_header(tmp_path, side):
    data = _claiming(side, side)
    assert len(data) < 100
    limit = f"more than the limit of {MAX_IMAGE_PIXELS} ({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE})"
    size = f"{side}x{side} pixels" if side == 9000 else f"has {side * side} pixels"
    _refused(data, "image data", size, limit)
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    _refused(path, str(path), size, limit)


def test_oversized_pil_image_and_array_refused():
    with Image.open(io.BytesIO(_claiming(9000, 8000))) as lazy:  # opening reads the header only
        _refused(lazy, "9000x8000 pixels, more than the limit")
    _refused(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (9000, 8000, 3)), "8000x9000 pixels")


def test_truncated_png_refused(tmp_path):
    rng = np.random.default_rng(5)
    data = _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    _refused(data[: len(data) // 2], "cannot read image data as an image (corrupt or truncated?)")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    _refused(path, f"cannot read {path} as an image (corrupt or truncated?)", "truncated")


def test_text_named_png_refused_and_jpeg_named_png_read(tmp_path):
    text = tmp_path / "frame.png"
    text.write_text("<html>404 not found</html>\n")
    _refused(text, f"cannot read {text} as an image: it holds text ('<html>404 not found", "), not an image")
    _refused(b"hello\n", "it holds text ('hello\\n'), not an image")
    _refused(b"\x00\x01\x02garbage" * 4, "not a known image format (PNG, JPEG, WebP, ...)")
    rng = np.random.default_rng(6)
    jpeg = tmp_path / "really_a_jpeg.png"
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    assert load_image(jpeg).shape == (16, 24, 3)


def test_empty_and_too_many_bytes_refused(tmp_path):
    _refused(b"", "empty image data")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _refused(empty, f"cannot read {empty} as an image: the file is empty")
    _refused(b"\x89PNG" + bytes(MAX_ENCODED_IMAGE_BYTES), f"more than the limit of {MAX_ENCODED_IMAGE_BYTES} bytes")
    big = tmp_path / "big.png"
    with big.open("wb") as handle:  # sparse: nothing is written
        handle.truncate(MAX_ENCODED_IMAGE_BYTES + 1)
    _refused(big, f"{big} is {MAX_ENCODED_IMAGE_BYTES + 1} bytes")
    _refused(tmp_path, "not a file")


def test_animated_image_gives_its_first_frame():
    rng = np.random.default_rng(7)
    frames = [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(3)]
    data = io.BytesIO()
    frames[0].save(data, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    np.testing.assert_array_equal(load_image(data.getvalue()), np.asarray(frames[0]))


def test_sixteen_bit_and_cmyk_images_convert_to_rgb():
    rng = np.random.default_rng(8)
    grey = rng.integers(0, 65536, (6, 5)).astype(np.uint16)
    out = load_image(_png(grey))
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out[..., 0], (grey >> 8).astype(np.uint8))  # PIL's convert would clip to 255
    cmyk = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "CMYK").save(cmyk, format="JPEG")
    assert load_image(cmyk.getvalue()).shape == (8, 8, 3)
