"""Training and evaluating a study's runs in this process, or emitting one shell line per run for a scheduler; a run
identical to a finished run of another study is linked to it instead of being trained again."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from vlseg.evaluate.ablate.study import Run, Study


def study_base(study: Study) -> Path:
    """The study's starting config (its ``base`` with the common ``overrides``) resolved into ``<output>/base.yaml``.

    Runs start from this file, so a variant that switches a component (``fusion.name=dodnet``) drops the settings
    the common overrides gave the previous one, exactly as switching it in an experiment file would."""
    from vlseg.config import load_config, save_config

    return save_config(load_config(study.base, study.common), study.output / "base.yaml")


def run_config(study: Study, run: Run) -> dict:
    from vlseg.config import load_config

    return load_config(study_base(study), run.all_overrides())


REQUEST_FILE = "ablation_request.json"


def fingerprint(cfg: dict) -> str:
    """What a run computes, independent of where it is written: its resolved config without the output location."""
    import hashlib

    content = {k: v for k, v in cfg.items() if k not in ("output_root", "run_name")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_request(study: Study, run: Run, cfg: dict) -> None:
    """Write the run's requested config ``cfg`` and its fingerprint into the run directory (once)."""
    path = run.run_dir / REQUEST_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fingerprint(cfg), "study": study.name, "variant": run.variant,
                                    "seed": run.seed, "config": cfg}, indent=1, default=str))


def find_identical(study: Study, run: Run, cfg: dict) -> Path | None:
    """A finished run of another study (a sibling of this study's output folder) with the same fingerprint.

    Shipped studies share their baseline (configs/real.yaml, 1,500 steps): it is trained once per seed and the
    other studies link to it instead of spending another quarter of an hour recomputing the same weights."""
    digest = fingerprint(cfg)
    for request in sorted(study.output.parent.glob(f"*/*/seed*/{REQUEST_FILE}")):
        other = request.parent
        if other.resolve() == run.run_dir.resolve() or other.is_symlink():
            continue
        try:
            found = json.loads(request.read_text()).get("fingerprint")
        except (OSError, ValueError):
            continue
        if found == digest and _finished(other):
            return other
    return None


def _finished(run_dir: Path) -> bool:
    from vlseg.checkpoint import list_checkpoints, read_metadata

    found = list_checkpoints(run_dir)
    if not found:
        return False
    meta = read_metadata(found[-1])
    return int(meta["step"]) >= int(meta["config"]["train"]["steps"])


def is_trained(study: Study, run: Run) -> bool:
    return _finished(run.run_dir)


def is_evaluated(study: Study, run: Run) -> bool:
    """Evaluated as the study asks: a summary, with retrieval where the study wants it (an evaluation folder shared
    with a study that did not ask for it is evaluated again, which adds it)."""
    path = study.eval_dir(run) / "summary.json"
    if not path.is_file():
        return False
    return not study.retrieval or "retrieval" in json.loads(path.read_text())


def execute(study: Study, progress: bool = True) -> None:
    """Train and evaluate, in this process and one after another, every run that is not finished yet."""
    from vlseg.evaluate.evaluate import evaluate
    from vlseg.infer.segmenter import Segmenter
    from vlseg.train.loop import train

    for i, run in enumerate(study.runs, 1):
        head = f"[{i}/{len(study.runs)}] {run.variant} seed {run.seed}"
        if is_trained(study, run) and is_evaluated(study, run):
            print(f"{head}: done, skipped", flush=True)
            continue
        if not is_trained(study, run):
            cfg = run_config(study, run)
            same = None if run.run_dir.exists() else find_identical(study, run, cfg)
            if same is not None:  # a relative link, so the results folder can move as a whole
                run.run_dir.parent.mkdir(parents=True, exist_ok=True)
                run.run_dir.symlink_to(os.path.relpath(same, run.run_dir.parent), target_is_directory=True)
                print(f"{head}: identical to the finished run {same}, linked", flush=True)
                if is_evaluated(study, run):
                    continue
            else:
                record_request(study, run, cfg)
                print(f"{head}: training", flush=True)
                train(cfg, resume="auto", progress=progress)
        print(f"{head}: evaluating", flush=True)
        segmenter = Segmenter.from_pretrained(run.run_dir)
        manifest = study.manifest or segmenter.config["data"]["manifest"]
        evaluate(segmenter, manifest, study.split, study.eval_dir(run), classes="all" if study.all_classes else None,
                 progress=progress, retrieval=study.retrieval)


def commands(study: Study, study_path: str | Path) -> list[str]:
    """One shell line per run (train with --resume auto, then evaluate), then the one that builds the table."""
    lines, base = [], study_base(study)
    for run in study.runs:
        train_cmd = ["vlseg", "train", "--config", str(base), "--resume", "auto", "--no-progress",
                     *run.all_overrides()]
        eval_cmd = ["vlseg", "evaluate", "--checkpoint", str(run.run_dir), "--split", study.split,
                    "--out", str(study.eval_dir(run)), "--no-progress",
                    *(["--manifest", study.manifest] if study.manifest else []),
                    *(["--all-classes"] if study.all_classes else []), *(["--retrieval"] if study.retrieval else [])]
        lines.append(f"{shlex.join(train_cmd)} && {shlex.join(eval_cmd)}")
    lines.append(shlex.join(["vlseg", "ablate", str(study_path), "--collect"]))
    return lines
