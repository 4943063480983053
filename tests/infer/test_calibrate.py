"""Presence calibration: a threshold chosen on a validation split, stored with the checkpoint, used from then on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlseg.checkpoint import export_checkpoint, resolve_checkpoint
from vlseg.errors import VlsegError
from vlseg.infer.calibrate import CALIBRATION, best_threshold
from vlseg.infer.segmenter import Segmenter
from vlseg.prepare.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]


def test_best_threshold_separates_and_balances():
    t, score = best_threshold([0.9, 0.8, 0.7, 0.3, 0.2], [True, True, True, False, False])
    assert 0.3 < t < 0.7 and score == 1.0 and t == pytest.approx(0.5)
    # One absent target among many present ones still counts half: vetoing it is worth keeping one fewer present.
    t, score = best_threshold([0.9, 0.8, 0.7, 0.6, 0.65], [True, True, True, True, False])
    assert score == pytest.approx(0.5 * (3 / 4 + 1))  # keep 0.7-0.9, veto 0.65 (and lose 0.6)
    assert 0.65 < t <= 0.7
    with pytest.raises(VlsegError, match="both present and absent"):
        best_threshold([0.2, 0.4], [True, True])


def test_calibrate_command_stores_and_segmenter_uses_it(tiny_run, phantom_corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # Validation cases, each also declaring a class its label lacks (value 99 never occurs): absent targets.
    cases = read_manifest(phantom_corpus, split="val")
    for case in cases:
        missing = next(n for n in ("liver", "spleen", "liver tumor", "left kidney") if n not in case.classes)
        case.classes[missing] = [99]
        case.present[missing] = False
    manifest = write_manifest(tmp_path / "val.jsonl", cases)
    out = subprocess.run([sys.executable, "-m", "vlseg.cli", "calibrate", str(run), "--manifest", str(manifest),
                          "--split", "val", "--no-progress"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "presence threshold" in out.stdout and "balanced accuracy" in out.stdout
    stored = json.loads((resolve_checkpoint(run) / CALIBRATION).read_text())
    assert stored["split"] == "val" and stored["present"] > 0 and stored["absent"] > 0
    assert stored["balanced_accuracy"] >= stored["balanced_accuracy_before"]
    seg = Segmenter.from_pretrained(run)
    assert seg.presence_threshold == pytest.approx(stored["presence_threshold"]) and seg.calibration == stored
    assert Segmenter.from_pretrained(run, calibrated=False).presence_threshold == 0.5
    exported = export_checkpoint(run, tmp_path / "export")  # the threshold travels with a release copy
    assert Segmenter.from_pretrained(exported).presence_threshold == pytest.approx(stored["presence_threshold"])
    # Calibrating on the data one is scored on is refused.
    refused = subprocess.run([sys.executable, "-m", "vlseg.cli", "calibrate", str(run), "--split", "test"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
    assert refused.returncode == 2 and "test split" in refused.stderr


def test_calibrate_from_training_crops_stores_class_thresholds_that_segment_applies(tiny_run, phantom_corpus,
                                                                                    tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # The liver's datasets only, two crops a case: 4 present and 3 absent liver targets (which crops hold what does
    # not depend on the model), enough for a liver threshold of its own; the spleen and the tumour have too few.
    manifest = write_manifest(tmp_path / "m.jsonl", [c for c in read_manifest(phantom_corpus)
                                                     if c.dataset in ("PhantomLiver", "PhantomSpleen")])
    out = subprocess.run([sys.executable, "-m", "vlseg.cli", "calibrate", str(run), "--manifest", str(manifest),
                          "--from-training-crops", "--crops-per-case", "2", "--seed", "0", "--no-progress"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    stored = json.loads((resolve_checkpoint(run) / CALIBRATION).read_text())
    assert stored["source"] == "training crops" and stored["present"] > 0 and stored["absent"] > 0
    assert set(stored["temperature"]) == {"a", "b"} and set(stored["class_thresholds"]) == {"liver"}
    assert 0.0 <= stored["presence_threshold"] <= 1.0 and "liver: threshold" in out.stdout
    # A model this small draws few masks: the statistical test is fitted when a present target has one
    assert stored["statistical_test"] is None or stored["statistical_test"]["stats"]["*/*"]["n"] > 0
    # Segmenter applies a class's own threshold, the global one elsewhere; an argument overrides both.
    stored["class_thresholds"]["liver"] = 1.01  # a threshold no head reaches: the liver is always vetoed
    (resolve_checkpoint(run) / CALIBRATION).write_text(json.dumps(stored))
    seg = Segmenter.from_pretrained(run)
    image = read_manifest(phantom_corpus, split="test")[0].image
    result = seg.segment(image, ["liver", "spleen"], threshold=0.0)  # every voxel, unless vetoed
    assert result.extra["class_presence_thresholds"] == {"liver": 1.01}
    liver, spleen = result.results
    assert not liver.present and spleen.present == (spleen.presence_probability >= stored["presence_threshold"])
    forced = seg.segment(image, ["liver"], presence_threshold=0.0, threshold=0.0)
    assert forced.results[0].present and forced.extra["class_presence_thresholds"] == {}
    stored["class_thresholds"] = {"liver": "high"}  # a damaged class table is one line
    (resolve_checkpoint(run) / CALIBRATION).write_text(json.dumps(stored))
    with pytest.raises(VlsegError, match="not a calibration file"):
        Segmenter.from_pretrained(run)
