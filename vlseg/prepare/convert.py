"""Convert a dataset in the layout users already have into manifest lines (raw files stay where they are).

    vlseg prepare convert --source nnUNet_raw/Dataset003_Liver --map data_prep/maps/msd_liver.yaml \\
        --manifest corpus/manifest.jsonl [--val-fraction 0.1]

Layouts: nnU-Net v2 raw (``dataset.json`` with ``channel_names``/``labels`` name→value, ``imagesTr``/``labelsTr``),
Medical Segmentation Decathlon task folders (``dataset.json`` with ``labels`` value→name and a ``training`` list), and
TotalSegmentator-style folders of per-class masks (``<case>/<image>`` + ``<case>/segmentations/<name>.nii.gz``; the
map's ``image`` key names the image file, default ``ct.nii.gz``), whose masks are merged into one label map per case
written beside the manifest (``labels/<dataset>/<case>.nii.gz``, in the image's geometry).
The map YAML names the dataset and modality and sends local label names (or values) to canonical classes::

    dataset: MSDLiver
    modality: CT
    labels: {liver: liver, cancer: liver tumor}

In the nnU-Net layout an image may also be a DICOM series: a folder ``imagesTr/<case>_0000/`` holding the slice files
of one series (any names: ``CT.1.3.12...``, ``IM0001``, ``*.dcm``), next to ``labelsTr/<case><file_ending>``; series
folders and image files may be mixed in one dataset::

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
to ``<case>``.
A map may start from another with ``labels_from: other.yaml`` (relative to it) and add or change labels; ``--dataset``
and ``--split`` let one map serve several datasets (``--split test`` holds a whole dataset out).

Each case is checked (readable image, label on the image grid, only declared label values, finite voxels); a bad case
is reported with its file and problem and skipped, the others are written, and the command exits non-zero at the end.
Every run also writes ``convert_report_<dataset>.json`` beside the manifest (one per dataset, since several datasets
share a manifest), case ids as the manifest names them::

    {"dataset": "MSDLiver", "source": "...", "converted": ["MSDLiver_liver_0"],
     "errors": [{"case": "MSDLiver_liver_1", "file": ".../liver_1.nii.gz", "problem": "label values [7] are ..."}]}

Raw data is only read: nothing in ``--source`` is ever written, moved or deleted.
Cases of the same dataset already in the manifest are replaced; other datasets' lines are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vlseg.atomic import atomic_path
from vlseg.config import load_yaml
from vlseg.errors import VlsegError
from vlseg.io.scan import canonical_modality, load_label, load_scan
from vlseg.prepare.manifest import SPLITS, Case, bounding_boxes, read_manifest, write_manifest
from vlseg.vocab.vocabulary import Vocabulary


def read_layout(source: Path) -> tuple[dict[str, list[int]], list[tuple[str, Path, Path]]]:
    """→ (local label name → values, [(case id, image, label)]) for an nnU-Net v2 or MSD folder."""
    meta_path = source / "dataset.json"
    if not meta_path.is_file():
        raise VlsegError(f"{meta_path}: not found (expected an nnU-Net v2 or MSD dataset folder)")
    try:
        meta = json.loads(meta_path.read_text())
        raw_labels = meta["labels"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VlsegError(f"{meta_path}: unreadable dataset description ({exc})") from None
    if "training" in meta:  # MSD: labels value → name, explicit file list
        labels = {str(name): [int(value)] for value, name in raw_labels.items()}
        cases = []
        for item in meta["training"]:
            image, label = source / item["image"], source / item["label"]
            cases.append((Path(item["label"]).name.split(".")[0], image, label))
        return labels, cases
    ending = meta.get("file_ending", ".nii.gz")  # nnU-Net v2: name → value or region (list of values)
    if not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2:
        raise VlsegError(f"{meta_path}: file_ending must be a suffix such as '.nii.gz' or '.nrrd', got {ending!r}")
    labels = {str(n): [int(v)] if isinstance(v, int) else [int(x) for x in v] for n, v in raw_labels.items()}
    label_files = sorted(p for p in (source / "labelsTr").glob(f"*{ending}") if len(p.name) > len(ending))
    if not label_files:
        raise VlsegError(f"{source / 'labelsTr'}: no label files ending in {ending!r} (the file_ending of "
                         f"{meta_path.name})")
    ids = {p.name[: -len(ending)] for p in label_files}
    cases = []
    for label in label_files:
        case_id = label.name[: -len(ending)]  # the case id is the label's name minus file_ending...
        image = nnunet_image(source / "imagesTr", case_id, ending)
        # ...but 3D Slicer names a segmentation <case>.seg.nrrd: with file_ending ".nrrd" that leaves "<case>.seg",
        # which names no image; then the case is <case>, unless a label of that name exists as well.
        stem = case_id[: -len(".seg")]
        if case_id.endswith(".seg") and stem and stem not in ids and not image.exists() and \
                nnunet_image(source / "imagesTr", stem, ending).exists():
            case_id, image = stem, nnunet_image(source / "imagesTr", stem, ending)
        cases.append((case_id, image, label))
    return labels, cases


def nnunet_image(images: Path, case_id: str, ending: str) -> Path:
    """A case's (first channel) image in an nnU-Net ``imagesTr`` folder: the file ``<case>_0000<ending>``, or, when
    there is no such file, the DICOM series folder ``<case>_0000/``.  (The file's path when neither exists, so the
    error names what was expected.)"""
    image = images / f"{case_id}_0000{ending}"
    series = images / f"{case_id}_0000"
    return series if series.is_dir() and not image.exists() else image


def class_values(local: dict[str, list[int]], mapping: dict, vocabulary: Vocabulary, source: str) -> dict:
    """Canonical class → label values, closing over the hierarchy: a parent also covers the values of the annotated
    classes it includes, and a union class those of its parts."""
    direct: dict[str, set[int]] = {}
    for key, canonical in mapping.items():
        key = str(key)
        values = local.get(key) or ([int(key)] if key.isdigit() else None)
        if values is None:
            raise VlsegError(f"{source}: label {key!r} is not declared by the dataset ({', '.join(local)})")
        if vocabulary.resolve(str(canonical)) != canonical:
            raise VlsegError(f"{source}: {canonical!r} is not a canonical class (see `vlseg classes`)")
        direct.setdefault(canonical, set()).update(values)
    memo: dict[str, set[int] | None] = {}

    def values_of(name: str) -> set[int] | None:
        # A class is known when mapped directly, or when it is a union whose parts are all known; a known class
        # also covers whatever known classes it includes or is made of.
        if name not in memo:
            parts = {p: values_of(p) for p in vocabulary.includes[name] + vocabulary.union_of[name]}
            union_known = bool(vocabulary.union_of[name]) and all(parts[p] is not None
                                                                    for p in vocabulary.union_of[name])
            known = name in direct or union_known
            memo[name] = set(direct.get(name, ())).union(*(v for v in parts.values() if v)) if known else None
        return memo[name]

    return {name: sorted(values_of(name)) for name in vocabulary.names if values_of(name) is not None}


def check_case(case_id, image, label, classes, declared: set[int], dataset, modality, loaded=None) -> Case:
    """Validate one case (``loaded``: its scan and label array when already read) and describe it."""
    scan, lab = loaded or (None, None)
    if scan is None:
        scan = load_scan(image)
        lab = load_label(label, like=scan)
    found = set(np.unique(lab).tolist())
    undeclared = sorted(found - declared - {0})
    if undeclared:
        raise VlsegError(f"{label}: label values {undeclared} are not declared in the dataset description")
    boxes = bounding_boxes(lab, classes)
    present = {name: name in boxes for name in classes}
    return Case(case_id, dataset, modality, Path(image).resolve(), Path(label).resolve(), classes, present,
                tuple(scan.original_shape), tuple(scan.spacing), "train", boxes, scan.original_affine.tolist())


def merge_masks(case_dir: Path, image_name: str, mask_classes: dict[str, str], vocabulary: Vocabulary,
                out_path: Path):
    """Per-class binary masks → one label map (value i+1 for the i-th mapped mask), written like the image;
    returns ``(scan, label)`` so the case is not read again.

    A mask included in another (a tumour in its organ) is painted after it and wins; any other overlap is an error,
    since one label map cannot hold it."""
    from vlseg.io.writers import save_like

    scan = load_scan(case_dir / image_name)
    label = np.zeros(scan.data.shape, np.uint8)
    stems = list(mask_classes)
    depth = {s: len(vocabulary.parents(mask_classes[s])) for s in stems}  # parents first, then what they include
    for i in sorted(range(len(stems)), key=lambda k: depth[stems[k]]):
        path = case_dir / "segmentations" / f"{stems[i]}.nii.gz"
        mask = load_label(path, like=scan)
        if not set(np.unique(mask).tolist()) <= {0, 1}:
            raise VlsegError(f"{path}: not a binary mask (values {sorted(set(np.unique(mask).tolist()))[:5]})")
        mask = mask.astype(bool)
        for value in set(np.unique(label[mask]).tolist()) - {0}:
            other = stems[value - 1]
            if mask_classes[stems[i]] not in vocabulary.includes[mask_classes[other]]:
                raise VlsegError(f"{path}: overlaps {other}.nii.gz, which does not contain it")
        label[mask] = i + 1
    save_like(label, scan, out_path)
    return scan, label


def read_mask_folders(source: Path, spec: dict, manifest: Path):
    image_name = str(spec.get("image", "ct.nii.gz"))
    stems = [str(k) for k in spec["labels"]]
    local = {stem: [i + 1] for i, stem in enumerate(stems)}
    items = [(d.name, d / image_name, manifest.parent / "labels" / str(spec["dataset"]) / f"{d.name}.nii.gz")
             for d in sorted(source.iterdir()) if (d / "segmentations").is_dir()]
    if not items:
        raise VlsegError(f"{source}: no case folders with a segmentations/ folder inside")
    return local, items, image_name


def load_map(path: Path, seen: tuple = ()) -> dict:
    """A map YAML; ``labels_from: other.yaml`` (relative to it) takes that map's labels, which this one extends."""
    spec = load_yaml(path, "map file")
    base = spec.get("labels_from")
    if base:
        base_path = (path.parent / str(base)).resolve()
        if base_path in seen:
            raise VlsegError(f"{path}: labels_from {base!r} refers back to itself")
        inherited = load_map(base_path, (*seen, path.resolve())).get("labels") or {}
        spec["labels"] = {**inherited, **(spec.get("labels") or {})}
    return spec


def convert(source, mapping_path, manifest, val_fraction: float = 0.1, seed: int = 0, progress: bool = True,
            dataset: str | None = None, split: str | None = None):
    """Returns (cases written, [per-case error lines]).  ``dataset`` overrides the map's dataset name (one map can
    serve several datasets labelled the same way); ``split`` puts every case in that split (e.g. ``test`` for a
    held-out dataset) instead of drawing a validation fraction."""
    source, mapping_path, manifest = Path(source), Path(mapping_path), Path(manifest)
    spec = load_map(mapping_path)
    if dataset:
        spec["dataset"] = dataset
    if split is not None and split not in SPLITS:
        raise VlsegError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    for key in ("dataset", "modality", "labels"):
        if key not in spec:
            raise VlsegError(f"{mapping_path}: missing {key!r}")
    modality = canonical_modality(spec["modality"], where=str(mapping_path))
    vocabulary = Vocabulary.load(spec.get("vocabulary", "default"))
    mask_folders = not (source / "dataset.json").is_file() and source.is_dir()
    if mask_folders:
        local, items, image_name = read_mask_folders(source, spec, manifest)
    else:
        local, items = read_layout(source)
    classes = class_values(local, spec["labels"], vocabulary, str(mapping_path))
    declared = {v for values in local.values() for v in values}
    mask_classes = {str(k): str(v) for k, v in spec["labels"].items()}
    cases, errors = [], []
    report = {"dataset": str(spec["dataset"]), "source": str(source), "converted": [], "errors": []}
    for case_id, image, label in tqdm(items, desc=f"converting {spec['dataset']}", disable=not progress):
        case_id = f"{spec['dataset']}_{case_id}"
        try:
            loaded = merge_masks(Path(image).parent, image_name, mask_classes, vocabulary, Path(label)) \
                if mask_folders else None
            cases.append(check_case(case_id, image, label, classes, declared, str(spec["dataset"]), modality,
                                    loaded))
        except VlsegError as exc:
            errors.append(str(exc))
            # Errors read "<file>: <problem>"; the file may be the image, the label or one slice of a series.
            file, sep, problem = str(exc).partition(": ")
            report["errors"].append({"case": case_id, "file": file if sep else str(image),
                                     "problem": problem if sep else str(exc)})
    if split is not None:
        for case in cases:
            case.split = split
    else:
        rng = np.random.default_rng(seed)
        n_val = int(round(val_fraction * len(cases))) if len(cases) > 1 else 0
        for i in rng.permutation(len(cases))[:n_val]:
            cases[i].split = "val"
    kept = [c for c in read_manifest(manifest) if c.dataset != spec["dataset"]] if manifest.is_file() else []
    if cases:
        write_manifest(manifest, kept + cases)
    report["converted"] = [c.case_id for c in cases]
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(manifest.parent / f"convert_report_{spec['dataset']}.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return cases, errors
