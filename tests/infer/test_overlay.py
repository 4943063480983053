"""save_overlay: the PNG's layout, and the radiological orientation and colours read back from its pixels."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from vlseg.errors import VlsegError
from vlseg.infer.overlay import ALPHA, BAND, COLOURS, GAP, LETTERS, MAX_ASPECT, PANEL_MIN, mask_colour, save_overlay

SHAPE = (40, 30, 20)  # RAS: x (→ patient right), y (→ anterior), z (→ superior)


def box(lo, hi, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def render(tmp_path, masks, image=None, spacing=(1.0, 1.0, 1.0), name="o.png", **kw) -> np.ndarray:
    image = np.zeros(SHAPE, np.float32) if image is None else image
    kw.setdefault("window", (0.0, 1.0))  # a black background unless a test says otherwise
    path = save_overlay(image, masks, tmp_path / name, spacing=spacing, **kw)
    assert path == tmp_path / name
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def extents_mm(shape=SHAPE, spacing=(1.0, 1.0, 1.0)):
    """(across, down) in mm of the axial (x, y), coronal (x, z) and sagittal (y, z) panels."""
    (nx, ny, nz), (sx, sy, sz) = shape, spacing
    return [(nx * sx, ny * sy), (nx * sx, nz * sz), (ny * sy, nz * sz)]


def panel_widths(shape=SHAPE, spacing=(1.0, 1.0, 1.0), height=PANEL_MIN):
    """Square mm pixels at the panel height, the panel between half and twice as wide as tall."""
    return [min(max(round(height * w / h), height // 2), 2 * height) for w, h in extents_mm(shape, spacing)]


def panels(png, widths, height=PANEL_MIN):
    out, x = [], 0
    for w in widths:
        out.append(png[:height, x:x + w])
        x += w + GAP
    return out


def where(panel, colour):
    """(rows, cols) of pixels exactly ``colour`` (a mask's solid contour)."""
    return np.nonzero(np.all(panel == np.asarray(colour, np.uint8), axis=-1))


# --- layout ---------------------------------------------------------------------------------------------------------

def test_png_layout_three_panels_and_legend(tmp_path):
    png = render(tmp_path, {"liver": box((10, 10, 5), (20, 20, 15))}, title="case 7")
    widths = panel_widths()
    assert widths == [341, 512, 384]
    assert png.shape[1] == sum(widths) + 2 * GAP
    assert PANEL_MIN < png.shape[0] < PANEL_MIN + 60  # panels plus one legend row
    # The gaps between panels are black columns.
    for x in (widths[0], widths[0] + GAP + widths[1]):
        assert not png[:PANEL_MIN, x:x + GAP].any()
    # The legend holds the mask's colour swatch and some text (title, name).
    legend = png[PANEL_MIN:]
    assert len(where(legend, COLOURS[0])[0]) > 20
    assert (legend.max(axis=-1) > 150).sum() > 50


def test_anisotropic_spacing_gives_square_mm_pixels(tmp_path):
    shape, spacing = (40, 40, 20), (1.0, 1.0, 4.0)  # 40 x 40 x 80 mm
    m = box((10, 10, 5), (30, 30, 15), shape)
    png = render(tmp_path, {"m": m}, image=np.zeros(shape, np.float32), spacing=spacing)
    widths = panel_widths(shape, spacing)
    assert widths == [256, 128, 128]
    assert png.shape[1] == sum(widths) + 2 * GAP
    axial, coronal, _ = panels(png, widths)
    # The mask is 20 x 20 mm in the axial plane (half the panel each way) and 20 x 40 mm in the coronal plane.
    rows, cols = where(axial, COLOURS[0])
    assert cols.max() - cols.min() == pytest.approx(128, abs=8) and rows.max() - rows.min() == pytest.approx(128, abs=8)
    rows, cols = where(coronal, COLOURS[0])
    assert cols.max() - cols.min() == pytest.approx(64, abs=6) and rows.max() - rows.min() == pytest.approx(128, abs=8)


def test_small_volumes_are_upscaled_and_tall_ones_kept(tmp_path):
    tiny = render(tmp_path, {}, image=np.zeros((6, 5, 4), np.float32), name="tiny.png")
    assert tiny.shape[0] > PANEL_MIN
    tall_shape = (20, 300, 150)  # 300 rows in the axial panel: panels 300 px tall, not shrunk to 256
    tall = render(tmp_path, {}, image=np.zeros(tall_shape, np.float32), name="tall.png")
    assert tall.shape[0] > 300 and tall.shape[1] == sum(panel_widths(tall_shape, height=300)) + 2 * GAP


def test_near_flat_volumes_have_capped_panel_width(tmp_path):
    flat = render(tmp_path, {}, image=np.zeros((60, 60, 2), np.float32))  # coronal/sagittal are 60 x 2 mm
    assert flat.shape[1] == round(256 * 60 / 60) + 2 * MAX_ASPECT * 256 + 2 * GAP


THIN_AND_LONG = [
    ((160, 128, 4), (1.953125, 1.953125, 2.0)),  # patient B's series as tests/data holds it: 4 slices, 8 mm
    ((256, 256, 20), (1.5, 1.5, 2.0)),           # a 4 cm DICOM series
    ((64, 64, 1), (1.0, 1.0, 1.0)),              # one slice
    ((30, 20, 600), (1.0, 1.0, 1.0)),            # a very long, narrow scan
    ((96, 80, 700), (2.0, 2.0, 1.5)),            # a whole body
]


@pytest.mark.parametrize("shape,spacing", THIN_AND_LONG)
def test_thin_and_long_scans_keep_square_mm_pixels_in_bounded_panels(tmp_path, shape, spacing):
    """No stretching: each slice keeps its mm proportions (a thin slab shows as the strip it is, letterboxed), and
    every panel frame stays between half and twice as wide as it is tall."""
    png = render(tmp_path, {"all": np.ones(shape, bool)}, image=np.zeros(shape, np.float32), spacing=spacing)
    height = int(min(max(shape[1], shape[2], 256), 512))
    frames = panel_widths(shape, spacing, height)
    assert png.shape[1] == sum(frames) + 2 * GAP and png.shape[0] < height + 60
    x = 0
    for frame, (w_mm, h_mm) in zip(frames, extents_mm(shape, spacing)):
        rows, cols = where(png[:height, x:x + frame], COLOURS[0])  # the contour of a mask filling the slice
        h_px, w_px = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        scale = min(height / h_mm, 2 * height / w_mm)  # pixels per mm, the same both ways
        assert abs(w_px - w_mm * scale) <= 1 and abs(h_px - h_mm * scale) <= 1, (frame, w_px, h_px)
        assert abs((rows.min() + rows.max()) / 2 - (height - 1) / 2) <= 1  # centred in its frame
        assert abs((cols.min() + cols.max()) / 2 - (frame - 1) / 2) <= 1
        if h_px < height - 1 or w_px < frame - 1:  # letterboxed: a band, not the scan, around the slice
            assert tuple(png[0 if h_px < height - 1 else height // 3, x]) == BAND
        x += frame + GAP


def _letter_crops(png, frames, height, r=9):
    """Pixels around the four edge midpoints of each panel frame: {(panel, side): crop}."""
    crops, x = {}, 0
    for name, frame in zip(("axial", "coronal", "sagittal"), frames):
        p, cx, cy = png[:height, x:x + frame], frame // 2, height // 2
        crops[name, "top"], crops[name, "bottom"] = p[:2 * r, cx - r:cx + r], p[height - 2 * r:, cx - r:cx + r]
        crops[name, "left"], crops[name, "right"] = p[cy - r:cy + r, :2 * r], p[cy - r:cy + r, frame - 2 * r:]
        x += frame + GAP
    return crops


@pytest.mark.parametrize("shape,spacing", [(SHAPE, (1.0, 1.0, 1.0)), THIN_AND_LONG[0]])
def test_every_panel_has_its_orientation_letters_on_both_sides(tmp_path, shape, spacing):
    """Radiological convention: axial R|L and A over P, coronal R|L and S over I, sagittal A|P and S over I.  Read
    from the pixels: a letter is drawn at each edge of each panel, and two positions show the same glyph exactly
    when the convention puts the same letter there."""
    expected = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
    assert LETTERS == expected  # (top, bottom, left, right), what is drawn
    png = render(tmp_path, {}, image=np.zeros(shape, np.float32), spacing=spacing)
    crops = _letter_crops(png, panel_widths(shape, spacing), PANEL_MIN)
    letters = {(n, side): expected[n][i] for n in expected for i, side in enumerate(("top", "bottom", "left", "right"))}
    for key, crop in crops.items():
        light = crop.min(axis=-1) > 150  # a light letter on the dark scan or band
        assert light.sum() > 5, key
        rows, cols = np.nonzero(light)
        crops[key] = light[rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # the glyph alone
    for a in crops:
        for b in crops:
            assert np.array_equal(crops[a], crops[b]) == (letters[a] == letters[b]), (a, b)


# --- orientation ----------------------------------------------------------------------------------------------------

def test_patient_right_is_on_the_viewers_left(tmp_path):
    right = box((30, 10, 5), (38, 20, 15))  # high x = patient's right
    widths = panel_widths()
    axial, coronal, _ = panels(render(tmp_path, {"right": right}), widths)
    for panel, w in ((axial, widths[0]), (coronal, widths[1])):
        cols = where(panel, COLOURS[0])[1]
        assert len(cols) > 50 and cols.max() < w * 0.3
    # A mask on the patient's left lands on the viewer's right.
    left = box((2, 10, 5), (10, 20, 15))
    axial, coronal, _ = panels(render(tmp_path, {"left": left}, name="l.png"), widths)
    assert where(axial, COLOURS[0])[1].min() > widths[0] * 0.7
    assert where(coronal, COLOURS[0])[1].min() > widths[1] * 0.7


def test_real_patient_b_liver_on_the_viewers_left_spleen_on_the_right(tmp_path):
    """The real DICOM series of patient B (cut down): liver and spleen must land where a radiologist expects them."""
    from pathlib import Path

    from vlseg.io.scan import load_label, load_scan

    real = Path(__file__).resolve().parents[1] / "data" / "real" / "patient_b"
    scan = load_scan(real / "dicom")
    label = load_label(real / "label.nii.gz", like=scan)
    masks = {"liver": label == 5, "spleen": label == 1}
    widths = panel_widths(scan.data.shape, scan.spacing)
    axial_w = widths[0]
    axial = panels(render(tmp_path, masks, image=scan.data, spacing=scan.spacing, window=(-200.0, 300.0)), widths)[0]
    liver_cols, spleen_cols = where(axial, COLOURS[0])[1], where(axial, COLOURS[1])[1]
    assert len(liver_cols) > 20 and len(spleen_cols) > 20
    assert liver_cols.mean() < axial_w / 2 < spleen_cols.mean()


def test_anterior_is_at_the_top_of_axial_and_left_of_sagittal(tmp_path):
    anterior = box((15, 24, 5), (25, 29, 15))  # high y = anterior
    widths = panel_widths()
    axial, _, sagittal = panels(render(tmp_path, {"front": anterior}), widths)
    rows = where(axial, COLOURS[0])[0]
    assert len(rows) > 50 and rows.max() < PANEL_MIN * 0.25
    cols = where(sagittal, COLOURS[0])[1]
    assert len(cols) > 50 and cols.max() < widths[2] * 0.25


def test_superior_is_at_the_top_of_coronal_and_sagittal(tmp_path):
    superior = box((15, 10, 15), (25, 20, 19))  # high z = superior
    widths = panel_widths()
    _, coronal, sagittal = panels(render(tmp_path, {"top": superior}), widths)
    for panel in (coronal, sagittal):
        rows = where(panel, COLOURS[0])[0]
        assert len(rows) > 50 and rows.max() < PANEL_MIN * 0.3
    inferior = box((15, 10, 1), (25, 20, 5))
    _, coronal, sagittal = panels(render(tmp_path, {"low": inferior}, name="i.png"), widths)
    for panel in (coronal, sagittal):
        assert where(panel, COLOURS[0])[0].min() > PANEL_MIN * 0.7


def test_slices_pass_through_the_smallest_mask(tmp_path):
    # Two masks side by side: the axial slice through the smaller one (z 6-14) also cuts the larger (z 6-14).
    a, b = box((2, 5, 6), (10, 12, 15)), box((30, 18, 6), (38, 25, 15))
    axial = panels(render(tmp_path, {"a": a, "b": b}), panel_widths())[0]
    assert len(where(axial, COLOURS[0])[0]) > 50 and len(where(axial, COLOURS[1])[0]) > 50
    # A small target far from a large one: the slices follow the small one, the large one is not cut there.
    c = box((18, 12, 0), (22, 16, 2))
    d = box((2, 5, 10), (10, 12, 20))
    axial = panels(render(tmp_path, {"c": c, "d": d}, name="cd.png"), panel_widths())[0]
    assert len(where(axial, COLOURS[0])[0]) > 0 and len(where(axial, COLOURS[1])[0]) == 0
    # A tumour-like mask inside an organ: both are drawn in every panel.
    organ, lesion = box((5, 5, 2), (35, 25, 18)), box((8, 8, 14), (11, 11, 17))
    for panel in panels(render(tmp_path, {"organ": organ, "lesion": lesion}, name="ol.png"), panel_widths()):
        assert len(where(panel, COLOURS[1])[0]) > 0


# --- colours and windowing ------------------------------------------------------------------------------------------

def test_fill_is_blended_and_contour_is_solid(tmp_path):
    image = np.full(SHAPE, 0.5, np.float32)  # mid grey with window (0, 1)
    m = box((10, 5, 5), (30, 25, 15))
    axial = panels(render(tmp_path, {"m": m}, image=image), panel_widths())[0]
    grey = 0.5 * 255
    expected_fill = np.rint((1 - ALPHA) * grey + ALPHA * np.asarray(COLOURS[0], float))
    centre = axial[PANEL_MIN // 2, panel_widths()[0] // 2].astype(float)
    assert np.allclose(centre, expected_fill, atol=1.5)
    corner = axial[PANEL_MIN - 1, panel_widths()[0] - 1].astype(float)  # outside the mask
    assert np.allclose(corner, grey, atol=1.5)
    rows, cols = where(axial, COLOURS[0])  # the contour: one pixel wide, around the filled area
    assert len(rows) > 100
    assert not np.all(axial[rows.min() + 3, cols.min() + 3:cols.max() - 3] == COLOURS[0])


def test_each_mask_has_its_own_colour(tmp_path):
    names = [f"m{i}" for i in range(12)]
    colours = [mask_colour(i) for i in range(12)]
    assert len(set(colours)) == 12 and all(len(set(c)) > 1 for c in colours)  # distinct, none grey
    assert colours[:len(COLOURS)] == COLOURS
    masks = {n: box((3 * i + 2, 5, 5), (3 * i + 4, 25, 15)) for i, n in enumerate(names)}
    png = render(tmp_path, masks)
    axial = panels(png, panel_widths())[0]
    for c in colours:
        assert len(where(axial, c)[0]) > 10


def test_explicit_window_and_percentile_window(tmp_path):
    image = np.zeros(SHAPE, np.float32)
    image[20:] = 40.0  # patient right half (high x), on the viewer's left
    image[:20] = 80.0
    axial = panels(render(tmp_path, {}, image=image, window=(0.0, 160.0)), panel_widths())[0]
    w = panel_widths()[0]
    assert np.allclose(axial[PANEL_MIN // 2, w // 8], 255 * 40 / 160, atol=1.5)
    assert np.allclose(axial[PANEL_MIN // 2, w - w // 8], 255 * 80 / 160, atol=1.5)
    # Without a window the 1st-99th percentiles (40 and 80) map to black and white.
    axial = panels(render(tmp_path, {}, image=image, window=None, name="p.png"), panel_widths())[0]
    assert axial[PANEL_MIN // 2, w // 8].max() <= 1 and axial[PANEL_MIN // 2, w - w // 8].min() >= 254


def test_all_empty_masks_and_odd_images_still_render(tmp_path):
    empty = {"absent": np.zeros(SHAPE, bool)}
    png = render(tmp_path, empty, image=np.full(SHAPE, 7.0), window=None, title="flat")  # constant scan
    assert not len(where(png[:PANEL_MIN], COLOURS[0])[0])
    assert len(where(png[PANEL_MIN:], COLOURS[0])[0]) > 20  # still listed in the legend
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    image[0, 0, 0] = np.nan
    render(tmp_path, {"m": box((1, 1, 1), (5, 5, 5)).astype(np.uint8)}, image=image, window=None, name="n.png",
           title="übersicht – 肝")


# --- writing --------------------------------------------------------------------------------------------------------

def test_writes_atomically_and_overwrites(tmp_path):
    out = tmp_path / "sub" / "overlay.png"
    save_overlay(np.zeros(SHAPE), {}, out)
    first = out.read_bytes()
    save_overlay(np.zeros(SHAPE), {"m": box((1, 1, 1), (9, 9, 9))}, out, title="again")
    assert out.read_bytes() != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["overlay.png"]
    assert os.stat(out).st_mode & 0o044  # readable like any other output, not private like a temp file


def test_failed_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # a folder where the PNG should go: os.replace fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        save_overlay(np.zeros(SHAPE), {}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("image, masks, kw", [
    (np.zeros((8, 8)), {}, {}),                                          # 2D image
    (np.zeros((8, 8, 8)), {"m": np.zeros((8, 8, 7), bool)}, {}),         # mask on another grid
    (np.zeros((8, 8, 8)), {}, {"spacing": (1.0, 0.0, 1.0)}),             # zero spacing
    (np.zeros((8, 8, 8)), {}, {"spacing": (1.0, 1.0)}),                  # two spacings
    (np.zeros((8, 8, 8)), {}, {"window": (5.0, 5.0)}),                   # empty window
    (np.zeros((8, 8, 8)), [np.zeros((8, 8, 8), bool)], {}),              # masks not a dict
])
def test_bad_input_raises_vlseg_error(tmp_path, image, masks, kw):
    with pytest.raises(VlsegError):
        save_overlay(image, masks, tmp_path / "x.png", **kw)
    assert not list(tmp_path.iterdir())
