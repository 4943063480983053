"""DICOM series and the file formats ITK reads (NRRD from 3D Slicer, MetaImage) → nibabel images with RAS affines.

SimpleITK does the reading (GDCM groups and sorts DICOM slices; ITK applies rescale slope/intercept); what it only
warns about or silently gets wrong for DICOM — missing or duplicate slices, uneven spacing, gantry tilt, several
series in one folder — is checked here and becomes one ``VlsegError`` line.  Both register as scan formats
(``vlseg.io.readers``): ITK files by suffix, and every folder is taken for a DICOM series (``read_dicom`` says what is
wrong with one that is not); ``load_scan`` takes the result to the RAS-canonical grid like any NIfTI file.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from vlseg.errors import VlsegError, first_line, shape_str
from vlseg.io.readers import scan_reader

__all__ = ["ITK_SUFFIXES", "is_dicom_series", "read_dicom", "read_itk"]

# Formats ITK reads (NRRD from 3D Slicer, MetaImage); NIfTI stays on nibabel, which keeps its header for outputs.
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


@scan_reader("itk", suffixes=ITK_SUFFIXES)
def read_itk(path: Path) -> nib.Nifti1Image:
    """An NRRD/MetaImage file → nibabel image with a RAS affine (ITK's direction/origin are LPS)."""
    if not path.exists():
        raise VlsegError(f"{path}: file not found")
    sitk = _sitk(path, f"{path.suffix} files")
    try:
        img = sitk.ReadImage(str(path))
        data = sitk.GetArrayFromImage(img)  # [z, y, x]
    except RuntimeError as exc:
        raise VlsegError(f"{path}: unreadable image ({first_line(exc).strip()})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise VlsegError(f"{path}: not a 3D image (shape {shape_str(img.GetSize())}, "
                         f"{img.GetNumberOfComponentsPerPixel()} components)")
    return _itk_to_nifti(img, data)


def _sitk(path: Path, what: str):
    """The SimpleITK module, or a one-line error saying ``what`` needs it."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise VlsegError(f"{path}: reading {what} needs SimpleITK (pip install SimpleITK)") from None
    return sitk


def _itk_to_nifti(img, data: np.ndarray) -> nib.Nifti1Image:
    """An ITK image's geometry (LPS direction/origin) and its [z, y, x] array → nibabel image with a RAS affine."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    affine[:3, 3] = lps_to_ras @ np.asarray(img.GetOrigin())
    return nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)


def _dicom_series_ids(sitk, folder: Path) -> tuple[str, ...]:
    """The Series Instance UIDs GDCM finds among the files directly in ``folder`` (subfolders are not searched)."""
    # ITK prints a warning of its own when a folder holds no series; the callers say it in one line instead.
    shown = sitk.ProcessObject_GetGlobalWarningDisplay()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject_SetGlobalWarningDisplay(shown)


def is_dicom_series(path) -> bool:
    """Whether ``path`` is a folder holding (at least) one DICOM series, i.e. something ``load_scan`` reads as DICOM.

    ``load_scan`` treats every folder as a DICOM series and says what is wrong with it; this only looks."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).expanduser().is_dir():
        return False
    try:
        import SimpleITK as sitk
    except ImportError:
        return False
    return bool(_dicom_series_ids(sitk, Path(path).expanduser()))


def _dicom_vector(value: str, n: int) -> np.ndarray | None:
    """A DICOM multi-valued decimal string ("a\\b\\c") → n floats, or None when it does not hold n numbers."""
    try:
        out = np.array([float(v) for v in value.replace(",", "\\").split("\\")])
    except ValueError:
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _check_slice_geometry(folder: Path, files, positions: np.ndarray, orientations: np.ndarray, img) -> None:
    """The slices (sorted as read) must share one orientation and lie evenly spaced along the normal of their image
    plane, and the grid ITK built must pass through every slice's position.

    ITK only *warns* about a missing slice or uneven spacing, and for a tilted stack (gantry tilt) it silently
    returns an unsheared grid; in each case the volume's world geometry would be wrong."""
    if np.max(np.abs(orientations - orientations[0])) > 1e-3:
        k = int(np.argmax(np.max(np.abs(orientations - orientations[0]), axis=1)))
        raise VlsegError(f"{folder}: DICOM slices have different orientations (ImageOrientationPatient of "
                         f"{Path(files[k]).name} differs from {Path(files[0]).name})")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    # Duplicates first, in any order: GDCM cannot sort slices that share a position and falls back to another order.
    order = np.argsort(positions @ normal)
    same = np.flatnonzero(np.linalg.norm(np.diff(positions[order], axis=0), axis=1) <= 1e-3)
    if same.size:
        a, b = (Path(files[order[same[0] + i]]).name for i in (0, 1))
        raise VlsegError(f"{folder}: two DICOM slices at the same position ({a} and {b}): duplicate files, or "
                         f"several series sharing one UID")
    steps = np.diff(positions, axis=0)
    gaps = np.linalg.norm(steps, axis=1)
    tol = 0.01 * float(gaps.mean())  # DS values carry limited digits; 1% of a slice step is far above that
    if gaps.max() - gaps.min() > tol:
        raise VlsegError(f"{folder}: DICOM slices are not evenly spaced (gaps from {gaps.min():.4g} to "
                         f"{gaps.max():.4g} mm): a slice is missing or the series is irregular")
    along = np.abs(steps @ normal) / gaps
    if along.min() < 0.9999:
        angle = float(np.degrees(np.arccos(np.clip(along.min(), -1.0, 1.0))))
        raise VlsegError(f"{folder}: DICOM slices are not stacked along the normal of the image plane (tilted by "
                         f"{angle:.2f}°, e.g. gantry tilt); resample the series to an orthogonal grid first")
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    grid = np.asarray(img.GetOrigin()) + np.outer(np.arange(len(files)), direction[:, 2] * img.GetSpacing()[2])
    off = float(np.max(np.linalg.norm(grid - positions, axis=1)))
    if off > tol:
        raise VlsegError(f"{folder}: the DICOM reader's grid misses the slice positions by up to {off:.3g} mm")


@scan_reader("dicom", folder=True, fallback=True)
def read_dicom(folder: Path) -> nib.Nifti1Image:
    """A folder holding one DICOM series (any file names) → nibabel image with a RAS affine.

    GDCM groups the files by Series Instance UID and sorts them by position along the slice normal; ITK reads them
    as one volume (rescale slope/intercept applied, so CT comes out in HU).  ``_check_slice_geometry`` then makes
    sure that volume's grid really is where the slices are."""
    sitk = _sitk(folder, "DICOM series")
    series = _dicom_series_ids(sitk, folder)
    if not series:
        subfolders = sum(1 for p in folder.iterdir() if p.is_dir())
        hint = f" (it has {subfolders} subfolder(s): point at the one holding the slices)" if subfolders else ""
        raise VlsegError(f"{folder}: no DICOM series found in this folder{hint}")
    if len(series) > 1:
        shown = ", ".join(uid or "<empty UID>" for uid in series[:2])
        raise VlsegError(f"{folder}: holds {len(series)} DICOM series ({shown}{', ...' if len(series) > 2 else ''}); "
                         f"point at a folder holding one series")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    if len(files) < 2:
        raise VlsegError(f"{folder}: the DICOM series has {len(files)} slice (a 2D image, or a multi-frame file, "
                         f"which is not supported); a 3D scan needs a series of at least 2 slices")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # keep each slice's tags: positions are checked below
    shown = sitk.ProcessObject_GetGlobalWarningDisplay()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK's own spacing warning; the checks below say it once
    try:
        img = reader.Execute()
        data = sitk.GetArrayFromImage(img)  # [z, y, x]
    except RuntimeError as exc:
        raise VlsegError(f"{folder}: unreadable DICOM series ({first_line(exc).strip()})") from None
    finally:
        sitk.ProcessObject_SetGlobalWarningDisplay(shown)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise VlsegError(f"{folder}: not a 3D single-channel series ({img.GetNumberOfComponentsPerPixel()} "
                         f"components per voxel)")
    positions, orientations = [], []
    for k, f in enumerate(files):
        tags = {key: reader.GetMetaData(k, key) if reader.HasMetaDataKey(k, key) else ""
                for key in ("0020|0032", "0020|0037")}
        position, orientation = _dicom_vector(tags["0020|0032"], 3), _dicom_vector(tags["0020|0037"], 6)
        if position is None or orientation is None:
            missing = "ImagePositionPatient" if position is None else "ImageOrientationPatient"
            raise VlsegError(f"{f}: DICOM slice without a readable {missing}")
        positions.append(position)
        orientations.append(orientation)
    _check_slice_geometry(folder, files, np.asarray(positions), np.asarray(orientations), img)
    return _itk_to_nifti(img, data)
