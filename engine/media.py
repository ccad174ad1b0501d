"""Images in, videos and contact sheets out: the engine's only contact with file formats."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import RequestError

ImageSource = str | Path | bytes | bytearray | np.ndarray | Image.Image


def load_image(source: ImageSource, what: str = "image") -> np.ndarray:
    """An image path, encoded bytes, PIL image or array as RGB uint8 [H, W, 3]; ``RequestError`` if unreadable.

    ``what`` names the image in the error (e.g. ``"reference 2"``).
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, what)
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"))
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise RequestError(f"{what}: empty image data")
        return _decode(io.BytesIO(source), what, "image data")
    path = Path(source)
    if not path.is_file():
        raise RequestError(f"{what}: file not found: {path}")
    with path.open("rb") as handle:
        return _decode(handle, what, str(path))


def _decode(handle, what: str, name: str) -> np.ndarray:
    try:
        with Image.open(handle) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise RequestError(f"{what}: cannot read {name} as an image (PNG, JPEG, WebP, ...): {error}") from None


def _array_to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.bool_:  # a mask: True = white
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise RequestError(f"{what}: expected an image array [H, W] or [H, W, 1|3|4], got shape {list(array.shape)}")
    if array.dtype != np.uint8:
        raise RequestError(f"{what}: expected a uint8 image array, got {array.dtype}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def fit_image(image: np.ndarray, height: int, width: int, resample=Image.LANCZOS) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize to [height, width] (a no-op when already that size)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    crop_h, crop_w = min(h, round(height / scale)), min(w, round(width / scale))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    cropped = Image.fromarray(image[top:top + crop_h, left:left + crop_w])
    return np.asarray(cropped.resize((width, height), resample))


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Write uint8 [F, H, W, 3] frames as H.264 mp4 (yuv420p needs even sizes: odd edges are padded)."""
    import imageio.v2 as imageio

    path = Path(path)
    frames = _check_frames(frames)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(
        path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p", quality=8,
        macro_block_size=2, ffmpeg_log_level="error",
    ) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def contact_sheet(frames: np.ndarray, columns: int | None = None, gap: int = 2) -> np.ndarray:
    """All frames on one grid image (uint8 [rows*H + gaps, columns*W + gaps, 3]), row-major in time order."""
    frames = _check_frames(frames)
    count, h, w, _ = frames.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    sheet = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), 255, dtype=np.uint8)
    for i, frame in enumerate(frames):
        top, left = (i // columns) * (h + gap), (i % columns) * (w + gap)
        sheet[top:top + h, left:left + w] = frame
    return sheet


def write_contact_sheet(frames: np.ndarray, path: str | Path, columns: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(contact_sheet(frames, columns)).save(path)
    return path


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {list(frames.shape)}")
    return frames
