"""The manifest: schema validation with file:line errors, filters, relative paths, atomic writes."""

import json
from pathlib import Path

import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.prepare.manifest import MANIFEST_SCHEMA, Case, read_manifest, write_manifest


def row(**over) -> dict:
    out = {"schema": MANIFEST_SCHEMA, "case_id": "A_000", "dataset": "A", "modality": "CT",
           "image": "DatasetA/imagesTr/A_000_0000.nii.gz", "label": "DatasetA/labelsTr/A_000.nii.gz",
           "classes": {"liver": [1, 2], "liver tumor": [2]}, "present": {"liver": True, "liver tumor": False},
           "shape": [40, 40, 32], "spacing": [3.0, 3.0, 2.5], "split": "train",
           "boxes": {"liver": [1, 2, 3, 10, 12, 14]}, "affine": [[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 2.5, 0],
                                                                 [0, 0, 0, 1]]}
    out.update(over)
    return out


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_resolves_paths_and_filters(tmp_path):
    path = write_rows(tmp_path / "m.jsonl", [row(), "", row(case_id="A_001", split="val"),
                                             row(case_id="B_000", dataset="B", split="test")])
    cases = read_manifest(path)
    assert [c.case_id for c in cases] == ["A_000", "A_001", "B_000"]
    first = cases[0]
    assert first.image == tmp_path.resolve() / "DatasetA/imagesTr/A_000_0000.nii.gz" and first.image.is_absolute()
    assert first.shape == (40, 40, 32) and first.spacing == (3.0, 3.0, 2.5)
    assert first.classes == {"liver": [1, 2], "liver tumor": [2]} and first.present["liver"] is True
    assert [c.case_id for c in read_manifest(path, split="val")] == ["A_001"]
    assert [c.case_id for c in read_manifest(path, datasets=["B"])] == ["B_000"]
    assert read_manifest(path, split="train", datasets=["B"]) == []
    with pytest.raises(VlsegError, match="unknown split 'dev'"):
        read_manifest(path, split="dev")


def test_write_is_relative_atomic_and_round_trips(tmp_path):
    cases = read_manifest(write_rows(tmp_path / "m.jsonl", [row(), row(case_id="A_001", split="val")]))
    out = write_manifest(tmp_path / "sub" / "copy.jsonl", cases)
    assert out == tmp_path / "sub" / "copy.jsonl"
    assert read_manifest(out) == cases
    first = json.loads(out.read_text().splitlines()[0])
    assert first["image"] == "../DatasetA/imagesTr/A_000_0000.nii.gz" and first["schema"] == MANIFEST_SCHEMA
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["copy.jsonl"]  # no temporary file left behind
    write_manifest(out, cases[:1])  # overwrite in place
    assert len(read_manifest(out)) == 1


def test_class_mask(tmp_path):
    case = read_manifest(write_rows(tmp_path / "m.jsonl", [row()]))[0]
    label = np.array([0, 1, 2, 3])
    assert case.class_mask(label, "liver").tolist() == [False, True, True, False]
    assert case.class_mask(label, "liver tumor").tolist() == [False, False, True, False]
    with pytest.raises(VlsegError, match="does not annotate 'spleen'"):
        case.class_mask(label, "spleen")


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(VlsegError, match=r"nope\.jsonl: manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(VlsegError, match="is not a file"):
        read_manifest(tmp_path)


BAD = [
    ("{broken", r"not valid JSON"),
    ("[1, 2]", r"expected a JSON object"),
    ({k: v for k, v in row().items() if k != "label"}, r"missing field 'label'"),
    ({k: v for k, v in row().items() if k != "schema"}, r"missing field 'schema'"),
    (row(schema=3), r"manifest schema 3 is newer"),
    ({k: v for k, v in row().items() if k != "boxes"}, r"missing field 'boxes' \(required from schema 2\)"),
    ({k: v for k, v in row().items() if k != "affine"}, r"missing field 'affine'"),
    (row(schema="1"), r"'schema' must be a positive integer"),
    (row(split="training"), r"unknown split 'training'"),
    (row(image=""), r"'image' must be a non-empty string"),
    (row(case_id=7), r"'case_id' must be a non-empty string"),
    (row(classes=["liver"]), r"'classes' must be an object"),
    (row(classes={"liver": [], "liver tumor": [2]}), r"class 'liver' must map to a non-empty list"),
    (row(classes={"liver": [1, "2"], "liver tumor": [2]}), r"class 'liver' must map"),
    (row(present={"liver": True}), r"'present' must cover exactly the annotated classes: no entry for 'liver tumor'"),
    (row(present={"liver": 1, "liver tumor": False}), r"'present' must be an object mapping class names to true"),
    (row(shape=[40, 40]), r"'shape' must be three positive integers"),
    (row(shape=[40, 40, 0]), r"'shape' must be three positive integers"),
    (row(spacing=[3.0, -1.0, 3.0]), r"'spacing' must be three positive numbers"),
]


@pytest.mark.parametrize("bad,problem", BAD, ids=[p for _, p in BAD])
def test_bad_line_names_file_line_and_problem(tmp_path, bad, problem):
    path = write_rows(tmp_path / "bad.jsonl", [row(case_id="ok"), "", bad])
    with pytest.raises(VlsegError, match=r"bad\.jsonl:3: " + problem):
        read_manifest(path)


def test_duplicate_case_id(tmp_path):
    path = write_rows(tmp_path / "dup.jsonl", [row(), row(split="val")])
    with pytest.raises(VlsegError, match=r"dup\.jsonl:2: duplicate case_id 'A_000' \(first on line 1\)"):
        read_manifest(path)


def test_case_to_json_uses_given_root(tmp_path):
    case = Case("c", "D", "CT", tmp_path / "x" / "img.nii.gz", tmp_path / "x" / "lab.nii.gz", {"spleen": [3]},
                {"spleen": False}, (8, 8, 8), (1.0, 1.0, 1.0), "test")
    out = case.to_json(tmp_path)
    assert out["image"] == "x/img.nii.gz" and out["label"] == "x/lab.nii.gz"
    assert out["shape"] == [8, 8, 8] and out["present"] == {"spleen": False} and out["split"] == "test"


def test_schema_1_lines_without_boxes_or_affine_are_still_read(tmp_path):
    old = {k: v for k, v in row(schema=1).items() if k not in ("boxes", "affine")}
    case = read_manifest(write_rows(tmp_path / "v1.jsonl", [old]))[0]
    assert case.boxes == {} and case.affine is None
    assert case.to_json(tmp_path)["schema"] == 1  # no affine to write: stays schema 1
    case.affine = np.eye(4).tolist()
    assert case.to_json(tmp_path)["schema"] == 2 and case.to_json(tmp_path)["boxes"] == {}
