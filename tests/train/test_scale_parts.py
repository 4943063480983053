"""The pieces scale-out training is made of, each tested on its own (the end-to-end runs are in test_distributed)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import tiny_overrides
from vlseg.config import load_config
from vlseg.errors import VlsegError
from vlseg.models.features import FusionOutput
from vlseg.train.distributed import deepspeed_config, micro_batch_size
from vlseg.train.losses import SegmentationLoss
from vlseg.train.sampler import StepShardSampler


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_sampler_deals_each_global_batch_out_exactly_once(world, accum):
    batch, steps = 8, 5
    got = {}
    for rank in range(world):
        sampler = StepShardSampler(batch, world, rank, accum, start_step=0, end_step=steps)
        micro = list(sampler)
        assert len(micro) == len(sampler) == steps * accum
        for i, indices in enumerate(micro):
            got.setdefault(i // accum, []).extend(indices)
    for step in range(steps):
        # No two processes read the same sample in a step, and together they read the single-process batch.
        assert sorted(got[step]) == list(range(step * batch, (step + 1) * batch))


def test_sampler_resumes_and_runs_forever():
    full = list(StepShardSampler(4, 2, 1, start_step=0, end_step=6))
    assert list(StepShardSampler(4, 2, 1, start_step=3, end_step=6)) == full[3:]
    endless = iter(StepShardSampler(4, 2, 1))
    assert [next(endless) for _ in range(6)] == full
    with pytest.raises(ValueError):
        StepShardSampler(6, 4, 0)


def test_normalised_loss_splits_exactly():
    # Two halves of a batch, each normalised by the whole batch's pair count, sum to the whole batch's mean loss, and
    # so do their gradients: what lets processes and micro-steps share a step.
    torch.manual_seed(0)
    loss = SegmentationLoss()
    logits = torch.randn(4, 3, 6, 6, 4, requires_grad=True)
    presence = torch.randn(4, 3, requires_grad=True)
    target = (torch.rand(4, 3, 6, 6, 4) > 0.7).float()
    annotated = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    qmask = torch.ones(4, 3, dtype=torch.bool)
    whole = loss(FusionOutput(logits, presence), target, annotated, qmask)
    (g_whole,) = torch.autograd.grad(whole["loss"], logits)
    n = int(loss.supervised(annotated, qmask).sum())
    halves = [loss(FusionOutput(logits[s], presence[s]), target[s], annotated[s], qmask[s], normalizer=n)
              for s in (slice(0, 2), slice(2, 4))]
    total = halves[0]["loss"] + halves[1]["loss"]
    (g_split,) = torch.autograd.grad(total, logits)
    assert float(total.detach()) == pytest.approx(float(whole["loss"].detach()), rel=1e-6)
    assert torch.allclose(g_split, g_whole, atol=1e-9)
    assert whole["pairs"].shape == (n, 4) and whole["pair_sample"].tolist() == [0, 0, 1, 2, 2, 2, 3, 3]


def test_batch_split_and_deepspeed_config_errors(tmp_path):
    cfg = load_config(None, ["train.batch_size=6", "train.grad_accum=2"])
    assert micro_batch_size(cfg, 3) == 1
    with pytest.raises(VlsegError, match="cannot be split over 4 process"):
        micro_batch_size(cfg, 4)
    ds = deepspeed_config(load_config(None, ["train.deepspeed=configs/deepspeed/zero2.json", "train.batch_size=4",
                                             "train.mixed_precision=bf16", "train.grad_clip=0.5"]), 2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 2, 1)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False and ds["gradient_clipping"] == 0.5
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    with pytest.raises(VlsegError, match="train_batch_size is 32 but the experiment config gives 4"):
        deepspeed_config(load_config(None, [f"train.deepspeed={fixed}", "train.batch_size=4"]), 1)
    with pytest.raises(VlsegError, match="DeepSpeed config not found"):
        deepspeed_config(load_config(None, [f"train.deepspeed={tmp_path / 'none.json'}"]), 1)


def test_every_shipped_deepspeed_config_resolves():
    from pathlib import Path

    shipped = sorted(Path("configs/deepspeed").glob("*.json"))
    assert {p.stem for p in shipped} >= {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"}
    for path in shipped:
        ds = deepspeed_config(load_config(None, [f"train.deepspeed={path}", "train.batch_size=8"]), 4)
        assert ds["train_micro_batch_size_per_gpu"] == 2 and "auto" not in json.dumps(ds)


def test_activation_checkpointing_same_gradients_less_saved_memory(phantom_corpus, tiny_bert_dir, tmp_path):
    from vlseg.models.network import build_network
    from vlseg.vocab.vocabulary import Vocabulary

    cfg = load_config(None, tiny_overrides(tmp_path, phantom_corpus, tiny_bert_dir))
    vocab = Vocabulary.load("default").subset({"liver", "spleen"}, source="test")
    torch.manual_seed(0)
    net, _ = build_network(cfg, vocab)
    image = torch.randn(2, 1, 32, 32, 24)
    prompts = torch.randn(2, 2, net.prompt_center.numel())

    def run(enabled: bool):
        switched = net.set_activation_checkpointing(enabled)
        assert set(switched) == {"image_encoder", "fusion"}
        net.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = net(image, prompts)
        (out.mask_logits.square().mean() + out.presence_logits.square().mean()).backward()
        return [p.grad.clone() for p in net.parameters()], sum(saved)

    grads_plain, saved_plain = run(False)
    grads_ckpt, saved_ckpt = run(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_plain, grads_ckpt))
    assert saved_ckpt < 0.5 * saved_plain  # only the stage inputs are kept; the rest is recomputed in backward


def _broadcast_worker(rank: int, port: int, bert: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from vlseg.models.text import build_text_encoder
    from vlseg.models.text.base import clear_embedding_cache
    from vlseg.train.distributed import broadcast_embeddings
    from vlseg.vocab.vocabulary import Vocabulary

    clear_embedding_cache()
    vocab = Vocabulary.load("default").subset({"liver", "spleen"}, source="test")
    encoder = build_text_encoder({"name": "hf", "path": bert, "freeze": True}, vocab)
    texts = vocab.all_texts()
    table = broadcast_embeddings(encoder, texts, is_main=rank == 0)
    calls_after_broadcast = encoder.forward_calls
    again = encoder.encode(texts[:3])  # a training step's lookup
    torch.save({"table": table, "calls": calls_after_broadcast, "calls_after_lookup": encoder.forward_calls,
                "again": again}, f"{out}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_frozen_encoder_runs_once_on_rank_zero_only(tiny_bert_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_broadcast_worker, args=(port, str(tiny_bert_dir), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["calls"] == len(r0["table"]) and r1["calls"] == 0  # rank 1 never ran the text tower
    assert r1["calls_after_lookup"] == 0 and r0["calls_after_lookup"] == r0["calls"]
    assert torch.equal(r0["table"], r1["table"]) and torch.equal(r0["again"], r1["again"])


def test_training_logs_per_dataset_losses_throughput_and_memory(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["datasets"] and all(v > 0 for v in r["datasets"].values())
        assert r["samples_per_s"] > 0 and r["voxels_per_s"] == pytest.approx(r["samples_per_s"] * 32 * 32 * 24)
        assert r["peak_memory_mb"] > 50
    acc = EventAccumulator(str(tiny_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/voxels_per_s", "train/peak_memory_mb"} <= tags
    assert any(t.startswith("loss_by_dataset/") for t in tags)
