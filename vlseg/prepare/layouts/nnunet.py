"""nnU-Net v2 raw: ``dataset.json`` with ``channel_names`` and ``labels`` (name → value, or a region: a list of
values), images ``imagesTr/<case>_0000<file_ending>``, labels ``labelsTr/<case><file_ending>``.

An image may also be a DICOM series: a folder ``imagesTr/<case>_0000/`` holding the slice files of one series (any
names: ``CT.1.3.12...``, ``IM0001``, ``*.dcm``), next to ``labelsTr/<case><file_ending>``; series folders and image
files may be mixed in one dataset.  This is vlseg's extension, read but never written: nnU-Net itself does not accept
it, and every dataset vlseg writes passes nnU-Net's ``verify_dataset_integrity``::

    Dataset010_Abdomen/
        dataset.json          {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                               "file_ending": ".nii.gz"}
        imagesTr/case01_0000/ CT.1.3.12.2.1107.5.1.4.60064.3000..., CT.1.3.12.2.1107.5.1.4.60064.3000..., ...
        imagesTr/case02_0000.nii.gz
        labelsTr/case01.nii.gz   on the series' grid (any axis order: the world geometry must match)
        labelsTr/case02.nii.gz

The series is checked like any image (one series in the folder, evenly spaced slices along the slice normal, at least
two slices).  ``file_ending: ".nrrd"`` takes NRRD images and labels (``imagesTr/<case>_0000.nrrd``,
``labelsTr/<case>.nrrd``); a 3D Slicer label map named ``labelsTr/<case>.seg.nrrd`` (scalar, one layer) also belongs
to ``<case>``.  Recognised by a ``dataset.json`` without MSD's ``training`` list.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlseg.errors import VlsegError
from vlseg.prepare.layouts.base import Listing, dataset_description, dataset_layout


def _recognises(source: Path) -> bool:
    meta = dataset_description(source, required=False)
    return meta is not None and "training" not in meta


@dataset_layout("nnunet", recognises=_recognises)
def list_nnunet(source: Path, spec: dict, manifest: Path) -> Listing:
    meta = dataset_description(source)
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2:
        raise VlsegError(f"{source / 'dataset.json'}: file_ending must be a suffix such as '.nii.gz' or '.nrrd', "
                         f"got {ending!r}")
    labels = {str(n): [int(v)] if isinstance(v, int) else [int(x) for x in v] for n, v in meta["labels"].items()}
    label_files = sorted(p for p in (source / "labelsTr").glob(f"*{ending}") if len(p.name) > len(ending))
    if not label_files:
        raise VlsegError(f"{source / 'labelsTr'}: no label files ending in {ending!r} (the file_ending of "
                         f"dataset.json)")
    ids = {p.name[: -len(ending)] for p in label_files}
    return Listing(labels, [_case(source / "imagesTr", label, ending, ids) for label in label_files])


def _case(images: Path, label: Path, ending: str, ids: set[str]) -> tuple[str, Path, Path]:
    """(case id, image, label): the case id is the label's name minus file_ending...  but 3D Slicer names a
    segmentation ``<case>.seg.nrrd``: with file_ending ".nrrd" that leaves ``<case>.seg``, which names no image; then
    the case is ``<case>``, unless a label of that name exists as well."""
    case_id = label.name[: -len(ending)]
    image = nnunet_image(images, case_id, ending)
    stem = case_id[: -len(".seg")]
    if case_id.endswith(".seg") and stem and stem not in ids and not image.exists() and \
            nnunet_image(images, stem, ending).exists():
        case_id, image = stem, nnunet_image(images, stem, ending)
    return case_id, image, label


def nnunet_image(images: Path, case_id: str, ending: str) -> Path:
    """A case's (first channel) image in an nnU-Net ``imagesTr`` folder: the file ``<case>_0000<ending>``, or, when
    there is no such file, the DICOM series folder ``<case>_0000/``.  (The file's path when neither exists, so the
    error names what was expected.)"""
    image = images / f"{case_id}_0000{ending}"
    series = images / f"{case_id}_0000"
    return series if series.is_dir() and not image.exists() else image


def write_description(folder: Path, modality: str, labels: dict, num_training: int, file_ending: str = ".nii.gz",
                      **extra) -> Path:
    """``<folder>/dataset.json`` as nnU-Net v2 reads it: one channel (``modality``), ``labels`` (name → value, or a
    region: a list of values; background 0 added first), the training-case count and file ending, then ``extra``
    keys (``description``, ``regions_class_order`` ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"channel_names": {"0": modality}, "labels": {"background": 0, **labels}, "numTraining": num_training,
            "file_ending": file_ending, **extra}
    path = folder / "dataset.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path

