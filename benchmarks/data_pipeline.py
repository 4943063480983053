"""Data-pipeline figures, all measured in one run on this machine:

    python benchmarks/data_pipeline.py [--config configs/real.yaml] [--manifest data/real/manifest.jsonl]

1. preprocessing: seconds per case (into a fresh cache, ``data.preprocess_workers`` processes);
2. a training crop read from the cache: milliseconds per crop (memory-mapped region read + zoom + queries + lesion
   synthesis where configured, i.e. one ``CropDataset[i]``), and the raw region read alone;
3. the data loader's samples/s with 2 workers divided by the training step's samples/s (goal ≥ 3: loading never
   starves training), the step timed at the precision training resolves to (``train.mixed_precision``; ``auto`` is
   bf16 on a CPU with AMX), and fp32 beside it when that differs.

Without a manifest on disk, the phantom corpus is generated in a temporary folder and used instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "real.yaml"))
    parser.add_argument("--manifest", default="data/real/manifest.jsonl")
    parser.add_argument("--crops", type=int, default=200, help="crops timed for the per-crop figure")
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from vlseg.config import DataSection, load_config
    from vlseg.models.network import build_network, prompt_inputs
    from vlseg.prepare.cache.build import preprocess_corpus
    from vlseg.prepare.cache.keys import cache_settings
    from vlseg.prepare.cache.read import open_cache
    from vlseg.prepare.manifest import read_manifest
    from vlseg.train.crops import CropDataset, collate, synthesis_plan
    from vlseg.train.distributed import resolve_mixed_precision
    from vlseg.train.losses import LOSSES
    from vlseg.vocab.vocabulary import Vocabulary

    tmp = Path(tempfile.mkdtemp(prefix="vlseg-bench-"))
    manifest = Path(args.manifest)
    config = args.config
    if not manifest.is_file():
        from vlseg.prepare.phantoms import generate_corpus

        print(f"{manifest} not found: using the phantom corpus")
        generate_corpus(tmp / "phantoms")
        manifest, config = tmp / "phantoms" / "manifest.jsonl", str(REPO / "configs" / "phantom.yaml")
    cfg = load_config(config, [f"data.manifest={manifest}"])
    dcfg = cfg["data"]
    cases = read_manifest(manifest, split=dcfg["train_split"])
    settings = cache_settings(DataSection.from_config(cfg))
    cache = tmp / "cache"

    t = time.perf_counter()
    report = preprocess_corpus(cases, cache, settings, workers=int(dcfg["preprocess_workers"]), progress=False)
    prep_s = time.perf_counter() - t
    if report["errors"]:
        print(f"preprocessing errors: {report['errors']}")
        return 1
    cached = open_cache(cases, cache, settings)

    full = Vocabulary.load(cfg["vocabulary"])
    names = {n for c in cached for n in c.case.classes}
    if dcfg["synthesis"].get("enabled"):
        names.add(full.resolve(dcfg["synthesis"]["target"]))
    vocabulary = full.subset(names)
    dataset = CropDataset(cached, vocabulary, dcfg["crop_size"], seed=0,
                          foreground_prob=float(dcfg["foreground_prob"]), max_queries=int(dcfg["max_queries"]),
                          dataset_temperature=float(dcfg["dataset_temperature"]),
                          dataset_factors=dcfg["dataset_weights"], class_factors=dcfg["class_weights"],
                          negative_fraction=float(dcfg["negative_fraction"]), zoom_range=dcfg["zoom_range"],
                          synthesis=synthesis_plan(dcfg["synthesis"], cached, vocabulary, dcfg["ct_window"]))

    rng = np.random.default_rng(0)
    size = [int(s) for s in dcfg["crop_size"]]
    t = time.perf_counter()
    for _ in range(args.crops):
        c = cached[int(rng.integers(len(cached)))]
        starts = [int(rng.integers(max(1, n - s + 1))) for n, s in zip(c.shape, size)]
        c.crop(starts, size)
    read_ms = (time.perf_counter() - t) / args.crops * 1e3
    t = time.perf_counter()
    for i in range(args.crops):
        dataset[i]
    sample_ms = (time.perf_counter() - t) / args.crops * 1e3

    batch = int(cfg["train"]["batch_size"])
    loader = DataLoader(dataset, batch_size=batch, sampler=range(10**6), collate_fn=collate,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    it = iter(loader)
    for _ in range(3):  # worker start-up is not part of the steady state
        next(it)
    t = time.perf_counter()
    for _ in range(args.loader_batches):
        next(it)
    loader_sps = args.loader_batches * batch / (time.perf_counter() - t)
    del it, loader

    net, text_encoder = build_network(cfg, vocabulary)
    net.calibrate_prompts(text_encoder.encode(vocabulary.all_texts()))
    loss_fn = LOSSES.build(cfg["loss"])
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    samples = [collate([dataset[i * batch + k] for k in range(batch)]) for i in range(args.train_steps + 2)]

    def step(sample, bf16: bool):
        # the same autocast accelerate applies for mixed_precision="bf16" on a CPU
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(sample["image"], prompt_inputs(sample["texts"], text_encoder, "cpu"), sample["query_mask"])
            parts = loss_fn(out, sample["target"], sample["annotated"], sample["query_mask"])
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()

    def samples_per_s(bf16: bool) -> float:
        for s in samples[:2]:
            step(s, bf16)
        t = time.perf_counter()
        for s in samples[2:]:
            step(s, bf16)
        return args.train_steps * batch / (time.perf_counter() - t)

    net.train()
    precision = resolve_mixed_precision(cfg["train"]["mixed_precision"])
    train_sps = samples_per_s(precision == "bf16")
    fp32_sps = samples_per_s(False) if precision == "bf16" else train_sps

    figures = {
        "manifest": str(manifest), "cases": len(cases), "crop_size": size, "torch_threads": torch.get_num_threads(),
        "preprocess_s_per_case": prep_s / len(cases), "preprocess_workers": int(dcfg["preprocess_workers"]),
        "crop_region_read_ms": read_ms, "training_sample_ms": sample_ms,
        "loader_samples_per_s": loader_sps, "loader_workers": args.workers,
        "train_precision": precision, "train_samples_per_s": train_sps, "train_fp32_samples_per_s": fp32_sps,
        "loader_over_train": loader_sps / train_sps,
    }
    print(f"preprocessing:        {figures['preprocess_s_per_case']:.2f} s/case ({len(cases)} cases, "
          f"{figures['preprocess_workers']} workers)")
    print(f"crop region read:     {read_ms:.2f} ms/crop {size}")
    print(f"training sample:      {sample_ms:.1f} ms/sample (read + zoom + synthesis + queries)")
    print(f"loader ({args.workers} workers):   {loader_sps:.1f} samples/s")
    print(f"training step:        {train_sps:.2f} samples/s (batch {batch}, {torch.get_num_threads()} threads, "
          f"precision {precision})")
    if precision == "bf16":
        print(f"  fp32 step:          {fp32_sps:.2f} samples/s  (bf16 / fp32 = {train_sps / fp32_sps:.2f}x)")
    print(f"loader / training:    {figures['loader_over_train']:.1f}x  (goal >= 3)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
