"""An imported model is an ordinary vlseg model: evaluation and presence calibration run on it as on a trained one
(the small SAT built from the parity fixtures; no presence head, so presence is its highest logit)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vlseg.cli.import_ import main as import_main

FIXTURES = Path(__file__).parent / "fixtures" / "sat"


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from vlseg.infer.segmenter import Segmenter

    out = tmp_path_factory.mktemp("sat_workflow") / "model"
    assert import_main(["sat-nano", "--checkpoint", str(FIXTURES / "vision.pth"), "--text-checkpoint",
                        str(FIXTURES / "text.pth"), "--biolord", str(FIXTURES / "text_hf"), "--other-widths",
                        "-o", str(out)]) == 0
    return Segmenter.from_pretrained(out, device="cpu", spacing=8)  # a coarse grid: one window per phantom


def test_evaluate_and_calibrate_an_imported_model(segmenter, phantom_corpus):
    from vlseg.evaluate.evaluate import evaluate
    from vlseg.infer.calibrate import calibrate

    report = evaluate(segmenter, phantom_corpus, split="test", classes=["liver", "spleen"], progress=False,
                      heldout=False)
    assert report["cases"] == 2 and {r["class"] for r in report["rows"]} == {"liver", "spleen"}
    assert all(math.isfinite(r["dice"]) for r in report["rows"])
    chosen = calibrate(segmenter, phantom_corpus, split="test", progress=False)
    assert 0.0 <= chosen["presence_threshold"] <= 1.0
