"""evaluate.py on a tiny checkpoint: per-case CSV, JSON summary, absent classes counted as false positives."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlseg import Segmenter
from vlseg.evaluate.evaluate import evaluate
from vlseg.evaluate.report import format_table
from vlseg.prepare.manifest import read_manifest, write_manifest
from vlseg.vocab.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[2]


def test_evaluate_cli_writes_csv_and_summary(tiny_run, phantom_corpus, tmp_path):
    out = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tiny_run), "--manifest",
                          str(phantom_corpus), "--split", "test", "--out", str(tmp_path / "ev"), "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "liver tumor" in out.stdout and "summary:" in out.stdout
    all_rows = list(csv.DictReader(open(tmp_path / "ev" / "per_case.csv")))
    rows = [r for r in all_rows if r["wording"] == "name"]
    cases = read_manifest(phantom_corpus, split="test")
    assert len(rows) == sum(len(c.classes) for c in cases)
    assert {r["class"] for r in rows} == {"liver", "liver tumor", "spleen", "right kidney", "left kidney"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in all_rows)
    # each class is asked again with every held-out paraphrase of the vocabulary (never trained on)
    vocabulary = Vocabulary.load("default")
    heldout = [r for r in all_rows if r["wording"] == "heldout"]
    assert len(heldout) == sum(len(vocabulary.heldout[n]) for c in cases for n in c.classes)
    assert {r["prompt"] for r in heldout if r["class"] == "liver tumor"} == set(vocabulary.heldout["liver tumor"])
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["cases"] == len(cases) and summary["nsd_tolerance_mm"] == 2.0
    assert {g["class"] for g in summary["by_class"]} == {r["class"] for r in rows}
    assert {g["class"] for g in summary["by_class_heldout"]} == {r["class"] for r in rows}
    assert "held-out paraphrases" in out.stdout
    assert summary["by_dataset_class"][0]["dataset"] == "PhantomTest" and summary["overall"][0]["n"] == len(rows)


def test_absent_class_answered_with_a_mask_is_a_false_positive(tiny_run, phantom_corpus, tmp_path):
    case = read_manifest(phantom_corpus, split="test")[0]
    case.classes = {"liver": case.classes["liver"], "spleen": [99]}  # value 99 never occurs: spleen is absent
    case.present = {"liver": True, "spleen": False}
    case.boxes = {"liver": case.boxes["liver"]}
    manifest = write_manifest(tmp_path / "m.jsonl", [case])
    seg = Segmenter.from_pretrained(tiny_run)
    seg.config["inference"].update(threshold=0.0, presence_threshold=0.0)  # predict every voxel for every prompt
    summary = evaluate(seg, manifest, "test", tmp_path / "ev", progress=False)
    by_class = {g["class"]: g for g in summary["by_class"]}
    assert by_class["spleen"]["false_positives"] == 1 and by_class["spleen"]["dice_mean"] == 0.0
    assert by_class["liver"]["false_positives"] == 0 and 0.0 < by_class["liver"]["dice_mean"] < 1.0
    seg.config["inference"].update(threshold=1.01)  # predict nothing: the absent class is now answered correctly
    summary = evaluate(seg, manifest, "test", None, progress=False)
    by_class = {g["class"]: g for g in summary["by_class"]}
    assert by_class["spleen"]["dice_mean"] == 1.0 and by_class["liver"]["false_negatives"] == 1
    assert by_class["spleen"]["hd95_mean"] != by_class["spleen"]["hd95_mean"]  # NaN: no distance for empty masks
    assert pytest.approx(by_class["liver"]["dice_mean"]) == 0.0


def test_a_class_is_vetoed_at_its_own_calibrated_threshold(tiny_run, phantom_corpus, tmp_path):
    case = read_manifest(phantom_corpus, split="test")[0]
    manifest = write_manifest(tmp_path / "m.jsonl", [case])
    seg = Segmenter.from_pretrained(tiny_run)
    seg.config["inference"].update(threshold=0.0)  # every voxel for every prompt the presence head keeps
    seg.calibration = {"presence_threshold": 0.0, "class_thresholds": {"liver": 1.01}}  # liver: never present
    seg.config["inference"]["presence_threshold"] = 0.0
    summary = evaluate(seg, manifest, "test", None, progress=False, heldout=False)
    predicted = {r["class"]: r["pred_present"] for r in summary["rows"]}
    assert predicted.pop("liver") is False and all(predicted.values())


def test_absent_target_rates_presence_veto_against_the_volume_rule(tiny_run, phantom_corpus, tmp_path):
    case = read_manifest(phantom_corpus, split="test")[0]
    case.classes = {"liver": case.classes["liver"], "spleen": [99]}  # spleen absent
    case.present = {"liver": True, "spleen": False}
    case.boxes = {"liver": case.boxes["liver"]}
    manifest = write_manifest(tmp_path / "m.jsonl", [case])
    seg = Segmenter.from_pretrained(tiny_run)
    seg.config["inference"].update(threshold=0.0, presence_threshold=0.0)  # a mask everywhere, never vetoed
    rates = evaluate(seg, manifest, "test", None, progress=False)["absent_targets"]
    assert (rates["absent"], rates["present"]) == (1, 1)
    assert rates["presence_head"] == {"false_positive_rate": 1.0, "miss_rate": 0.0}
    seg.config["inference"].update(presence_threshold=1.01)  # the head vetoes everything ...
    summary = evaluate(seg, manifest, "test", None, progress=False)
    rates = summary["absent_targets"]
    assert rates["presence_head"] == {"false_positive_rate": 0.0, "miss_rate": 1.0}
    # ... while the volume rule sees the unvetoed whole-scan masks: it keeps both, right for liver, wrong for spleen
    assert all(v == {"min_volume_ml": v["min_volume_ml"], "false_positive_rate": 1.0, "miss_rate": 0.0}
               for v in rates["volume_rule"])
    consistency = summary["paraphrase_consistency"]  # every wording got the same (empty) answer
    assert consistency["targets"] == 2 and consistency["median_agreement_with_name"] == 1.0
    assert "absent targets (1 asked)" in format_table(summary)


def test_the_summary_carries_bootstrap_intervals(tiny_run, phantom_corpus, tmp_path):
    seg = Segmenter.from_pretrained(tiny_run)
    seg.config["inference"].update(threshold=0.0, presence_threshold=0.0)  # every voxel: a Dice that varies by case
    summary = evaluate(seg, phantom_corpus, "test", tmp_path / "ev", progress=False, classes=["liver", "spleen"])
    intervals = summary["intervals"]
    assert intervals["resamples"] == 1000 and intervals["level"] == 0.95 and "note" not in intervals
    overall = intervals["dice"]["overall"]
    assert overall["estimate"] == pytest.approx(summary["overall"][0]["dice_mean"])
    assert (overall["cases"], overall["rows"]) == (2, summary["overall"][0]["n"])
    assert overall["interval"][0] < overall["estimate"] < overall["interval"][1]
    for group in summary["by_class"] + summary["by_class_heldout"]:
        side = "by_class_heldout" if group in summary["by_class_heldout"] else "by_class"
        assert intervals["dice"][side][group["class"]]["estimate"] == pytest.approx(group["dice_mean"])
    # the presence head's rates, by name and (new) on paraphrases, each with an interval of the same estimate
    assert summary["absent_targets_heldout"].keys() == summary["absent_targets"].keys()
    for key in ("absent_targets", "absent_targets_heldout"):
        for rate in ("false_positive_rate", "miss_rate"):
            assert intervals[key][rate]["estimate"] == summary[key]["presence_head"][rate]
    consistency = intervals["paraphrase_consistency"]
    for key in ("median_dice_across_wordings", "median_agreement_with_name"):
        assert consistency[key]["estimate"] == pytest.approx(summary["paraphrase_consistency"][key])
    ratio = summary["heldout_to_name_dice"]
    assert ratio["rows"] == summary["paraphrase_consistency"]["targets"] and ratio["cases"] == 2
    assert ratio["estimate"] == pytest.approx(ratio["heldout_dice"]["estimate"] / ratio["name_dice"]["estimate"])
    assert ratio["estimate"] == pytest.approx(1.0)  # every wording got the same whole-scan mask
    written = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert written["intervals"]["dice"]["overall"]["interval"] == pytest.approx(overall["interval"])
    assert "retrieval" not in summary
    table = format_table(summary)
    assert "Dice [95% interval]" in table and f"overall Dice {overall['estimate']:.3f} [" in table
    assert "one case" not in table and "held-out paraphrase Dice / name Dice over 4 targets: 1.000" in table


def test_one_case_says_its_interval_covers_prompts_only_and_retrieval_is_scored(tiny_run, phantom_corpus, tmp_path,
                                                                               capsys):
    from vlseg.cli.evaluate import main

    case = read_manifest(phantom_corpus, split="test")[0]
    case.classes = {name: case.classes[name] for name in ("liver", "spleen")}
    case.present = {name: case.present[name] for name in case.classes}
    case.boxes = {name: case.boxes[name] for name in case.classes}
    manifest = write_manifest(tmp_path / "m.jsonl", [case])
    assert main(["--checkpoint", str(tiny_run), "--manifest", str(manifest), "--out", str(tmp_path / "ev"),
                 "--no-progress", "--retrieval"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["intervals"]["note"] == "one case: the interval covers prompts only, not patients"
    assert summary["intervals"]["dice"]["overall"]["note"] == summary["intervals"]["note"]
    assert "(one case: the interval covers prompts only, not patients)" in printed
    found = summary["retrieval"]  # the tiny BERT's own ranking of the bundled vocabulary's paraphrases
    assert found["queries"] > 0 and 0.0 <= found["top1"] <= found["top5"] <= 1.0
    assert f"paraphrase → class retrieval by the text encoder ({found['queries']} queries)" in printed
