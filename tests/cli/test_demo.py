"""`vlseg demo`: the main job end to end, on the tiny phantom corpus with a tiny model and schedule."""

from __future__ import annotations

import json

from tests.conftest import tiny_overrides
from vlseg.cli import main


def test_demo_runs_the_whole_job_and_says_where_everything_went(tmp_path, phantom_corpus, tiny_bert_dir, capsys):
    overrides = tiny_overrides(tmp_path / "runs", phantom_corpus, tiny_bert_dir,  # phantom_corpus: its manifest
                               **{"data.cache": str(tmp_path / "cache"), "train.steps": 2})
    code = main(["demo", "--phantoms", "--data", str(phantom_corpus.parent), "--out", str(tmp_path / "out"), *overrides])
    out = capsys.readouterr().out
    assert code == 0, out
    for step in ("[1/5] corpus found", "[2/5] preprocessing", "[3/5] training tiny for 2 steps", "[4/5] evaluating",
                 "[5/5] asking for 'liver tumor' and 'liver'"):
        assert step in out
    summary = json.loads((tmp_path / "runs" / "tiny" / "eval-test" / "summary.json").read_text())
    assert 0.0 <= summary["overall"][0]["dice_mean"] <= 1.0
    answered = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert answered and all((tmp_path / "out" / case / "report.json").is_file() for case in answered)
    report = json.loads((tmp_path / "out" / answered[0] / "report.json").read_text())
    assert [p["prompt"] for p in report["prompts"]] == ["liver tumor", "liver"]
