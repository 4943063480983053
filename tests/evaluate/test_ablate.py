"""The ablation runner: grid expansion, launch lines, a real tiny study run twice (the second time skips everything)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import tiny_overrides
from vlseg.cli.ablate import main
from vlseg.errors import VlsegError
from vlseg.evaluate.ablate.runner import commands, fingerprint, run_config
from vlseg.evaluate.ablate.study import load_study
from vlseg.evaluate.ablate.tables import collect


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
    studies' baselines are one computation, so the runner trains it once per seed and links it elsewhere."""
    from vlseg.models.network import count_parameters

    root = Path(__file__).resolve().parents[2]
    baselines, configs = {}, {}
    for path in sorted((root / "configs" / "ablations").glob("*.yaml")):
        study = load_study(path)
        study = dataclasses.replace(study, output=tmp_path / study.name)  # base.yaml goes here, not into checkpoints/
        for run in study.runs:
            cfg = run_config(study, run)
            assert cfg["seed"] == run.seed and cfg["train"]["steps"] == 1500
            counts = count_parameters(cfg, 384)
            assert counts["fusion"] > 0 and counts["image_encoder"] > 0, (path.name, run.variant)
            configs[(study.name, run.variant, run.seed)] = cfg
        baselines[study.name] = fingerprint(configs[(study.name, study.runs[0].variant, study.runs[0].seed)])
    assert set(baselines) == {"masked_vs_naive", "text_vs_onehot", "fusion"}
    assert len(set(baselines.values())) == 1, baselines
    assert configs[("masked_vs_naive", "naive", 0)]["loss"]["name"] == "naive"
    assert configs[("masked_vs_naive", "masked", 0)]["loss"]["name"] == "masked"
    assert configs[("text_vs_onehot", "onehot", 1)]["text_encoder"]["name"] == "onehot"
    low = configs[("fusion", "dynamic_head_low_lr", 2)]
    assert low["fusion"]["name"] == "dynamic_head" and low["train"]["lr"] == pytest.approx(2e-4)
    shared_lr = configs[("fusion", "query_decoder", 2)]["train"]["lr"]
    assert configs[("fusion", "dynamic_head", 2)]["train"]["lr"] == shared_lr == pytest.approx(2e-3)
    assert configs[("fusion", "dodnet", 0)]["text_encoder"]["name"] == "onehot"
