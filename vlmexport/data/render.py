"""Pillow drawing helpers for the synthetic VQA images.

Everything is drawn on a supersampled canvas (``SUPERSAMPLE`` times the final side) in
*grid units*: geometry is specified on a fixed ``GRID`` x ``GRID`` grid (independent of
the output resolution) and scaled to the canvas when drawn, so one scene spec renders
to the same picture at 64 px and 96 px. :func:`finish` box-filters the canvas down to
the final size (antialiasing) and adds the mild per-image background variation.

Only Pillow's bundled FreeType font (``ImageFont.load_default(size=...)``) is used for
text, so renders do not depend on the fonts installed on the machine.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GRID = 384
"""Side of the resolution-independent coordinate grid used by scene specs."""

SUPERSAMPLE = 4
"""Canvas side = SUPERSAMPLE * image_size; downsampled with a box filter."""

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPE_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "cross": "crosses",
}

# Saturated colours that stay mutually distinct after box-downsampling to 64-96 px and
# are far from every background (each differs from white by >= 130 in some channel).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (218, 32, 38),
    "green": (34, 152, 60),
    "blue": (38, 84, 226),
    "yellow": (242, 206, 24),
    "purple": (132, 52, 186),
    "orange": (250, 124, 14),
    "pink": (246, 122, 196),
    "brown": (122, 76, 38),
}
COLOURS = tuple(COLOUR_RGB)

# Light backgrounds: near white, light grey and light pastels (all channels >= 228).
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (250, 250, 248),
    (244, 244, 244),
    (236, 236, 236),
    (240, 244, 252),  # pastel blue
    (252, 245, 236),  # pastel peach
    (241, 250, 241),  # pastel green
    (250, 241, 248),  # pastel lilac
    (252, 251, 236),  # pastel cream
)

# Dark text colours (luminance < 70), legible on every background.
TEXT_RGB: tuple[tuple[int, int, int], ...] = (
    (18, 18, 18),
    (40, 40, 48),
    (24, 34, 96),
    (20, 72, 36),
    (96, 22, 22),
    (70, 44, 20),
)

AXIS_RGB = (60, 60, 60)


@functools.lru_cache(maxsize=512)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font (Aileron Regular) at ``size`` pixels, cached."""
    return ImageFont.load_default(size=max(1, int(size)))


def text_bbox(text: str, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``text`` drawn at the origin with font ``size``."""
    return tuple(int(v) for v in font(size).getbbox(text))  # type: ignore[return-value]


def new_canvas(image_size: int, background: Sequence[int]) -> tuple[Image.Image, ImageDraw.ImageDraw, float]:
    """A supersampled RGB canvas, its drawing context and the grid->canvas scale."""
    side = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in background))
    return canvas, ImageDraw.Draw(canvas), side / GRID


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with bounding box ``size`` centred on (cx, cy)."""
    h = size / 2.0
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "triangle":
        # Upward isosceles triangle filling the box.
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":
        t = size * 0.19  # half arm thickness: arms are 38% of the size, chunky enough at 64 px
        return [
            (cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t),
            (cx + h, cy + t), (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h),
            (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t),
        ]
    if shape == "star":
        # Five-pointed star; the outer circle is centred a bit low so the star's
        # bounding box is centred on (cx, cy). A fat inner radius keeps it readable.
        r_out, r_in = h * 1.02, h * 0.5
        oy = cy + h * 0.1
        pts = []
        for i in range(10):
            r = r_out if i % 2 == 0 else r_in
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(a), oy + r * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float,
               fill: Sequence[int], scale: float = 1.0) -> None:
    """Draw a filled ``shape`` (grid units, multiplied by ``scale``) on ``draw``."""
    cx, cy, size = cx * scale, cy * scale, size * scale
    fill = tuple(int(c) for c in fill)
    if shape == "circle":
        h = size / 2.0
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, size), fill=fill)


def draw_text(draw: ImageDraw.ImageDraw, text: str, x: float, y: float, size: int,
              fill: Sequence[int], scale: float = 1.0) -> None:
    """Draw ``text`` with its top-left anchor at (x, y) and font ``size`` (grid units)."""
    px = max(1, int(round(size * scale)))
    draw.text((x * scale, y * scale), text, font=font(px), fill=tuple(int(c) for c in fill))


def draw_bar_chart(draw: ImageDraw.ImageDraw, bars: Sequence[tuple[str, int]], x0: int, x1: int,
                   base_y: int, bar_frac: float, axis_width: int, scale: float = 1.0) -> None:
    """Vertical bars ``(colour_name, height)`` between x0 and x1 standing on ``base_y``.

    Draws a left axis and a baseline axis in dark grey (grid units, times ``scale``).
    """
    n = len(bars)
    slot = (x1 - x0) / n
    bw = slot * bar_frac
    s = scale
    for i, (colour, height) in enumerate(bars):
        cx = x0 + slot * (i + 0.5)
        draw.rectangle(
            ((cx - bw / 2) * s, (base_y - height) * s, (cx + bw / 2) * s, base_y * s),
            fill=COLOUR_RGB[colour],
        )
    # Axes: baseline and left axis (top of the left axis above the tallest possible bar).
    top = min(base_y - h for _, h in bars)
    a = axis_width
    draw.rectangle(((x0 - a) * s, base_y * s, (x1 + a) * s, (base_y + a) * s), fill=AXIS_RGB)
    draw.rectangle(((x0 - a) * s, (top - 2 * a) * s, x0 * s - 1, (base_y + a) * s), fill=AXIS_RGB)


def finish(canvas: Image.Image, image_size: int, gradient: Sequence[int], noise_seed: int,
           noise: int = 2) -> np.ndarray:
    """Downsample the canvas to ``image_size`` and add mild background variation.

    ``gradient`` = (gx, gy): brightness change in grey levels from the image centre to
    the right / bottom edge (kept small, |g| <= 8). ``noise`` is the amplitude of the
    uniform per-pixel noise, seeded by ``noise_seed`` so renders are reproducible.
    Returns a (image_size, image_size, 3) uint8 array.
    """
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    img = np.asarray(small, dtype=np.int16)
    gx, gy = gradient
    if gx or gy or noise:
        ramp = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2.0 - 1.0
        shade = (gy * ramp)[:, None] + (gx * ramp)[None, :]
        delta = np.rint(shade).astype(np.int16)[:, :, None]
        if noise:
            rng = np.random.default_rng(noise_seed)
            delta = delta + rng.integers(-noise, noise + 1, size=img.shape, dtype=np.int16)
        img = img + delta
    return np.clip(img, 0, 255).astype(np.uint8)
