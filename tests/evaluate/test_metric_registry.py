"""Adding a metric is writing one registered function: a metric this test registers (and forgets afterwards) reaches
score_case, summarise, the terminal table, evaluate's per_case.csv and summary.json, and the ablation table."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import yaml

from vlseg import Segmenter
from vlseg.cli.ablate import main as ablate_main
from vlseg.evaluate.ablate.study import load_study
from vlseg.evaluate.evaluate import columns, evaluate
from vlseg.evaluate.metrics import MaskPair, metric, metrics, score_case, summarise
from vlseg.evaluate.report import format_table
from vlseg.registry import METRICS

BUILT_IN = ["dice", "nsd", "hd95", "gt_voxels", "pred_voxels", "gt_volume_ml", "pred_volume_ml", "false_positive",
            "false_negative", "gt_present", "pred_present"]


@pytest.fixture
def voxel_ratio():
    """The test's own metric: predicted voxels per ground-truth voxel (NaN without a ground truth)."""
    assert [m.name for m in metrics()] == BUILT_IN  # the built-in metrics, in the order they are defined

    @metric("voxel_ratio", summary="mean_std", heading="P/G", ablation=True)
    def ratio(pair: MaskPair) -> float:
        return pair.n_pred / pair.n_gt if pair.n_gt else float("nan")

    yield ratio
    METRICS.unregister("voxel_ratio")
    assert [m.name for m in metrics()] == BUILT_IN


def test_a_registered_metric_is_scored_summarised_and_tabulated(voxel_ratio):
    gt, pred = np.zeros((12, 12, 12), bool), np.zeros((12, 12, 12), bool)
    gt[2:8, 2:8, 2:8], pred[2:5, 2:8, 2:8] = True, True  # 216 and 108 voxels
    scores = score_case(pred, gt, (1.0, 1.0, 1.0))
    assert scores["voxel_ratio"] == pytest.approx(0.5) and scores["dice"] == pytest.approx(2 * 108 / 324)
    assert math.isnan(score_case(pred, np.zeros_like(gt), (1, 1, 1))["voxel_ratio"])
    rows = [{"class": "liver", **scores}, {"class": "liver", **score_case(gt, gt, (1, 1, 1))},
            {"class": "spleen", **score_case(pred, np.zeros_like(gt), (1, 1, 1))}]
    liver, spleen = summarise(rows, ("class",))
    assert list(liver)[-2:] == ["voxel_ratio_mean", "voxel_ratio_std"]  # after the built-in summaries
    assert liver["voxel_ratio_mean"] == pytest.approx(0.75) and liver["voxel_ratio_std"] == pytest.approx(0.25)
    assert math.isnan(spleen["voxel_ratio_mean"]) and spleen["false_positives"] == 1
    header, liver_line = format_table({"by_class": [liver, spleen]}).splitlines()[:2]
    assert header.split()[-1] == "P/G" and liver_line.split()[-1] == "0.750±0.250"
    assert columns()[-2:] == ["voxel_ratio", "agreement_with_name"]


def test_a_registered_metric_reaches_per_case_csv_and_the_ablation_table(voxel_ratio, tiny_run, phantom_corpus,
                                                                         tmp_path, capsys):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({"name": "probe", "seeds": [0], "output": str(tmp_path / "out"),
                                          "table": str(tmp_path / "results")}))
    study = load_study(study_file)
    (run,) = study.runs
    shutil.copytree(tiny_run, run.run_dir)  # a finished run of the study, evaluated as `vlseg ablate` would
    summary = evaluate(Segmenter.from_pretrained(run.run_dir), phantom_corpus, "test", study.eval_dir(run),
                       progress=False)
    with open(study.eval_dir(run) / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        expected = int(row["pred_voxels"]) / int(row["gt_voxels"]) if int(row["gt_voxels"]) else math.nan
        assert float(row["voxel_ratio"]) == pytest.approx(expected, nan_ok=True)
    written = json.loads((study.eval_dir(run) / "summary.json").read_text())
    assert "voxel_ratio_mean" in written["overall"][0] and "voxel_ratio_std" in written["by_class"][0]
    assert "P/G" in format_table(summary).splitlines()[0]

    assert ablate_main([str(study_file), "--collect"]) == 0
    table = (tmp_path / "results" / "probe.md").read_text()
    assert table.startswith("# probe\n\nDice on split `test`")  # Dice still leads, with the compute
    assert "P/G on split `test`, mean ± std over seeds:" in table and "| variant | seeds | overall P/G |" in table
    overall = written["overall"][0]["voxel_ratio_mean"]
    assert f"| base | 1/1 | {overall:.3f} |" in table
    with open(tmp_path / "results" / "probe.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert float(next(r for r in lines if r["group"] == "overall")["voxel_ratio_mean"]) == pytest.approx(overall)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("declared, problem", [({"summary": "median"}, "summary is one of"),
                                                ({"summary": "count", "ablation": True}, "shows a mean")])
def test_a_metric_declared_wrongly_is_refused(declared, problem):
    with pytest.raises(ValueError, match=problem):
        metric("broken", **declared)
    assert "broken" not in METRICS.names()


def test_a_metric_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        metric("dice")(lambda pair: 0.0)
