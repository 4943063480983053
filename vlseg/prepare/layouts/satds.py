"""SAT-DS JSONL files (github zhaoziheng/SAT-DS, ``data/jsonl/<dataset>.jsonl``): one line per case::

    {"image": "data/nii/BTCV/.../img0001.nii.gz", "mask": "data/nii/BTCV/.../label0001.nii.gz",
     "label": ["spleen", "right kidney", ..., "left adrenal gland", "kidney", "adrenal gland"],
     "modality": "CT", "dataset": "BTCV", "official_split": "train", "patient_id": "img0001.nii.gz"}

``--source`` is one JSONL file, or a folder of them with the map's ``dataset`` naming the file (``<dataset>.jsonl``).

Paths: an existing absolute path is used as it is; otherwise it is looked for under the map's ``root:`` (the folder
the SAT-DS data was copied to: relative paths, and the tails of absolute ones written on another machine), under the
SAT-DS checkout the JSONL sits in (``<checkout>/data/jsonl/X.jsonl`` names ``data/nii/...``) and beside the JSONL.
A case whose file is found nowhere is a per-case error naming the file expected.

Labels: the mask is an integer map (value i+1 is ``label[i]``) or a multi-channel NIfTI (channel i is ``label[i]``;
channels may overlap).  SAT-DS's loader appends classes it merges itself (BTCV: 13 names, then "kidney" and "adrenal
gland"), so only the first K names are mask values: K is the map's ``annotated: {<dataset>: K}`` where given, else
the mask's largest value (an integer map; a name whose value a case does not reach is then left unannotated in that
case, never given a value) or its channel count.  Datasets whose values are not 1..K are listed in
``mask_values: {<dataset>: [v1, v2, ...]}`` (value of ``label[0]``, ``label[1]`` ...).  Merged names never get a
value: with ``labels: auto`` a merged class comes out annotated through the vocabulary (``union_of``) when its parts
are.  A multi-channel mask becomes one label map beside the manifest (``labels/<dataset>/<case>.nii.gz``): channel
i alone is value i+1, and every other combination of channels found in the case gets a value of its own, which
each of its channels' classes covers — exact where channels overlap.

Each line's ``modality`` gives the case's (``CT``; ``MRI`` and ``MRI T1/T2/FLAIR/DWI/ADC`` are MR; ``PET`` and others
are per-case errors); ``official_split`` gives its split (val/valid → val, test → test, train and unknown → train)
unless ``--split`` says otherwise; the case id is ``patient_id`` (file suffix dropped; the image name or line number
added where several lines share it).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

from vlseg.errors import VlsegError, first_line, shape_str
from vlseg.io.nifti import read_nifti_channels
from vlseg.io.scan import Scan, canonical_modality, load_label, load_scan
from vlseg.io.writers import save_like
from vlseg.prepare.layouts.base import Listing, dataset_layout

SPLITS = {"train": "train", "unknown": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_CHANNELS = 62  # channel combinations are coded as bits of an int64


@dataclass
class _Line:
    case_id: str
    image: Path
    mask: Path
    label: Path  # the mask, or the label map built from a multi-channel mask
    names: list[str]
    values: list[int] | None  # mask value of names[i]; None: i + 1
    annotated: int | None  # how many names are mask values; None: read on the mask
    channels: bool  # the mask is multi-channel
    problem: str | None = None  # why the line cannot be converted


def _recognises(source: Path) -> bool:
    if source.is_file():
        return source.name.endswith(".jsonl")
    return source.is_dir() and any(source.glob("*.jsonl"))


@dataset_layout("satds", recognises=_recognises)
def list_satds(source: Path, spec: dict, manifest: Path) -> Listing:
    path = _jsonl_file(source, spec)
    records = _read_records(path)
    names = {str(r.get("dataset")) for _, r in records if isinstance(r, dict) and r.get("dataset")}
    if len(names) > 1:
        raise VlsegError(f"{path}: lines of several datasets ({', '.join(sorted(names))}); convert one at a time")
    name = names.pop() if names else None
    out = manifest.parent / "labels" / str(name if spec["dataset"] == "auto" else spec["dataset"])
    lines, modalities, splits, labels = {}, {}, {}, {}
    for (number, record), case_id in zip(records, _case_ids(records)):
        line = _line(path, number, record, case_id, spec, out)
        lines[(str(line.image), str(line.label))] = line
        modality = _modality(record, line) if line.problem is None else None
        if modality is not None:
            modalities[case_id] = modality
            splits[case_id] = SPLITS.get(str(record.get("official_split", "unknown")).lower(), "train")
            k = line.annotated if line.annotated is not None else len(line.names)
            for i, label_name in enumerate(line.names[:k]):
                labels.setdefault(label_name, [line.values[i] if line.values else i + 1])
    cases = [(line.case_id, line.image, line.label) for line in lines.values()]
    merged = sorted({n for line in lines.values() if line.annotated is not None for n in line.names[line.annotated:]})
    return Listing(labels, cases, partial(_load_case, lines=lines), modalities=modalities, dataset=name,
                   report={"merged_labels": merged}, splits=splits)


def _jsonl_file(source: Path, spec: dict) -> Path:
    if source.is_file():
        return source
    dataset = str(spec["dataset"])
    path = source / f"{dataset}.jsonl"
    if dataset == "auto" or not path.is_file():
        found = ", ".join(sorted(p.stem for p in source.glob("*.jsonl"))[:8])
        raise VlsegError(f"{path}: not found; name the dataset whose JSONL to convert (--dataset NAME; found: "
                         f"{found} ...)")
    return path


def _read_records(path: Path) -> list[tuple[int, dict | str]]:
    """(line number, parsed line or the reason it is unreadable) for each non-empty line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise VlsegError(f"{path}: cannot read ({first_line(exc)})") from None
    records = []
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            try:
                records.append((number, json.loads(raw)))
            except ValueError as exc:
                records.append((number, f"{path}: line {number} is not JSON ({first_line(exc)})"))
    if not records:
        raise VlsegError(f"{path}: no lines")
    return records


def _case_ids(records) -> list[str]:
    """Case ids from ``patient_id``: made unique by the image's name, then by the line number."""
    def base(number, record):
        if not isinstance(record, dict) or not record.get("patient_id"):
            return f"line{number}"
        pid = str(record["patient_id"]).strip().replace("/", "_").replace(" ", "_")
        return pid.removesuffix(".gz").removesuffix(".nii")

    def image_stem(record):
        return Path(str(record.get("image", "") if isinstance(record, dict) else "")).name.split(".")[0]

    ids = [base(n, r) for n, r in records]
    counts = Counter(ids)
    ids = [f"{i}_{image_stem(r)}" if counts[i] > 1 else i for i, (_, r) in zip(ids, records)]
    counts = Counter(ids)
    return [f"{i}_line{n}" if counts[i] > 1 else i for i, (n, _) in zip(ids, records)]


def _line(path: Path, number: int, record, case_id: str, spec: dict, out: Path) -> _Line:
    where = f"{path}: line {number}"
    if isinstance(record, str):
        return _Line(case_id, path, path, _placeholder(path, case_id), [], None, None, False, record)
    missing = [k for k in ("image", "mask", "label", "modality") if k not in record]
    names = record.get("label")
    if missing or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problem = f"{where} lacks {', '.join(missing)}" if missing else f"{where}: 'label' is not a list of names"
        return _Line(case_id, path, path, _placeholder(path, case_id), [], None, None, False, problem)
    root = Path(str(spec["root"])).expanduser() if spec.get("root") else None
    try:
        image, mask = (_resolve(str(record[k]), path, root) for k in ("image", "mask"))
    except VlsegError as exc:
        return _Line(case_id, path, path, _placeholder(path, case_id), names, None, None, False, str(exc))
    dataset = str(record.get("dataset", ""))
    values = (spec.get("mask_values") or {}).get(dataset)
    annotated = len(values) if values else (spec.get("annotated") or {}).get(dataset)
    channels = _is_multichannel(mask)
    label = out / f"{case_id}.nii.gz" if channels else mask
    line = _Line(case_id, image, mask, label, names, [int(v) for v in values] if values else None,
                 None if annotated is None else int(annotated), channels)
    if line.annotated is not None and line.annotated > len(names):
        line.problem = f"{where}: {len(names)} label names, fewer than the {line.annotated} the map declares"
    return line


def _placeholder(jsonl: Path, case_id: str) -> Path:
    """A distinct label path for a line that names no usable files (it is reported, never read)."""
    return jsonl.parent / f"{jsonl.name}#{case_id}"


def _resolve(raw: str, jsonl: Path, root: Path | None) -> Path:
    """Where a path written in a JSONL line is on this machine; the first place looked when it is nowhere."""
    path = Path(raw).expanduser()
    if path.is_absolute() and path.exists():
        return path
    tails = [Path(*path.parts[i:]) for i in range(1 if path.is_absolute() else 0, len(path.parts))]
    bases = [root] if root is not None else []
    if jsonl.parent.name == "jsonl" and jsonl.parent.parent.name == "data":
        bases.append(jsonl.parent.parent.parent)  # a SAT-DS checkout: data/jsonl/X.jsonl names data/nii/...
    bases.append(jsonl.parent)
    candidates = [base / tail for base in bases for tail in (tails[:1] if base != root else tails)]
    return next((c for c in candidates if c.exists()), None) or _missing(path, candidates, root)


def _missing(path: Path, candidates: list[Path], root: Path | None):
    """A line's file found nowhere: the error names the file expected (for a relative path, the first place looked;
    for an absolute one, the path as written)."""
    expected = path if path.is_absolute() or not candidates else candidates[0]
    under = f" nor under root {root}" if root is not None and path.is_absolute() else ""
    raise VlsegError(f"{expected}: file not found{under} (named by a SAT-DS line)")


def _is_multichannel(mask: Path) -> bool:
    try:
        shape = nib.load(mask).shape  # the header only
    except Exception:  # noqa: BLE001 - a missing or bad mask is reported when the case is read
        return False
    return len(shape) == 4 and shape[3] > 1


def _modality(record: dict, line: _Line) -> str | None:
    """CT or MR from the line's ``modality`` ("MRI T2" is MR); anything else becomes the line's problem."""
    text = str(record["modality"]).strip()
    try:
        return canonical_modality(text.split()[0] if text else text)
    except VlsegError:
        line.problem = f"{line.image}: modality {text!r} (SAT-DS line) is not one vlseg converts (CT or MR)"
        return None


def _load_case(image: Path, label: Path, vocabulary, lines: dict) -> tuple:
    """Read one case → (scan, label map, the case's local labels: name → values)."""
    line = lines[(str(image), str(label))]
    if line.problem:
        raise VlsegError(line.problem)
    scan = load_scan(image)
    if line.channels:
        return _from_channels(scan, line)
    lab = load_label(line.mask, like=scan)
    top = int(lab.max())
    if line.values is None and top > len(line.names):
        raise VlsegError(f"{line.mask}: label value {top}, but the line names only {len(line.names)} labels")
    k = line.annotated if line.annotated is not None else top
    values = line.values or list(range(1, k + 1))
    local: dict[str, list[int]] = {}
    for name, value in zip(line.names[:k], values):
        local.setdefault(name, []).append(int(value))
    return scan, lab, local


def _from_channels(scan: Scan, line: _Line) -> tuple:
    """A multi-channel mask → one label map (written beside the manifest), the case's local labels."""
    channels = read_channels(line.mask, scan)
    k = line.annotated if line.annotated is not None else len(channels)
    if len(channels) > len(line.names) or len(channels) < k:
        raise VlsegError(f"{line.mask}: {len(channels)} channels, but the line names {len(line.names)} labels "
                         f"({k} of them mask channels)")
    label, local = combine_channels(channels[:k], line.names[:k], str(line.mask))
    save_like(label, scan, line.label, dtype=np.uint8 if label.max() <= 255 else np.uint16)
    return scan, label, local


def read_channels(path: Path, scan: Scan) -> np.ndarray:
    """A 4D NIfTI mask (X, Y, Z, C) on the scan's grid → boolean channels [C, X, Y, Z] on its canonical grid."""
    img = read_nifti_channels(path)
    data = np.asarray(img.dataobj)
    if tuple(data.shape[:3]) != tuple(scan.original_shape):
        raise VlsegError(f"{path}: mask shape {shape_str(data.shape)} is not channels on the image's grid "
                         f"{shape_str(scan.original_shape)} ({scan.name})")
    if float(np.max(np.abs(img.affine - scan.original_affine))) > 1e-3:
        raise VlsegError(f"{path}: mask grid does not match image {scan.name} (affines differ)")
    return scan.to_canonical(np.moveaxis(data, 3, 0) > 0.5)


def combine_channels(channels: np.ndarray, names: list[str], where: str) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Boolean channels [K, X, Y, Z] → (label map, name → values): channel i alone is value i + 1; each other
    combination found gets K + 1, K + 2 ... (in order of its channel set); a name covers every value whose
    combination holds its channel."""
    k = len(channels)
    if k > MAX_CHANNELS:
        raise VlsegError(f"{where}: {k} channels; at most {MAX_CHANNELS} are supported")
    codes = np.zeros(channels.shape[1:], np.int64)
    for i, channel in enumerate(channels):
        codes |= channel.astype(np.int64) << i
    value_of = {1 << i: i + 1 for i in range(k)}
    combinations = [int(c) for c in np.unique(codes) if c and int(c) not in value_of]
    value_of.update({code: k + 1 + j for j, code in enumerate(combinations)})
    keys = np.array(sorted(value_of), np.int64)
    lookup = np.array([value_of[c] for c in keys], np.int32)
    label = np.zeros(codes.shape, np.int32)
    inside = codes > 0
    label[inside] = lookup[np.searchsorted(keys, codes[inside])]
    local: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        local.setdefault(name, []).extend(v for c, v in value_of.items() if c >> i & 1)
    return label, {n: sorted(set(v)) for n, v in local.items()}
