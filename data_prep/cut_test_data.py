"""Cut the small real test case (patient B) out of TotalSegmentator's reference files.

    python -m data_prep.cut_test_data --source <totalsegmentator-2.18.0>/tests/reference_files --out tests/data/real

The source is TotalSegmentator's example DICOM series (``example_ct_dicom/``: 20 axial slices of 512x512, 0.977 mm
pixels, 2 mm apart, JPEG 2000 lossless, a real abdominal CT) and its label map (``example_seg_dicom.nii.gz``: the
"total" task's 117 classes, model output, stored in its own axis order: LAS, where the series is LPS).  The cut keeps

* ``SLICES`` consecutive slices of the series, and of those a box of ``COLUMNS`` x ``ROWS`` pixels (around liver and
  spleen), every ``STEP``-th pixel in-plane: origin and pixel spacing are set to what the kept pixels really are;
* the label map's voxels at exactly those positions, kept in the label file's OWN axis order and with its own affine
  (so the label and the series still differ in axis order and agree only in world space, as in the source);
* the label names (``class_map["total"]`` of ``totalsegmentator/map_to_binary.py``, read as data).

It writes ``<out>/patient_b/dicom/`` (one DICOM file per slice, JPEG 2000 lossless like the source, rescale
intercept -1024 so the stored values differ from HU, deterministic UIDs), ``<out>/patient_b/label.nii.gz`` and
``<out>/patient_b/labels.json`` (name → value), then reads both back through ``vlseg.io`` and checks voxel values and
world coordinates against the source.  The tags kept from the source are listed in ``KEPT_TAGS``; nothing identifying
a person is in the source or the cut.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import locale
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from vlseg.errors import VlsegError, run_guarded

SERIES = "example_ct_dicom"
LABEL = "example_seg_dicom.nii.gz"
CLASS_MAP = Path("..") / ".." / "totalsegmentator" / "map_to_binary.py"  # relative to tests/reference_files

# The cut, in the series' own voxel indices (ITK order: column i → patient left, row j → posterior, slice k → superior,
# slices sorted by position).  Slices 8-11 hold liver and spleen; the box holds both with a margin.
SLICES = (8, 12)
COLUMNS = (88, 408)
ROWS = (160, 416)
STEP = 2  # in-plane: every 2nd pixel, so the spacing doubles (0.977 → 1.953 mm)

# Descriptive tags copied from each source slice; geometry, UIDs and pixel format are written anew.
KEPT_TAGS = ("0008|0008", "0008|0020", "0008|0021", "0008|0022", "0008|0023", "0008|0030", "0008|0031", "0008|0032",
             "0008|0033", "0008|0060", "0008|0070", "0008|103e", "0008|1090", "0018|0015", "0018|0050", "0018|0060",
             "0018|1210", "0018|5100", "0020|0012", "0020|0013", "0020|0052", "0020|1041", "0028|1050", "0028|1051",
             "0028|1054")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def uid(*parts) -> str:
    """A deterministic DICOM UID (the 2.25 root takes a UUID as a decimal number): re-running gives the same files."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'vlseg:tests/data/real/' + '/'.join(map(str, parts))).int}"


def decimal_string(value: float) -> str:
    """A DICOM DS value (at most 16 characters) without needless rounding: -163.57421875 stays exact."""
    text = f"{value:.8f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.10g}"


@contextlib.contextmanager
def locale_kept():
    """GDCM's DICOM writer leaves the C library's locale at "C" (seen with SimpleITK 2.5); put it back afterwards."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def read_series(folder: Path):
    """→ (SimpleITK image in HU, reader holding each slice's tags), slices sorted by position."""
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise VlsegError(f"{folder}: expected one DICOM series, found {len(ids)}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    reader.MetaDataDictionaryArrayUpdateOn()
    return reader.Execute(), reader


def write_series(cut, reader, out: Path) -> list[Path]:
    """One DICOM file per slice of ``cut`` (slice k of the cut came from source slice ``SLICES[0] + k``)."""
    import SimpleITK as sitk

    study, series = uid("patient_b", "study"), uid("patient_b", "series")
    direction = np.asarray(cut.GetDirection()).reshape(3, 3)
    spacing = cut.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # use the UIDs set below
    writer.SetImageIO("GDCMImageIO")  # the file names have no extension to choose the writer by
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG2000")  # lossless, like the source; the read-back check below proves it
    files = []
    with locale_kept():
        for k in range(cut.GetSize()[2]):
            source_slice = SLICES[0] + k
            slab = cut[:, :, k:k + 1]
            for key in KEPT_TAGS:
                if reader.HasMetaDataKey(source_slice, key):
                    slab.SetMetaData(key, reader.GetMetaData(source_slice, key).strip())
            sop = uid("patient_b", "slice", source_slice)
            tags = {
                "0008|0016": CT_IMAGE_STORAGE, "0008|0018": sop, "0020|000d": study, "0020|000e": series,
                "0010|0010": "PatientB^TotalSegmentatorExample", "0010|0020": "patient_b",
                "0020|0032": "\\".join(decimal_string(v) for v in slab.GetOrigin()),
                "0020|0037": "\\".join(decimal_string(v) for v in (*direction[:, 0], *direction[:, 1])),
                "0028|0030": f"{decimal_string(spacing[1])}\\{decimal_string(spacing[0])}",  # row, column spacing
                "0028|1052": "-1024", "0028|1053": "1",  # ITK stores HU + 1024; readers apply the intercept
                "0020|4000": f"vlseg test cut of slice {source_slice + 1}/20 (sorted by position): columns "
                             f"{COLUMNS[0]}-{COLUMNS[1] - 1}, rows {ROWS[0]}-{ROWS[1] - 1}, in-plane step {STEP}",
            }
            for key, value in tags.items():
                slab.SetMetaData(key, value)
            path = out / f"CT.{sop}"  # named like the source's files, without an extension
            writer.SetFileName(str(path))
            writer.Execute(slab)
            files.append(path)
    return files


def cut_label(label: nib.Nifti1Image, series_affine: np.ndarray, box) -> nib.Nifti1Image:
    """The label voxels at the cut's positions, in the label file's own axis order.

    ``series_affine`` is the RAS affine of the series' [i, j, k] array, ``box`` its (start, stop, step) per axis.
    The label's grid must be the series' up to axis order and direction (a signed permutation of voxel indices)."""
    to_label = np.linalg.inv(label.affine) @ series_affine  # series voxel index → label voxel index
    perm = np.rint(to_label[:3, :3])
    shift = np.rint(to_label[:3, 3])
    if not (np.allclose(to_label[:3, :3], perm, atol=1e-4) and np.allclose(to_label[:3, 3], shift, atol=1e-3)
            and np.array_equal(np.abs(perm).sum(axis=0), np.ones(3))):
        raise VlsegError(f"{label.get_filename()}: not on the series' grid (voxel map {np.round(to_label, 4)})")
    slices, steps, start = [], [], []
    for a in range(3):  # label axis a runs along series axis b, forwards (+1) or backwards (-1)
        b = int(np.argmax(np.abs(perm[a])))
        first, stop, step = box[b]
        last = first + step * ((stop - first - 1) // step)
        ends = sorted(perm[a, b] * np.array([first, last]) + shift[a])
        lo, hi = int(ends[0]), int(ends[1])
        slices.append(slice(lo, hi + 1, step))
        steps.append(step)
        start.append(lo)
    data = np.asarray(label.dataobj)[tuple(slices)]
    affine = label.affine.copy()
    affine[:3, :3] = label.affine[:3, :3] @ np.diag(steps)
    affine[:3, 3] = (label.affine @ np.array([*start, 1.0]))[:3]
    out = nib.Nifti1Image(data.astype(np.uint8), affine)
    out.set_sform(affine, code=int(label.header["sform_code"]) or 2)
    out.set_qform(affine, code=int(label.header["qform_code"]) or 1)
    return out


def verify(source: Path, out: Path, box) -> dict:
    """Read source and cut back through vlseg and compare voxel values and world coordinates; → label statistics."""
    from vlseg.io.scan import load_label, load_scan

    full = load_scan(source / SERIES)
    cut = load_scan(out / "dicom")
    (i0, _, si), (j0, _, sj), (k0, _, sk) = box
    expected_affine = full.original_affine @ np.array([[si, 0, 0, i0], [0, sj, 0, j0], [0, 0, sk, k0], [0, 0, 0, 1]])
    if not np.allclose(cut.original_affine, expected_affine, atol=1e-4):
        raise VlsegError(f"{out / 'dicom'}: geometry of the cut is off:\n{cut.original_affine}\n{expected_affine}")
    expected = full.to_original(full.data)[tuple(slice(*b) for b in box)]
    if not np.array_equal(cut.to_original(cut.data), expected):
        raise VlsegError(f"{out / 'dicom'}: voxel values of the cut differ from the source's (lossy compression?)")
    label = load_label(out / "label.nii.gz", like=cut)  # on the cut's grid once both are canonical
    full_label = load_label(source / LABEL, like=full)
    if not np.array_equal(cut.to_original(label), full.to_original(full_label)[tuple(slice(*b) for b in box)]):
        raise VlsegError(f"{out / 'label.nii.gz'}: label values differ from the source's at the cut's positions")
    stats = {"shape": list(cut.original_shape), "spacing": [round(s, 4) for s in cut.spacing]}
    for name, value in (("liver", 5), ("spleen", 1)):
        stats[f"{name} voxels"] = int((label == value).sum())
        stats[f"{name} mean HU"] = round(float(cut.data[label == value].mean()), 1)
    stats["outside mean HU"] = round(float(cut.data[label == 0].mean()), 1)
    return stats


def cut(source: Path, out: Path) -> dict:
    from vlseg.io.scan import load_scan
    from vlseg.prepare.samples import totalsegmentator_class_map

    source, out = Path(source), Path(out) / "patient_b"
    for needed in (source / SERIES, source / LABEL, source / CLASS_MAP):
        if not needed.exists():
            raise VlsegError(f"{needed}: not found (--source must be TotalSegmentator's tests/reference_files)")
    image, reader = read_series(source / SERIES)
    box = ((*COLUMNS, STEP), (*ROWS, STEP), (*SLICES, 1))  # (start, stop, step) per series axis i, j, k
    if out.exists():
        shutil.rmtree(out)
    (out / "dicom").mkdir(parents=True)
    # SimpleITK's slicing keeps the geometry right: the origin moves to the first kept pixel, the spacing scales.
    write_series(image[slice(*box[0]), slice(*box[1]), slice(*box[2])], reader, out / "dicom")
    series_affine = load_scan(source / SERIES).original_affine
    nib.save(cut_label(nib.load(source / LABEL), series_affine, box), out / "label.nii.gz")
    names = {name: value for value, name in sorted(totalsegmentator_class_map(source / CLASS_MAP, "total").items())}
    (out / "labels.json").write_text(json.dumps(names, indent=1) + "\n")
    return verify(source, out, box)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.cut_test_data", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="TotalSegmentator's tests/reference_files folder")
    parser.add_argument("--out", default="tests/data/real", help="patient_b/ is (re)written inside")
    args = parser.parse_args(argv)

    def go():
        stats = cut(Path(args.source), Path(args.out))
        size = sum(p.stat().st_size for p in (Path(args.out) / "patient_b").rglob("*") if p.is_file())
        print(json.dumps(stats))
        print(f"wrote {Path(args.out) / 'patient_b'} ({size / 1024:.0f} kB)")

    return run_guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
