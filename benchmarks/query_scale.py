"""Querying at scale on a clinical-size CT, all figures measured in one run on this machine:

    python benchmarks/query_scale.py [--model RUN_OR_CHECKPOINT] [--prompts 1 8 32 100] [--modes ...] [--out FILE]

(needs the real-scan corpus: ``python -m data_prep.fetch_samples --out data/real``)

The scan is a real abdominal CT (the corpus' patient A, 3 mm) resampled onto a 512 × 512 × 300 grid over the same field
of view, so the clinical-size arrays, the resampling to the model's working spacing and the mapping of masks back
onto the full grid are all real.  Without ``--model``, a network of configs/real.yaml's shape is trained for a few
steps on the phantom corpus (its masks and presence are then near chance: a stress test for memory, which every
prompt's mask then uses).

For each number of prompts, in a fresh process (no inherited peak memory): seconds of ``Segmenter.segment`` (image to
masks on the scan's grid), seconds to write the outputs (one uint8 NIfTI per prompt, the report, the overlay), and
the peak resident memory of the process.  Ratios against the 1-prompt run: time (goal for 32 prompts ≤ 1.3) and peak
memory (goal for 100 prompts within 10%, and ≤ 4 GB).  Also the backbone's achieved GFLOP/s (FLOPs of one window
counted by torch's FlopCounterMode × windows ÷ seconds inside the image encoder) against an fp32 matmul's GFLOP/s
measured in the same process.  Then seconds per CT in each inference mode (``--modes``: default, fast,
coarse_to_fine, tta), each with ``--mode-prompts`` prompts, in a fresh process too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = (512, 512, 300)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_scan(path: Path) -> Path:
    """Patient A's CT, trilinearly resampled onto SHAPE over its own field of view (int16 HU, like a scanner's)."""
    import nibabel as nib
    import numpy as np

    from vlseg.transforms.spatial import resample_to_shape

    src = nib.load(str(REPO / "data" / "real" / "raw" / "Dataset101_AbdomenCT" / "imagesTr" / "A_0000.nii.gz"))
    data = resample_to_shape(np.asarray(src.dataobj, dtype=np.float32), SHAPE, order=1)
    zooms = [z * n / m for z, n, m in zip(src.header.get_zooms()[:3], src.shape, SHAPE)]
    affine = src.affine.copy()
    affine[:3, :3] = src.affine[:3, :3] @ np.diag([z / o for z, o in zip(zooms, src.header.get_zooms()[:3])])
    img = nib.Nifti1Image(np.round(data).astype(np.int16), affine)
    nib.save(img, str(path))
    return path


def prompt_list(n: int) -> list[str]:
    """n distinct prompts: the bundled vocabulary's class names, then their other wordings."""
    from vlseg.vocab.vocabulary import Vocabulary

    vocab = Vocabulary.load("default")
    names = list(vocab.names) + [s for n_ in vocab.names for s in vocab.synonyms[n_][1:]]
    if n > len(names):
        raise SystemExit(f"only {len(names)} distinct prompts available")
    return ["liver"] + [p for p in names if p != "liver"][: n - 1]


def worker(args) -> None:
    import torch

    from vlseg.infer.segmenter import Segmenter
    from vlseg.io.scan import load_scan

    torch.set_num_threads(args.threads)
    segmenter = Segmenter.from_pretrained(args.model, device="cpu")
    # Every prompt is asked, including classes the model was never trained on (a stress test, not a refusal test).
    segmenter.config["inference"]["min_prompt_similarity"] = 0.0
    prompts = prompt_list(args.n)
    encoder_seconds = [0.0]
    encode = segmenter.net.encode_image

    def timed_encode(x):
        t = time.perf_counter()
        out = encode(x)
        encoder_seconds[0] += time.perf_counter() - t
        return out

    segmenter.net.encode_image = timed_encode
    scan = load_scan(args.scan)
    t0 = time.perf_counter()
    # Reading the prompts and their text embeddings are per model, cached, not per scan: done before timing.
    segmenter.embed([m.query for m in segmenter.understand(prompts)])
    options = {"default": {}, "fast": {"coarsen": 1.5}, "coarse_to_fine": {"coarse_to_fine": True},
               "tta": {"tta": True}}[args.mode]
    result = segmenter.segment(scan, prompts, modality="CT", **options)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result.save(Path(tmp) / "out")
    t2 = time.perf_counter()
    record = {"prompts": args.n, "mode": args.mode, "segment_s": t1 - t0, "save_s": t2 - t1, "peak_rss_mb": peak_rss_mb(),
              "windows": result.extra["windows"], "accumulated_prompts": result.extra["accumulated_prompts"],
              "present": sum(r.present for r in result.results), "encoder_s": encoder_seconds[0]}
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        crop = segmenter.config["data"]["crop_size"]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            encode(torch.zeros(1, 1, *crop))
        record["encoder_gflop_per_window"] = counter.get_total_flops() / 1e9
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        a @ b
        t = time.perf_counter()
        reps = 10
        for _ in range(reps):
            a @ b
        record["matmul_gflops"] = 2 * 2048 ** 3 * reps / (time.perf_counter() - t) / 1e9
    print("RESULT " + json.dumps(record), flush=True)


def default_model(work: Path) -> Path:
    """configs/real.yaml's network, trained 20 steps on the phantom corpus (see the module docstring)."""
    from vlseg.config import load_config
    from vlseg.prepare.phantoms import generate_corpus
    from vlseg.train.loop import train

    manifest = generate_corpus(work / "phantoms", progress=False)
    cfg = load_config(REPO / "configs" / "real.yaml", [f"data.manifest={manifest}", f"output_root={work}",
                                                       "run_name=bench", "train.steps=20", "data.synthesis.enabled=false",
                                                       "data.classes=null", "data.dataset_weights={}"])
    return train(cfg, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="run directory or checkpoint (default: a briefly trained stand-in)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32, 100])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "query_scale.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scan", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="*", default=["default", "fast", "coarse_to_fine", "tta"])
    parser.add_argument("--mode-prompts", type=int, default=8)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else default_model(work)
        scan = make_scan(work / "ct_512x512x300.nii.gz")
        def measure(n: int, mode: str, flops: bool = False) -> dict:
            cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--scan", str(scan), "--n", str(n),
                   "--threads", str(args.threads), "--mode", mode, *(["--flops"] if flops else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                raise SystemExit(f"worker for {n} prompts ({mode}) failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            print(f"{mode:>14}, {n:>3} prompts: segment {r['segment_s']:6.1f} s, save {r['save_s']:6.1f} s, peak RSS "
                  f"{r['peak_rss_mb']:7.0f} MB, {r['present']} present, {r['accumulated_prompts']} accumulated, "
                  f"{r['windows']} windows", flush=True)
            return r

        runs = [measure(n, "default", flops=i == 0) for i, n in enumerate(args.prompts)]
        modes = [measure(args.mode_prompts, mode) for mode in args.modes]
    base = runs[0]
    summary = {"scan_shape": list(SHAPE), "model": str(args.model or "stand-in (20 phantom steps)"),
               "threads": args.threads, "runs": runs,
               "time_ratio_vs_1": {r["prompts"]: r["segment_s"] / base["segment_s"] for r in runs},
               "total_time_ratio_vs_1": {r["prompts"]: (r["segment_s"] + r["save_s"]) /
                                         (base["segment_s"] + base["save_s"]) for r in runs},
               "peak_rss_ratio_vs_1": {r["prompts"]: r["peak_rss_mb"] / base["peak_rss_mb"] for r in runs},
               "modes": modes}
    if "matmul_gflops" in base:
        achieved = base["encoder_gflop_per_window"] * base["windows"] / base["encoder_s"]
        summary.update(encoder_gflops=achieved, matmul_gflops=base["matmul_gflops"],
                       encoder_share_of_matmul=achieved / base["matmul_gflops"])
    print("time ÷ 1 prompt:     " + ", ".join(f"{k}: {v:.2f}" for k, v in summary["time_ratio_vs_1"].items()))
    print("with saving ÷ 1:     " + ", ".join(f"{k}: {v:.2f}" for k, v in summary["total_time_ratio_vs_1"].items()))
    print("peak RSS ÷ 1 prompt: " + ", ".join(f"{k}: {v:.2f}" for k, v in summary["peak_rss_ratio_vs_1"].items()))
    print(f"seconds per CT with {args.mode_prompts} prompts: " + ", ".join(
        f"{m['mode']} {m['segment_s']:.1f} (+{m['save_s']:.1f} writing)" for m in modes))
    if "encoder_gflops" in summary:
        print(f"backbone {summary['encoder_gflops']:.1f} GFLOP/s vs fp32 matmul {summary['matmul_gflops']:.1f} GFLOP/s "
              f"({100 * summary['encoder_share_of_matmul']:.0f}%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
