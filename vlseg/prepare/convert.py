"""Convert a dataset in the layout users already have into manifest lines (raw files stay where they are).

    vlseg prepare convert --source nnUNet_raw/Dataset003_Liver --map data_prep/maps/msd_liver.yaml \\
        --manifest corpus/manifest.jsonl [--val-fraction 0.1]

Layouts are a registered table (``vlseg.prepare.layouts``): nnU-Net v2 raw (``nnunet``), Medical Segmentation
Decathlon task folders (``msd``) and TotalSegmentator-style folders of per-class masks (``mask_folders``), each
described in its module.  The one layout that recognises ``--source`` is used, unless the map names one
(``layout: nnunet``).  The map YAML names the dataset and modality and sends local label names (or values) to
canonical classes::

    dataset: MSDLiver
    modality: CT
    labels: {liver: liver, cancer: liver tumor}

``labels: auto`` sends each local label name the vocabulary understands (a canonical name or one of its wordings) to
its class; names it does not know are left unannotated and listed as ``unmapped`` in the report (formats whose files
name their classes themselves, such as SAT-DS JSONL, are converted so).

Public datasets have ready-made maps, recipes (``vlseg.prepare.recipes``, ``vlseg prepare --recipe AMOS22 --source
DIR``).  Two more keys serve them: ``case_filter`` (a regular expression the source's case ids must match) and
``channel: N`` (4D multi-channel images: channel N is written as a 3D image, ``vlseg.prepare.channels``).

A map may start from another with ``extends: other.yaml`` (every key) or ``labels_from: other.yaml`` (its labels
only), both relative to it, and add or change keys and labels; ``--dataset`` and ``--split`` let one map serve several
datasets (``--split test`` holds a whole dataset out).

Each case is checked (readable image, label on the image grid, only declared label values, finite voxels); a bad case
is reported with its file and problem and skipped, the others are written, and the command exits non-zero at the end.
Every run also writes ``convert_report_<dataset>.json`` beside the manifest (one per dataset, since several datasets
share a manifest), case ids as the manifest names them::

    {"dataset": "MSDLiver", "source": "...", "converted": ["MSDLiver_liver_0"], "unmapped": [], "left_out": [],
     "errors": [{"case": "MSDLiver_liver_1", "file": ".../liver_1.nii.gz", "problem": "label values [7] are ..."}]}

Raw data is only read: nothing in ``--source`` is ever written, moved or deleted.
Cases of the same dataset already in the manifest are replaced; other datasets' lines are kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from vlseg.atomic import atomic_path
from vlseg.config import load_yaml
from vlseg.errors import VlsegError, split_error
from vlseg.io.scan import canonical_modality, load_label, load_scan
from vlseg.prepare.channels import channel_listing
from vlseg.prepare.layouts.base import Listing, choose_layout
from vlseg.prepare.manifest import SPLITS, Case, read_manifest, write_manifest
from vlseg.transforms.boxes import class_boxes
from vlseg.vocab.vocabulary import Vocabulary


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


def auto_mapping(local: dict[str, list[int]], vocabulary: Vocabulary) -> tuple[dict[str, str], list[str]]:
    """``labels: auto``: local label name → the canonical class the vocabulary reads it as (background and names it
    does not know are left out) → (mapping, unknown names)."""
    mapping, unmapped = {}, []
    for name, values in local.items():
        if not values or set(values) == {0}:
            continue
        canonical = vocabulary.resolve(name.replace("_", " "))
        if canonical is None:
            unmapped.append(name)
        else:
            mapping[name] = canonical
    return mapping, unmapped


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
    boxes = class_boxes(lab, classes)
    present = {name: name in boxes for name in classes}
    return Case(case_id, dataset, modality, Path(image).resolve(), Path(label).resolve(), classes, present,
                tuple(scan.original_shape), tuple(scan.spacing), "train", boxes, scan.original_affine.tolist())


def load_map(path: Path, seen: tuple = ()) -> dict:
    """A map YAML.  ``extends: other.yaml`` (relative to it) starts from every key of that map, ``labels_from:
    other.yaml`` from its labels only; this map's own keys replace the inherited ones, its labels add to them."""
    spec = load_yaml(path, "map file")
    for key in ("extends", "labels_from"):
        base = spec.pop(key, None)
        if not base:
            continue
        base_path = (path.parent / str(base)).resolve()
        if base_path in seen or base_path == path.resolve():
            raise VlsegError(f"{path}: {key} {base!r} refers back to itself")
        inherited = load_map(base_path, (*seen, path.resolve()))
        spec = {**(inherited if key == "extends" else {}), **spec,
                "labels": _merged_labels(inherited.get("labels"), spec.get("labels"))}
    return spec


def _merged_labels(inherited, own):
    """A map's labels over those it inherits; ``auto`` (or any other non-mapping) on either side is taken whole."""
    if isinstance(inherited, dict) and isinstance(own, dict):
        return {**inherited, **own}
    return inherited if own is None else own


def read_spec(mapping_path: Path, dataset: str | None, split: str | None, settings: dict | None = None) -> dict:
    """The map, with ``settings`` (key → value, e.g. ``root`` or ``image`` from the command line) replacing its keys
    and ``dataset`` overriding its dataset name, checked for the keys every conversion needs."""
    spec = {**load_map(mapping_path), **(settings or {})}
    if dataset:
        spec["dataset"] = dataset
    if split is not None and split not in SPLITS:
        raise VlsegError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    for key in ("dataset", "modality", "labels"):
        if key not in spec:
            raise VlsegError(f"{mapping_path}: missing {key!r}")
    return spec


def list_source(source: Path, spec: dict, mapping_path: Path, manifest: Path) -> Listing:
    """The source's cases and labels, read by the layout the map names (``layout:``) or else the one that
    recognises it."""
    try:
        layout = choose_layout(source, spec.get("layout"))
    except VlsegError as exc:
        if spec.get("layout") is None:
            raise
        raise VlsegError(f"{mapping_path}: {exc}") from None
    listing = select_cases(layout.list_cases(source, spec, manifest), spec, mapping_path)
    if spec.get("channel") is not None:  # one channel of 4D images, written as 3D images beside the manifest
        listing = channel_listing(listing, spec, manifest, str(mapping_path))
    return listing


def select_cases(listing: Listing, spec: dict, mapping_path: Path) -> Listing:
    """Only the cases whose id (as the source names it) matches the map's ``case_filter`` regular expression, when
    it has one (AMOS22: CT cases are amos_0001 … amos_0499, MR cases amos_0500 and up)."""
    pattern = spec.get("case_filter")
    if pattern is None:
        return listing
    try:
        regex = re.compile(str(pattern))
    except re.error as exc:
        raise VlsegError(f"{mapping_path}: case_filter {pattern!r} is not a regular expression ({exc})") from None
    kept = [case for case in listing.cases if regex.fullmatch(case[0])]
    if not kept:
        example = f" (e.g. {listing.cases[0][0]!r})" if listing.cases else ""
        raise VlsegError(f"{mapping_path}: no case id matches case_filter {pattern!r}{example}")
    return replace(listing, cases=kept)


def check_cases(listing: Listing, spec: dict, classes: dict, modality: str | None, vocabulary: Vocabulary,
                progress: bool, mapping: dict | None = None) -> tuple[list[Case], list[str], list[dict]]:
    """Check (and, where the layout builds labels, build) every case → (cases, error lines, report entries)."""
    declared = {v for values in listing.labels.values() for v in values}
    cases, errors, report = [], [], []
    for source_id, image, label in tqdm(listing.cases, desc=f"converting {spec['dataset']}", disable=not progress):
        case_id = f"{spec['dataset']}_{source_id}"
        try:
            cases.append(convert_case(listing, (source_id, Path(image), Path(label)), case_id, str(spec["dataset"]),
                                      (classes, declared), modality, vocabulary, mapping))
        except VlsegError as exc:
            errors.append(str(exc))
            # Errors read "<file>: <problem>"; the file may be the image, the label or one slice of a series.
            file, problem = split_error(exc, image)
            report.append({"case": case_id, "file": file, "problem": problem})
    return cases, errors, report


def convert_case(listing: Listing, entry: tuple[str, Path, Path], case_id: str, dataset: str, known: tuple,
                 modality: str | None, vocabulary: Vocabulary, mapping: dict | None) -> Case:
    """One listed case (``entry``: id as the source names it, image, label) → its manifest row.  ``known``: the
    dataset's (classes, declared label values).  A case the layout gives its own modality or local labels
    (``Listing.modalities``, a third element from ``load``) is described with them; ``mapping`` (local label →
    canonical class) then gives its classes."""
    source_id, image, label = entry
    classes, declared = known
    loaded = listing.load(image, label, vocabulary) if listing.load else None
    if loaded is not None and len(loaded) == 3:
        *loaded, local = loaded
        own = {k: v for k, v in (mapping or {}).items() if str(k) in local}
        classes = class_values(local, own, vocabulary, str(label))
        declared = {v for values in local.values() for v in values}
    case_modality = listing.modalities.get(source_id, modality)
    if case_modality is None:
        raise VlsegError(f"{image}: no modality (the map says 'modality: auto' and the source names none)")
    case = check_case(case_id, image, label, classes, declared, dataset, case_modality, loaded)
    case.split = listing.splits.get(source_id, "train")
    return case


def assign_splits(cases: list[Case], split: str | None, val_fraction: float, seed: int) -> None:
    """Every case into ``split``; without one, a seeded ``val_fraction`` of them into val (the rest stay train)."""
    if split is not None:
        for case in cases:
            case.split = split
        return
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(cases))) if len(cases) > 1 else 0
    for i in rng.permutation(len(cases))[:n_val]:
        cases[i].split = "val"


class Conversion(NamedTuple):
    cases: list[Case]  # written to the manifest
    errors: list[str]  # one line per case that failed
    report: dict  # as written to convert_report_<dataset>.json


def convert(source, mapping_path, manifest, val_fraction: float = 0.1, seed: int = 0, progress: bool = True,
            dataset: str | None = None, split: str | None = None, settings: dict | None = None) -> Conversion:
    """The cases written, the per-case error lines and the report.  ``dataset`` overrides the map's dataset name (one
    map can serve several datasets labelled the same way); ``split`` puts every case in that split (e.g. ``test`` for
    a held-out dataset) instead of drawing a validation fraction; ``settings`` replace map keys (``root``, ``image``,
    ``prompts`` ...) without a copy of the map."""
    source, mapping_path, manifest = Path(source), Path(mapping_path), Path(manifest)
    spec = read_spec(mapping_path, dataset, split, settings)
    # ``modality: auto``: each case's modality comes from the source (SAT-DS lines, CVPR-BiomedSegFM folders).
    auto_modality = str(spec["modality"]).strip().lower() == "auto"
    modality = None if auto_modality else canonical_modality(spec["modality"], where=str(mapping_path))
    vocabulary = Vocabulary.load(spec.get("vocabulary", "default"))
    listing = list_source(source, spec, mapping_path, manifest)
    if str(spec["dataset"]) == "auto":  # the dataset's own name, as the source gives it (SAT-DS JSONL)
        if not listing.dataset:
            raise VlsegError(f"{mapping_path}: 'dataset: auto' but {source} names no dataset; pass --dataset NAME")
        spec["dataset"] = listing.dataset
    mapping, unmapped = spec["labels"], []
    if mapping == "auto":
        mapping, unmapped = auto_mapping(listing.labels, vocabulary)
    if not isinstance(mapping, dict):
        raise VlsegError(f"{mapping_path}: labels must be a mapping (local label → canonical class) or 'auto'")
    classes = class_values(listing.labels, mapping, vocabulary, str(mapping_path))
    cases, errors, failed = check_cases(listing, spec, classes, modality, vocabulary, progress, mapping=mapping)
    if split is not None or not listing.splits:  # a dataset's own split (SAT-DS official_split) is kept
        assign_splits(cases, split, val_fraction, seed)
    kept = [c for c in read_manifest(manifest) if c.dataset != spec["dataset"]] if manifest.is_file() else []
    if cases:
        write_manifest(manifest, kept + cases)
    report = {"dataset": str(spec["dataset"]), "source": str(source), "converted": [c.case_id for c in cases],
              "unmapped": unmapped, "left_out": [str(k) for k in spec.get("unmapped") or {}], "errors": failed,
              **listing.report}
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(manifest.parent / f"convert_report_{spec['dataset']}.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return Conversion(cases, errors, report)
