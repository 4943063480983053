"""PNG overlay of a prediction: axial, coronal and sagittal slices through the masks, drawn with Pillow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]
PANEL_MIN = 256


def _panel(grey: np.ndarray, masks: list[np.ndarray], px_mm: tuple[float, float]) -> Image.Image:
    """``grey``/masks are 2D (rows, cols) already oriented for display; resized so pixels are square in mm."""
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    for i, m in enumerate(masks):
        if not m.any():
            continue
        colour = np.array(COLOURS[i % len(COLOURS)], dtype=np.float32)
        rgb[m] = 0.55 * rgb[m] + 0.45 * colour
        edge = m & ~ndimage.binary_erosion(m)
        rgb[edge] = colour
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    h_mm, w_mm = grey.shape[0] * px_mm[0], grey.shape[1] * px_mm[1]
    scale = max(PANEL_MIN / h_mm, 1e-6)
    return img.resize((max(1, round(w_mm * scale)), PANEL_MIN), Image.NEAREST)


def save_overlay(image: np.ndarray, masks: dict[str, np.ndarray], path, spacing=(1.0, 1.0, 1.0),
                 title: str | None = None, window: tuple[float, float] | None = None) -> Path:
    """``image`` and masks on the RAS-canonical grid.  Radiological display: the patient's right on the viewer's
    left, anterior at the top of the axial panel, superior at the top of coronal and sagittal panels."""
    path = Path(path)
    names = list(masks)
    arrs = [np.asarray(masks[n]).astype(bool) for n in names]
    union = np.zeros(image.shape, bool)
    for m in arrs:
        union |= m
    cx, cy, cz = (np.round(ndimage.center_of_mass(union)).astype(int) if union.any()
                  else [n // 2 for n in image.shape])
    lo, hi = window if window else np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    sx, sy, sz = spacing
    # RAS arrays: axis 0 grows toward patient left (shown right), 1 toward anterior, 2 toward superior (shown up).
    views = [
        (lambda a: a[:, :, cz].T[::-1], (sy, sx)),  # axial: rows anterior→posterior, cols right→left
        (lambda a: a[:, cy, :].T[::-1], (sz, sx)),  # coronal: rows superior→inferior, cols right→left
        (lambda a: a[cx, :, :].T[::-1, ::-1], (sz, sy)),  # sagittal: rows superior→inferior, cols anterior→posterior
    ]
    panels = [_panel(f(grey), [f(m) for m in arrs], px) for f, px in views]
    legend_h = 22
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), PANEL_MIN + legend_h), "black")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 4
    draw = ImageDraw.Draw(canvas)
    x = 4
    for i, name in enumerate(names):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle([x, PANEL_MIN + 6, x + 10, PANEL_MIN + 16], fill=colour)
        draw.text((x + 14, PANEL_MIN + 5), name, fill=(255, 255, 255))
        x += 24 + 7 * len(name)
    if title:
        draw.text((max(x, canvas.width - 7 * len(title) - 4), PANEL_MIN + 5), title, fill=(200, 200, 200))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
