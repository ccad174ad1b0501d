"""Images in, videos and contact sheets out: the engine's only contact with file formats."""
from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import RequestError

ImageSource = str | Path | bytes | bytearray | np.ndarray | Image.Image
# Decoding cost follows the pixel count, not the file size (a 1 kB PNG can claim 100000 x 100000 pixels),
# so the size in an image's header is checked before a pixel is decoded. PIL's own guard only warns up to
# twice its limit and lives in module state; this is the engine's. 8192^2 is far above any video size.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
# an encoded image above this is refused before it is read or parsed
MAX_ENCODED_IMAGE_BYTES = 64 << 20
# 16-bit integer modes: PIL's convert("RGB") clips them at 255 instead of scaling
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(source: ImageSource, what: str = "image") -> np.ndarray:
    """An image path, encoded bytes, PIL image or array as RGB uint8 [H, W, 3]; ``RequestError`` if unreadable.

    ``what`` names the image in the error (e.g. ``"reference 2"``).
    """
    if isinstance(source, np.ndarray):
        _check_pixels(what, "image array", source.shape[1::-1] if source.ndim >= 2 else (1, 1))
        return _array_to_rgb(source, what)
    if isinstance(source, Image.Image):
        _check_pixels(what, "image", source.size)
        return _to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise RequestError(f"{what}: empty image data")
        _check_encoded_size(what, "image data", len(source))
        return _decode(io.BytesIO(source), what, "image data")
    path = Path(source)
    if not path.is_file():
        raise RequestError(f"{what}: file not found: {path}" if not path.exists() else f"{what}: not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise RequestError(f"{what}: cannot read {path} as an image: the file is empty")
    _check_encoded_size(what, str(path), size)
    try:
        handle = path.open("rb")
    except OSError as error:
        raise RequestError(f"{what}: cannot read {path}: {error.strerror or error}") from None
    with handle:
        return _decode(handle, what, str(path))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_VIDEO_FRAMES = 2048


def frame_sources(path: str | Path, what: str = "frames") -> list:
    """The frames of a directory of images (sorted by name: image paths) or of a video file (decoded: RGB uint8
    arrays), for a request field of kind ``frames``; ``RequestError`` naming the path otherwise."""
    path = Path(path)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise RequestError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in directory {path}")
        return images
    if not path.is_file():
        raise RequestError(f"{what}: file or directory not found: {path}")
    import imageio.v3 as iio

    try:
        frames = []
        for frame in iio.imiter(path):
            frames.append(_array_to_rgb(np.asarray(frame), what))
            if len(frames) > MAX_VIDEO_FRAMES:
                raise RequestError(f"{what}: {path} has more than {MAX_VIDEO_FRAMES} frames")
    except RequestError:
        raise
    except Exception as error:
        raise RequestError(f"{what}: cannot read {path} as a video or image: {error}") from None
    return frames


def _decode(handle, what: str, name: str) -> np.ndarray:
    """Decode the first frame, refusing an oversized image from its header before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # a header over PIL's own limit warns (or raises past twice it); both are refused here, and
            # other decoder warnings (odd TIFF tags, ...) about an image that still decodes are not the user's
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                _check_pixels(what, name, image.size)
                return _to_rgb(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise RequestError(f"{what}: {name} has {pixels.group(1) if pixels else 'too many'} pixels, more than the "
                           f"limit of {MAX_IMAGE_PIXELS} ({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE})") from None
    except UnidentifiedImageError:
        handle.seek(0)
        raise RequestError(f"{what}: cannot read {name} as an image: {_unknown_content(handle.read(64))}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        # PIL reports truncated and corrupt data as OSError ('image file is truncated'), and broken chunks
        # as SyntaxError or EOFError
        raise RequestError(f"{what}: cannot read {name} as an image (corrupt or truncated?): {error}") from None


def _check_pixels(what: str, name: str, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestError(f"{what}: {name} is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS} "
                           f"({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE})")


def _check_encoded_size(what: str, name: str, size: int) -> None:
    if size > MAX_ENCODED_IMAGE_BYTES:
        raise RequestError(f"{what}: {name} is {size} bytes, more than the limit of {MAX_ENCODED_IMAGE_BYTES} bytes "
                           f"for an encoded image")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """The current (first) frame as RGB uint8; 16-bit grey keeps its top 8 bits rather than clipping."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def _unknown_content(head: bytes) -> str:
    """What the data is instead of an image, as far as its first bytes tell."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # text cut inside a multi-byte character is still text
        text = head[:error.start].decode("utf-8") if error.start > len(head) - 4 else ""
    if text and "".join(text.split()).isprintable():
        return f"it holds text ({text[:24]!r}{'...' if len(text) > 24 else ''}), not an image"
    return "not a known image format (PNG, JPEG, WebP, ...)"


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


WHITE = 255
# how a reference view is fitted to its size: ``crop`` (``fit_image``: centre crop, then resize) or ``letterbox``
# (``letterbox_image``: Phantom-Wan's preprocessing, the whole view kept)
REFERENCE_FITS = ("crop", "letterbox")


def letterbox_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The whole image resized (Lanczos) to fit inside [height, width], keeping its aspect ratio, and centred on
    white: Phantom-Wan's ``load_ref_images`` (its sizes truncate, its odd padding pixel goes right / bottom)."""
    h, w = image.shape[:2]
    if w / h > width / height:  # wider than the target: full width
        new_w, new_h = width, int(width / (w / h))
    else:
        new_w, new_h = int(height * (w / h)), height
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.LANCZOS))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out = np.full((height, width, 3), WHITE, np.uint8)
    out[top:top + new_h, left:left + new_w] = resized
    return out


def fit_reference(image: np.ndarray, height: int, width: int, fit: str = "crop") -> np.ndarray:
    """A reference view fitted to [height, width] as ``fit`` (one of ``REFERENCE_FITS``) says."""
    if fit not in REFERENCE_FITS:
        raise ValueError(f"reference fit must be one of {REFERENCE_FITS}, got {fit!r}")
    return letterbox_image(image, height, width) if fit == "letterbox" else fit_image(image, height, width)


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
