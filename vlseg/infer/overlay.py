"""PNG overlay of a prediction: axial, coronal and sagittal slices through the masks, drawn with Pillow only.

Layout (left to right): axial | coronal | sagittal, every panel ``panel_height`` pixels tall (256 for volumes up to
256 voxels along the displayed vertical axes, up to 512 for larger ones), separated by ``GAP`` black columns, with a
legend below (the title, then each prompt's colour swatch and name).  A slice is never stretched: its pixels are
square in mm.  It fills the panel's height, so the panel is ``round(panel_height * width_mm / height_mm)`` wide,
unless that is more than ``MAX_ASPECT`` times the height (a thin slab's coronal and sagittal slices): then it fills
that width and is centred between bands, the strip it is.  A panel is at least ``MIN_ASPECT`` times as wide as
tall (a very long scan's narrow slices are centred between bands), which leaves room for its letters.  The bands
are dark blue-grey (``BAND``), so they read as no data rather than as the scan's black air.

Display follows the radiological convention for an RAS-canonical array (axis 0 → patient Right, 1 → Anterior,
2 → Superior): axial has anterior at the top and the patient's right on the viewer's left; coronal has superior at
the top and the patient's right on the viewer's left; sagittal has superior at the top and anterior on the left.
Each panel names the patient's direction at each of its four edges (``LETTERS``).
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from vlseg.atomic import atomic_path
from vlseg.errors import VlsegError
from vlseg.infer.stitching import BoxMask
from vlseg.transforms.intensity import intensity_window
from vlseg.transforms.spatial import positive_triple

# Distinct, saturated, never grey (so a mask colour cannot be mistaken for the scan).  More masks than colours get
# extra hues from the golden-ratio sequence (see ``mask_colour``).
COLOURS: list[tuple[int, int, int]] = [
    (230, 25, 75),    # red
    (60, 180, 75),    # green
    (255, 225, 25),   # yellow
    (0, 130, 200),    # blue
    (245, 130, 48),   # orange
    (145, 30, 180),   # purple
    (70, 240, 240),   # cyan
    (240, 50, 230),   # magenta
    (210, 245, 60),   # lime
    (170, 110, 40),   # brown
]
ALPHA = 0.45          # opacity of a mask's fill; its 1-pixel contour is drawn solid
PANEL_MIN = 256       # smallest panel height in pixels
PANEL_MAX = 512       # largest panel height in pixels
GAP = 4               # black columns between panels
MAX_ASPECT = 2.0      # a panel is at most this many times wider than tall ...
MIN_ASPECT = 0.5      # ... and at least this fraction of its height wide
# The patient's direction at the top, bottom, left and right edge of each panel (radiological convention).
LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
BAND = (22, 26, 40)   # the bands beside a slice narrower or flatter than its panel: "no data", not black air
_MAX_PERCENTILE_SAMPLES = 2_000_000
_TEXT = (235, 235, 235)
_TITLE = (200, 200, 200)


def mask_colour(i: int) -> tuple[int, int, int]:
    """The colour of the ``i``-th mask (0-based): ``COLOURS`` first, then evenly spread extra hues."""
    if i < len(COLOURS):
        return COLOURS[i]
    hue = (0.07 + 0.618033988749895 * (i - len(COLOURS))) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def _check_inputs(image, masks, spacing, window):
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype.kind not in "biuf" or 0 in image.shape:
        raise VlsegError(f"overlay: expected a non-empty numeric 3D image, got shape {image.shape}, "
                         f"dtype {image.dtype}")
    sp = positive_triple(spacing, "spacing", where="overlay")
    if not isinstance(masks, dict):
        raise VlsegError(f"overlay: masks must be a dict of prompt name -> 3D mask, got {type(masks).__name__}")
    arrays = {}
    for name, m in masks.items():
        if isinstance(m, BoxMask):  # kept as it is: only the three displayed slices are ever built from it
            if m.shape != image.shape:
                raise VlsegError(f"overlay: mask {name!r} has shape {m.shape}, the image has {image.shape}")
            arrays[str(name)] = m
            continue
        m = np.asarray(m)
        if m.shape != image.shape:
            raise VlsegError(f"overlay: mask {name!r} has shape {m.shape}, the image has {image.shape}")
        if m.dtype.kind not in "biuf":
            raise VlsegError(f"overlay: mask {name!r} has non-numeric dtype {m.dtype}")
        arrays[str(name)] = m if m.dtype == bool else m != 0
    if window is not None:
        window = intensity_window(window, "overlay: window")
    return image, arrays, sp, window


def _auto_window(image: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentiles of the finite voxels (a strided sample of very large volumes)."""
    flat = image.reshape(-1)
    if flat.size > _MAX_PERCENTILE_SAMPLES:
        flat = flat[:: int(math.ceil(flat.size / _MAX_PERCENTILE_SAMPLES))]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(flat.astype(np.float64), [1, 99])
    return float(lo), float(hi)


def _to_grey(slice2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Windowed intensities in [0, 255] (float32); NaN shows black, and a zero-width window (a constant scan with
    the percentile window) shows mid-grey."""
    s = slice2d.astype(np.float32)
    if hi > lo:
        g = (s - lo) / (hi - lo)
    else:  # constant scan: show it mid-grey
        g = np.full(s.shape, 0.5, np.float32)
    g = np.nan_to_num(g, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(g, 0.0, 1.0) * 255.0


def _centre(masks: list[np.ndarray], shape) -> tuple[int, int, int]:
    """Slice through the smallest non-empty mask, so a small target (a tumour inside its organ) is always shown;
    the voxel of that mask nearest its centroid, so the slices hit it even when it is not convex."""
    filled = [m for m in masks if m.any()]
    if not filled:
        return tuple(n // 2 for n in shape)
    smallest = min(filled, key=lambda m: int(m.sum()))
    voxels = smallest.argwhere() if isinstance(smallest, BoxMask) else np.argwhere(smallest)
    com = voxels.mean(axis=0)
    return tuple(int(v) for v in voxels[np.argmin(((voxels - com) ** 2).sum(axis=1))])


def _views(centre, spacing):
    """One entry per panel; ``take`` turns a 3D RAS array into the displayed 2D slice."""
    cx, cy, cz = centre
    sx, sy, sz = spacing
    # (name, take, mm per pixel (rows, cols), slice caption); the letters at the edges are ``LETTERS[name]``
    return [
        # axial: a[:, :, z] is (x, y); transpose to rows=y, cols=x; flip rows so anterior (high y) is at the top.
        # RAS x grows towards the patient's right; columns are flipped so the right (high x) is on the viewer's left,
        # the radiological convention.
        ("axial", lambda a: a[:, :, cz].T[::-1, ::-1], (sy, sx), f"axial z={cz}"),
        # coronal: a[:, y, :] is (x, z); rows=z flipped (superior on top), cols=x flipped (patient right on the left).
        ("coronal", lambda a: a[:, cy, :].T[::-1, ::-1], (sz, sx), f"coronal y={cy}"),
        # sagittal: a[x, :, :] is (y, z); rows=z flipped (superior on top), cols=y flipped (anterior on the left).
        ("sagittal", lambda a: a[cx, :, :].T[::-1, ::-1], (sz, sy), f"sagittal x={cx}"),
    ]


def _panel_layout(shape2d, px_mm, height: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(panel size, slice size, slice offset in the panel), sizes as (w, h): the slice keeps square mm pixels and
    fills the height, or ``MAX_ASPECT`` times the height across when that is narrower; it is centred in a panel at
    least ``MIN_ASPECT`` times the height wide."""
    h_mm, w_mm = shape2d[0] * px_mm[0], shape2d[1] * px_mm[1]
    width = round(height * w_mm / h_mm)
    if width > round(MAX_ASPECT * height):
        width = round(MAX_ASPECT * height)
        size = (width, min(height, max(1, round(width * h_mm / w_mm))))
    else:
        size = (max(1, width), height)
    frame = (max(size[0], round(MIN_ASPECT * height)), height)
    return frame, size, ((frame[0] - size[0]) // 2, (height - size[1]) // 2)


def _render_panel(grey: np.ndarray, masks: list[np.ndarray], colours, layout) -> Image.Image:
    """Grey slice and its masks (2D, display orientation) resized as ``layout`` says (see ``_panel_layout``), masks
    blended on top, centred on a panel of ``BAND``."""
    frame, size, offset = layout
    grey_img = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32))  # mode "F"
    big = np.asarray(grey_img.resize(size, Image.BILINEAR), dtype=np.float32)
    rgb = np.repeat(np.clip(big, 0, 255)[..., None], 3, axis=-1)
    edges = []
    for m, colour in zip(masks, colours):
        if not m.any():
            continue
        m_img = Image.fromarray(np.ascontiguousarray(m, dtype=np.uint8) * 255)  # mode "L"
        big_m = np.asarray(m_img.resize(size, Image.NEAREST)) > 127
        c = np.asarray(colour, np.float32)
        rgb[big_m] = (1.0 - ALPHA) * rgb[big_m] + ALPHA * c
        edges.append((big_m & ~ndimage.binary_erosion(big_m), c))
    for edge, c in edges:  # contours after all fills, so overlapping masks keep visible outlines
        rgb[edge] = c
    panel = Image.new("RGB", frame, BAND)
    panel.paste(Image.fromarray(np.rint(rgb).astype(np.uint8)), offset)
    return panel


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _label(draw: ImageDraw.ImageDraw, xy, text: str, font, anchor: str) -> None:
    """Light text with a dark outline, placed by a Pillow anchor (the bitmap fallback font supports neither)."""
    try:
        draw.text(xy, text, fill=_TEXT, font=font, anchor=anchor, stroke_width=1, stroke_fill=(0, 0, 0))
    except (ValueError, NotImplementedError, TypeError):
        x, y = xy
        box = draw.textbbox((0, 0), text, font=font)
        w, h = box[2] - box[0], box[3] - box[1]
        x -= {"l": 0, "m": w // 2, "r": w}.get(anchor[0], 0)
        y -= {"a": 0, "m": h // 2, "d": h}.get(anchor[1], 0)
        draw.text((x, y), text, fill=_TEXT, font=font)


def _safe_text(draw, text: str, font) -> str:
    try:
        draw.textbbox((0, 0), text, font=font)
        return text
    except (UnicodeEncodeError, UnicodeError):  # the bitmap fallback font is Latin-1 only
        return text.encode("latin-1", "replace").decode("latin-1")


def _fit(draw, text: str, font, avail: int) -> str:
    """``text``, shortened with "..." if wider than ``avail`` pixels."""
    if _text_width(draw, text, font) <= avail:
        return text
    keep = len(text)
    while keep > 1 and _text_width(draw, text[:keep] + "...", font) > avail:
        keep -= 1
    return text[:keep] + "..."


def _legend_items(draw, font, names, colours, empty, title, width, swatch, pad):
    """Legend entries placed in rows that fit ``width``: ([(x, row, kind, text, colour)], number of rows)."""
    entries = [("title", title, None)] if title else []
    entries += [("mask", name + (" (empty)" if is_empty else ""), colour)
                for name, colour, is_empty in zip(names, colours, empty)]
    items, x, row = [], pad, 0
    for kind, text, colour in entries:
        lead = swatch + 4 if kind == "mask" else 0
        text = _fit(draw, _safe_text(draw, text, font), font, width - 2 * pad - lead)
        w = lead + _text_width(draw, text, font)
        if x > pad and x + w > width - pad:
            x, row = pad, row + 1
        items.append((x, row, kind, text, colour))
        x += w + 3 * pad
    return items, (row + 1 if items else 0)


def _panel_labels(draw, x: int, width: int, height: int, letters, caption: str, font) -> None:
    """A panel's orientation letters at the middle of its four edges (top, bottom, left, right), and which slice it
    shows in the bottom-left corner, kept clear of the bottom letter (just "z=12" in a narrow panel, or nothing)."""
    top, bottom, left, right = letters
    _label(draw, (x + width // 2, 2), top, font, "ma")
    _label(draw, (x + width // 2, height - 3), bottom, font, "md")
    _label(draw, (x + 3, height // 2), left, font, "lm")
    _label(draw, (x + width - 3, height // 2), right, font, "rm")
    room = width // 2 - _text_width(draw, bottom, font) // 2 - 12
    for text in (caption, caption.split()[-1]):
        if _text_width(draw, text, font) <= room:
            _label(draw, (x + 3, height - 3), text, font, "ld")
            break


def save_overlay(image: np.ndarray, masks: dict[str, np.ndarray], path, spacing=(1.0, 1.0, 1.0),
                 title: str | None = None, window: tuple[float, float] | None = None) -> Path:
    """Write a PNG of three orthogonal slices of ``image`` with ``masks`` overlaid; returns the path written.

    ``image`` is 3D in RAS-canonical orientation and each mask (prompt name → bool array) lies on the same grid.
    Slices pass through the smallest non-empty mask (the volume centre if all are empty).
    Intensities are windowed to ``window`` (low, high) if given, else to the 1st–99th percentiles.  The file is
    written to a temporary name in the same folder and moved into place, so readers never see a partial PNG.
    Raises ``VlsegError`` for bad input (non-3D image, mask of another shape, bad spacing or window).
    """
    image, arrays, spacing, window = _check_inputs(image, masks, spacing, window)
    path = Path(path)
    names = list(arrays)
    mask_list = [arrays[n] for n in names]
    colours = [mask_colour(i) for i in range(len(names))]
    empty = [not m.any() for m in mask_list]
    lo, hi = window if window is not None else _auto_window(image)

    views = _views(_centre(mask_list, image.shape), spacing)
    slices = [(take(image), [take(m).astype(bool) for m in mask_list], px) for _, take, px, _ in views]
    native_rows = max(s.shape[0] for s, _, _ in slices)
    height = int(min(max(native_rows, PANEL_MIN), PANEL_MAX))
    panels = [_render_panel(_to_grey(s, lo, hi), ms, colours, _panel_layout(s.shape, px, height))
              for s, ms, px in slices]

    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    font = _font(max(11, height // 20))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    asc_box = probe.textbbox((0, 0), "Ag", font=font)
    text_h = asc_box[3]
    pad, line_h = 6, text_h + 8
    swatch = max(8, text_h - 2)
    items, n_rows = _legend_items(probe, font, names, colours, empty, title, width, swatch, pad)
    legend_h = max(1, n_rows) * line_h + pad

    canvas = Image.new("RGB", (width, height + legend_h), (0, 0, 0))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + GAP
    draw = ImageDraw.Draw(canvas)
    small = _font(max(10, height // 26))
    x = 0
    for p, (name, _, _, caption) in zip(panels, views):
        _panel_labels(draw, x, p.width, height, LETTERS[name], caption, small)
        x += p.width + GAP
    for ix, row, kind, text, colour in items:
        y = height + pad // 2 + row * line_h + 4
        if kind == "mask":
            sy = y + (text_h - swatch) // 2 + 1
            draw.rectangle([ix, sy, ix + swatch - 1, sy + swatch - 1], fill=colour)
            draw.text((ix + swatch + 4, y), text, fill=_TEXT, font=font)
        else:
            draw.text((ix, y), text, fill=_TITLE, font=font)

    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
