"""Synthetic inputs for a first run with no assets: a drawn figure as first frame, its mask, and 3 views.

The figure (flat shapes: hair, skin, a shirt with a front badge, trousers, shoes) is drawn from the front,
back and side, so the references show what the first frame does not.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
SKIN, HAIR, SHIRT, BADGE, TROUSERS, SHOES = (224, 178, 140), (60, 40, 30), (200, 40, 60), (250, 210, 60), \
    (40, 60, 120), (30, 30, 30)
WALL, FLOOR, STUDIO = (170, 190, 210), (120, 100, 80), (235, 235, 235)


def _figure(draw: ImageDraw.ImageDraw, cx: int, top: int, scale: float, view: str) -> None:
    """A standing figure centred at ``cx``; ``view`` in front | back | side."""
    def box(x0, y0, x1, y1):
        return [cx + x0 * scale, top + y0 * scale, cx + x1 * scale, top + y1 * scale]

    half = 14 if view == "side" else 26  # torso half-width
    draw.rectangle(box(-half + 4, 110, -2, 190), fill=TROUSERS)  # legs
    draw.rectangle(box(2, 110, half - 4, 190), fill=TROUSERS)
    draw.rectangle(box(-half + 2, 186, -2, 196), fill=SHOES)
    draw.rectangle(box(2, 186, half + (10 if view == "side" else -2), 196), fill=SHOES)
    draw.rectangle(box(-half, 42, half, 114), fill=SHIRT)  # torso
    if view != "side":
        draw.rectangle(box(-half - 10, 44, -half, 104), fill=SHIRT)  # arms
        draw.rectangle(box(half, 44, half + 10, 104), fill=SHIRT)
        draw.ellipse(box(-half - 10, 100, -half, 112), fill=SKIN)
        draw.ellipse(box(half, 100, half + 10, 112), fill=SKIN)
    else:
        draw.rectangle(box(-5, 46, 7, 104), fill=SHIRT)
        draw.ellipse(box(-5, 100, 7, 112), fill=SKIN)
    if view == "front":
        draw.regular_polygon((cx, top + 66 * scale, 9 * scale), 5, fill=BADGE)  # the badge only the front shows
    draw.rectangle(box(-5, 34, 5, 44), fill=SKIN)  # neck
    draw.ellipse(box(-16, 2, 16, 38), fill=HAIR if view == "back" else SKIN)  # head
    if view == "front":
        draw.chord(box(-16, 0, 16, 30), 180, 360, fill=HAIR)
        draw.ellipse(box(-8, 16, -4, 20), fill=(20, 20, 20))
        draw.ellipse(box(4, 16, 8, 20), fill=(20, 20, 20))
        draw.line(box(-5, 28, 5, 28), fill=(150, 60, 60), width=max(1, int(scale)))
    elif view == "side":
        draw.chord(box(-16, 0, 16, 30), 150, 360, fill=HAIR)
        draw.polygon([(cx + 15 * scale, top + 18 * scale), (cx + 20 * scale, top + 24 * scale),
                      (cx + 15 * scale, top + 26 * scale)], fill=SKIN)


def first_frame() -> tuple[Image.Image, Image.Image]:
    """A scene with the figure seen from the front, and the figure's mask (white, dilated by 2 pixels)."""
    cx, top = SIZE // 2 + 30, 30
    scene = Image.new("RGB", (SIZE, SIZE), WALL)
    draw = ImageDraw.Draw(scene)
    draw.rectangle([0, SIZE * 0.7, SIZE, SIZE], fill=FLOOR)
    draw.rectangle([20, 40, 80, 120], fill=(240, 240, 200), outline=(90, 90, 90), width=3)  # a window
    _figure(draw, cx, top, 1.0, "front")
    silhouette = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    _figure(ImageDraw.Draw(silhouette), cx, top, 1.0, "front")
    mask = silhouette.convert("L").point(lambda v: 255 if v else 0).filter(ImageFilter.MaxFilter(5))
    return scene, mask


def reference(view: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), STUDIO)
    _figure(ImageDraw.Draw(image), SIZE // 2, 24, 1.05, view)
    return image


def write_demo_inputs(out: str | Path) -> dict[str, Path]:
    """Write first_frame.png, first_frame_mask.png, front.png, back.png, side.png; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scene, mask = first_frame()
    images = {"first_frame": scene, "first_frame_mask": mask,
              **{view: reference(view) for view in ("front", "back", "side")}}
    paths = {}
    for name, image in images.items():
        paths[name] = out / f"{name}.png"
        image.save(paths[name])
    return paths
