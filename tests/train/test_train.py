"""Training end to end on the phantom corpus with a tiny model: artefacts, checkpoints, resume."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from vlseg.checkpoint import list_checkpoints, resolve_checkpoint
from vlseg.config import load_config
from vlseg.errors import VlsegError
from vlseg.train.loop import train
from vlseg.train.step import lr_factor


def test_run_directory_artefacts(tiny_run):
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 4 and cfg["image_encoder"]["widths"] == [8, 16, 32]
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["grad_norm"] >= 0 for r in records)
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = list_checkpoints(tiny_run)
    assert [c.name for c in ckpts] == ["checkpoint-0000002", "checkpoint-0000004"]
    assert resolve_checkpoint(tiny_run) == ckpts[-1]
    meta = json.loads((ckpts[-1] / "vlseg.json").read_text())
    assert meta["step"] == 4 and meta["config"] == cfg
    assert [c["name"] for c in meta["vocabulary"]["classes"]][:2] == ["liver", "liver tumor"]
    assert meta["text_encoder"]["name"] == "hf" and len(meta["text_encoder"]["fingerprint"]) == 16
    state = load_file(str(ckpts[-1] / "model.safetensors"))
    assert not any(k.startswith("text_encoder") for k in state)  # the frozen encoder is recorded, not stored
    assert (ckpts[-1] / "training_state").is_dir()
    assert not list(tiny_run.glob(".tmp-*"))


def test_tensorboard_scalars_are_readable(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/dice", "train/samples_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, phantom_corpus, tiny_bert_dir, tiny_run):
    # Continue the 4-step run from its step-2 checkpoint in another directory: steps 3-4 must be the same.
    cfg = load_config(None, tiny_overrides(tmp_path, phantom_corpus, tiny_bert_dir))
    resumed = train(cfg, resume=tiny_run / "checkpoint-0000002", progress=False)
    assert resumed != tiny_run
    full = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [3, 4]
    for a, b in zip(full[2:], again):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    wa = load_file(str(resolve_checkpoint(tiny_run) / "model.safetensors"))
    wb = load_file(str(resolve_checkpoint(resumed) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_existing_run_is_not_overwritten_silently(tiny_run):
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    with pytest.raises(VlsegError, match="already has checkpoints; pass --resume"):
        train(cfg, progress=False)


def test_naive_loss_and_trainable_onehot_train(tmp_path, phantom_corpus, tiny_bert_dir):
    cfg = load_config(None, tiny_overrides(tmp_path, phantom_corpus, tiny_bert_dir, **{
        "loss.name": "naive", "text_encoder.name": "onehot", "text_encoder.path": None, "text_encoder.dim": 16, "train.steps": 2}))
    run = train(cfg, progress=False)
    state = load_file(str(resolve_checkpoint(run) / "model.safetensors"))
    assert "text_encoder.table.weight" in state  # a trained encoder is part of the checkpoint


def test_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_train_cli_reports_bad_config_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "train.py", "--config", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {tmp_path / 'missing.yaml'}: config file not found"


def test_mixed_precision_choice_and_bf16_step(tmp_path, phantom_corpus, tiny_bert_dir):
    from vlseg.train.distributed import cpu_has_fast_bf16, resolve_mixed_precision

    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("bf16") == "bf16"
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == ("bf16" if cpu_has_fast_bf16() else "no")
    cfg = load_config(None, tiny_overrides(tmp_path, phantom_corpus, tiny_bert_dir, **{
        "train.mixed_precision": "bf16", "train.steps": 2}))
    run = train(cfg, progress=False)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses)


def test_a_different_text_encoder_is_refused(tmp_path, tiny_run, phantom_corpus, tiny_bert_dir):
    import shutil

    from vlseg import Segmenter

    run = tmp_path / "copied"
    shutil.copytree(tiny_run, run)
    ckpt = resolve_checkpoint(run)
    meta = json.loads((ckpt / "vlseg.json").read_text())
    meta["text_encoder"]["fingerprint"] = "0" * 16  # as if other weights now sat behind the same path
    (ckpt / "vlseg.json").write_text(json.dumps(meta))
    with pytest.raises(VlsegError, match="fingerprint"):
        Segmenter.from_pretrained(run)
    cfg = load_config(None, tiny_overrides(tmp_path, phantom_corpus, tiny_bert_dir, run_name="again"))
    with pytest.raises(VlsegError, match="not the one this run was trained with"):
        train(cfg, resume=run, progress=False)


def test_training_records_the_working_spacing_inference_uses(tmp_path, phantom_corpus, tiny_bert_dir):
    import numpy as np

    from vlseg import Segmenter
    from vlseg.config import DataSection
    from vlseg.prepare.manifest import read_manifest
    from vlseg.train.corpus import load_training_cases

    # Liver cases resampled to 6 x 6 x 5 mm, the others kept at 4 mm: predictions are made at the median spacing.
    cfg = load_config(None, tiny_overrides(tmp_path, phantom_corpus, tiny_bert_dir, **{
        "data.spacing_per_dataset": "{PhantomLiver: [6, 6, 5], PhantomSpleen: [6, 6, 5]}", "train.steps": 1,
        "data.cache": str(tmp_path / "cache")}))
    run = train(cfg, progress=False)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]["inference_spacing"]
    cases = load_training_cases(DataSection.from_config(cfg), "train", progress=False)
    assert recorded == [float(v) for v in np.median([c.spacing for c in cases], axis=0)] == [6.0, 6.0, 5.0]
    scan = read_manifest(phantom_corpus, split="test")[0].image
    report = Segmenter.from_pretrained(run).segment(scan, ["liver"]).report()
    assert report["working_spacing_mm"] == recorded
