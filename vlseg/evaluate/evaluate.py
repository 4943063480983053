"""Evaluation: ``python evaluate.py --checkpoint RUN --manifest M --split test``.

Every case is segmented with one prompt per class its dataset annotates and the model knows (``--all-classes``: every
annotated class), by the canonical class name and again by each of its held-out paraphrases (never trained on), and
scored with every registered metric (``vlseg.evaluate.metrics``: Dice, NSD with a tolerance in mm, HD95 in mm from the
voxel spacing, volumes, ...), which give per_case.csv its metric columns and the summaries their keys.  A prompt for a
class that is absent from the case counts as a false positive when the predicted mask is non-empty (Dice 0), and as
correct (Dice 1) when it is empty.  Writes ``per_case.csv`` and ``summary.json`` (per class, per dataset and class,
overall; the absent-target false-positive and present-target miss rates, with the presence head and with a
predicted-volume rule, by name and on held-out paraphrases; paraphrase consistency; the ratio of held-out paraphrase
Dice to name Dice), with a 95% bootstrap interval of each figure that resamples cases and, within each, its prompts
(``intervals``; ``vlseg.evaluate.uncertainty``), and optionally the text encoder's paraphrase → class retrieval.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vlseg.errors import VlsegError
from vlseg.evaluate.metrics import metrics, score_case, summarise
from vlseg.evaluate.uncertainty import LEVEL, METHOD, ONE_CASE, RESAMPLES, SEED, bootstrap, mean, median, rate, ratio
from vlseg.io.scan import load_label, load_scan
from vlseg.prepare.manifest import read_manifest

IDENTITY = ("case_id", "dataset", "class", "prompt", "wording")
# The evaluation's own columns of per_case.csv, each written after the metric column it is read beside.
BESIDE = {"hd95": ("presence_probability",), "pred_volume_ml": ("unvetoed_volume_ml",)}


def columns() -> list[str]:
    """per_case.csv's columns: what was asked, the column of every registered metric that has one (in the order they
    were defined, the evaluation's own beside theirs), then a paraphrase's agreement with the class name's mask."""
    out = list(IDENTITY)
    for m in metrics():
        if m.column:
            out += [m.name, *BESIDE.get(m.name, ())]
    return [*out, "agreement_with_name"]


def evaluate(segmenter, manifest: str | Path, split: str = "test", out_dir: str | Path | None = None,
             nsd_tolerance_mm: float = 2.0, classes: list[str] | str | None = None, progress: bool = True,
             heldout: bool = True, retrieval: bool = False) -> dict:
    """Score every case of ``split``; with ``heldout``, each class is also asked with every held-out paraphrase the
    model's vocabulary has for it (wordings never trained on), reported apart as ``by_class_heldout``.  With
    ``retrieval``, the summary's ``retrieval`` also gives how well the text encoder alone maps the bundled
    vocabulary's held-out paraphrases onto their classes (None for a closed-vocabulary encoder).

    ``classes``: the classes to score where a case annotates them — by default those the model was trained on (its
    vocabulary); pass ``"all"`` to also ask for every other annotated class by name (open-vocabulary probing)."""
    cases = read_manifest(manifest, split=split)
    if not cases:
        raise VlsegError(f"{manifest}: no cases in split {split!r}")
    vocabulary = getattr(segmenter, "vocabulary", None)
    if classes is None and vocabulary is not None:
        classes = list(vocabulary.names)
    elif classes == "all":
        classes = None
    presence_threshold = float(segmenter.config["inference"]["presence_threshold"])
    rows, started, segmented = [], time.perf_counter(), 0
    for case in tqdm(cases, desc=f"evaluating {split}", disable=not progress):
        case_rows = _score_one_case(segmenter, case, classes, heldout, presence_threshold, nsd_tolerance_mm)
        segmented += bool(case_rows)
        rows += case_rows
    named = [r for r in rows if r["wording"] == "name"]
    paraphrased = [r for r in rows if r["wording"] == "heldout"]
    rows = named + paraphrased
    summary = {
        "split": split,
        "manifest": str(manifest),
        "checkpoint": getattr(segmenter, "checkpoint", ""),
        "nsd_tolerance_mm": nsd_tolerance_mm,
        "cases": len({r["case_id"] for r in rows}),
        "by_class": summarise(named, ("class",)),
        "by_dataset_class": summarise(named, ("dataset", "class")),
        "overall": summarise(named, ()),
        "by_class_heldout": summarise(paraphrased, ("class",)) if paraphrased else [],
        "absent_targets": absent_target_rates(named, presence_threshold),
        "absent_targets_heldout": absent_target_rates(paraphrased, presence_threshold) if paraphrased else None,
        "paraphrase_consistency": paraphrase_consistency(rows) if paraphrased else None,
        "heldout_to_name_dice": heldout_to_name_dice(rows) if paraphrased else None,
        "intervals": intervals(named, paraphrased),
        # loading, all prompts and scoring, per case (a table's inference-cost column)
        "seconds_per_case": (time.perf_counter() - started) / max(segmented, 1),
    }
    if retrieval:
        summary["retrieval"] = _retrieval(segmenter)
    if out_dir is not None:
        _write(Path(out_dir), rows, summary)
    summary["rows"] = rows
    return summary


def _open_vocabulary(segmenter) -> bool:
    """Whether the model's text encoder can be asked wordings it has no code for (a one-hot code cannot)."""
    return getattr(getattr(segmenter, "text_encoder", None), "open_vocabulary", True)


def _retrieval(segmenter) -> dict | None:
    """Paraphrase → class retrieval by the model's text encoder alone over the bundled vocabulary
    (``vlseg.evaluate.retrieval``); None where the encoder is closed-vocabulary."""
    if getattr(segmenter, "text_encoder", None) is None or not _open_vocabulary(segmenter):
        return None
    from vlseg.evaluate.retrieval import paraphrase_retrieval
    from vlseg.vocab.vocabulary import Vocabulary

    return paraphrase_retrieval(segmenter.text_encoder, Vocabulary.load("default"))


def _asks(segmenter, names: list[str], heldout: bool) -> list[tuple[str, str, str]]:
    """(class, prompt, wording) per class of a case: by its name, then (``heldout``) by each held-out paraphrase."""
    vocabulary = getattr(segmenter, "vocabulary", None)
    asks = [(name, name, "name") for name in names]
    # A closed-vocabulary model (one-hot codes) cannot be asked an unseen paraphrase at all: none are scored.
    if heldout and vocabulary is not None and _open_vocabulary(segmenter):
        asks += [(name, text, "heldout") for name in names if name in vocabulary.names
                 for text in vocabulary.heldout[name]]
    return asks


def _score_one_case(segmenter, case, classes: list[str] | None, heldout: bool, presence_threshold: float,
                    nsd_tolerance_mm: float) -> list[dict]:
    """The rows of one case, one per prompt asked (none when it annotates none of ``classes``)."""
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    names = [c for c in case.classes if classes is None or c in classes]
    if not names:
        return []
    asks = _asks(segmenter, names, heldout)
    # Masks without the presence veto, which is applied below: the same pass then also scores the simplest
    # alternative to a presence head (calling a target absent when its predicted volume is small).
    result = segmenter.segment(scan, [text for _, text, _ in asks], modality=case.modality, interpret=False,
                               presence_threshold=0.0)
    # the class's own threshold where the segmenter was calibrated per class (vlseg calibrate --from-training-crops)
    threshold_for = getattr(segmenter, "presence_threshold_for", lambda _: presence_threshold)
    rows, by_name = [], {}
    for (name, _, wording), r in zip(asks, result.results):
        kept = r.presence_probability >= threshold_for(name)
        pred = r.mask.astype(bool) if kept else np.zeros(r.mask.shape, bool)
        scores = score_case(pred, case.class_mask(label, name), scan.spacing, nsd_tolerance_mm)
        row = {"case_id": case.case_id, "dataset": case.dataset, "class": name, "prompt": r.prompt,
               "wording": wording, "presence_probability": r.presence_probability,
               "unvetoed_volume_ml": r.volume_ml, **scores}
        if wording == "name":
            by_name[name] = pred
        elif name in by_name:  # how far the paraphrase's mask is from the class name's
            row["agreement_with_name"] = _dice(pred, by_name[name])
        rows.append(row)
    return rows


def _write(out_dir: Path, rows: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "per_case.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.json").write_text(json.dumps(_finite(summary), indent=2))


def read_rows(path: str | Path) -> list[dict]:
    """per_case.csv read back as evaluate's rows: numbers as floats, True/False as booleans, empty cells left out (as
    they were), what was asked as text; and presence, which is no column, from the voxel counts."""
    with open(path, newline="") as fh:
        rows = [{k: v if k in IDENTITY else _parse(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
    for row in rows:
        row["gt_present"], row["pred_present"] = row["gt_voxels"] > 0, row["pred_voxels"] > 0
    return rows


def _parse(text: str):
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text)
    except ValueError:
        return text


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


VOLUME_RULE_ML = (0.5, 2.0, 10.0)


def absent_target_rates(rows: list[dict], presence_threshold: float) -> dict:
    """How often a target that is not in the scan still gets a mask (false-positive rate over absent targets) and how
    often one that is gets none (miss rate over present targets): with the presence head's veto, and with the simplest
    alternative, calling a target absent when its unvetoed mask is smaller than a volume (each of VOLUME_RULE_ML)."""
    absent = [r for r in rows if not r["gt_present"]]
    present = [r for r in rows if r["gt_present"]]

    def rates(says_present) -> dict:
        return {"false_positive_rate": sum(map(says_present, absent)) / len(absent) if absent else None,
                "miss_rate": sum(not says_present(r) for r in present) / len(present) if present else None}

    return {"absent": len(absent), "present": len(present), "presence_threshold": presence_threshold,
            "presence_head": rates(lambda r: r["pred_present"]),
            "volume_rule": [{"min_volume_ml": v, **rates(lambda r, v=v: r["unvetoed_volume_ml"] >= v)}
                            for v in VOLUME_RULE_ML]}


def paraphrase_consistency(rows: list[dict]) -> dict:
    """Over each (case, class) asked by its name and by held-out paraphrases: the median Dice across those wordings,
    and the median agreement (Dice) of a paraphrase's mask with the name's; then the median over (case, class)."""
    medians, agreements = [], []
    for group in _targets(rows).values():
        if len(group) < 2:
            continue
        medians.append(float(np.median([r["dice"] for r in group])))
        agreements += [r["agreement_with_name"] for r in group if "agreement_with_name" in r]
    return {"targets": len(medians),
            "median_dice_across_wordings": float(np.median(medians)) if medians else None,
            "median_agreement_with_name": float(np.median(agreements)) if agreements else None}


def _targets(rows: list[dict]) -> dict[tuple, list[dict]]:
    """The rows of each target: a run's (case, class), asked by name and by paraphrases.  ``seed`` keeps the runs
    apart where the rows of several are pooled (ablation tables); evaluate's own rows have none."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("seed"), r["case_id"], r["class"]), []).append(r)
    return groups


def heldout_to_name_dice(rows: list[dict], cluster="case_id") -> dict:
    """Over the targets asked both by name and by held-out paraphrases: the mean over targets of a target's mean
    paraphrase Dice, over the mean of its name Dice (1: paraphrases do as well as the name), with its bootstrap
    interval; ``heldout_dice`` and ``name_dice`` give the two means.  Its rows are the targets, resampled within the
    cases drawn."""
    targets = []
    for group in _targets(rows).values():
        by_name = [r["dice"] for r in group if r["wording"] == "name"]
        paraphrased = [r["dice"] for r in group if r["wording"] == "heldout"]
        if by_name and paraphrased:
            targets.append({**group[0], "name_dice": by_name[0], "heldout_dice": float(np.mean(paraphrased))})
    return {**bootstrap(targets, ratio("heldout_dice", "name_dice"), cluster=cluster),
            "heldout_dice": bootstrap(targets, mean("heldout_dice"), cluster=cluster),
            "name_dice": bootstrap(targets, mean("name_dice"), cluster=cluster)}


def mean_intervals(rows: list[dict], column: str = "dice", cluster="case_id") -> dict:
    """A metric's mean (Dice) overall and per class, each with its bootstrap interval."""
    classes = sorted({r["class"] for r in rows})
    return {"overall": bootstrap(rows, mean(column), cluster=cluster),
            "by_class": {c: bootstrap([r for r in rows if r["class"] == c], mean(column), cluster=cluster)
                         for c in classes}}


def presence_intervals(rows: list[dict], cluster="case_id") -> dict:
    """The presence head's false-positive rate over absent targets and miss rate over present ones (those of
    ``absent_target_rates``), each with its bootstrap interval."""
    absent, present = [r for r in rows if not r["gt_present"]], [r for r in rows if r["gt_present"]]
    return {"false_positive_rate": bootstrap(absent, rate(lambda r: r["pred_present"]), cluster=cluster),
            "miss_rate": bootstrap(present, rate(lambda r: not r["pred_present"]), cluster=cluster)}


def consistency_intervals(rows: list[dict], cluster="case_id") -> dict:
    """``paraphrase_consistency``'s medians with their bootstrap intervals; the median Dice across wordings resamples
    targets (a target's own median is one value) within the cases drawn."""
    targets = [{**group[0], "median_dice": float(np.median([r["dice"] for r in group]))}
               for group in _targets(rows).values() if len(group) > 1]
    return {"median_dice_across_wordings": bootstrap(targets, median("median_dice"), cluster=cluster),
            "median_agreement_with_name": bootstrap(rows, median("agreement_with_name"), cluster=cluster)}


def intervals(named: list[dict], paraphrased: list[dict], cluster="case_id") -> dict:
    """95% bootstrap intervals (``vlseg.evaluate.uncertainty``: cases, then prompts within each) of Dice per class and
    overall, by name and on held-out paraphrases (``dice``), of the presence head's absent-target rates both ways,
    and of paraphrase consistency; ``note`` when every figure rests on one case."""
    heldout = mean_intervals(paraphrased, cluster=cluster) if paraphrased else None
    found = {"method": METHOD, "level": LEVEL, "resamples": RESAMPLES, "seed": SEED,
             "dice": {**mean_intervals(named, cluster=cluster), "overall_heldout": heldout and heldout["overall"],
                      "by_class_heldout": heldout and heldout["by_class"]},
             "absent_targets": presence_intervals(named, cluster),
             "absent_targets_heldout": presence_intervals(paraphrased, cluster) if paraphrased else None,
             "paraphrase_consistency": consistency_intervals(named + paraphrased, cluster) if paraphrased else None}
    if found["dice"]["overall"]["cases"] == 1:
        found["note"] = ONE_CASE
    return found


def _finite(obj):
    """JSON has no NaN: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


