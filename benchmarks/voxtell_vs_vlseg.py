"""vlseg against VoxTell's own predictor: the same weights, the same CT, on the CPU; seconds and peak RSS for 1, 4 and
16 prompts, side by side, and how far their masks agree.

    python benchmarks/voxtell_vs_vlseg.py --ct data/real/raw/Dataset104_HeartCT/imagesTr/Chest_0000.nii.gz \\
        [--size full|small] [--prompts 1 4 16] [--threads 2] [--work DIR]

The model is VoxTell's architecture with random weights, built by the ``voxtell`` package and saved as VoxTell stores
it (``--size full``: the released architecture, ~440 M parameters; ``small``: the test model), then imported with
``vlseg import voxtell``.  Each measurement is its own process (so peak RSS is that run's alone): read the CT, embed the
prompts from the bank, predict every mask in memory; model loading included on both sides.  VoxTell's side is its
``VoxTellPredictor`` (constructed by its own ``__init__`` for the full size); vlseg's is ``Segmenter.segment``.
The CT should span one or two 192³ windows (the default chest CT: 233 × 167 × 191 voxels, two windows).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "released"))

LABELS = [f"structure {i}" for i in range(32)]


def prepare(work: Path, size: str) -> Path:
    """VoxTell's folder and bank, and their vlseg import (made once per size)."""
    import voxtell_reference as ref

    from vlseg.cli import main as vlseg_main

    folder = work / f"voxtell_{size}"
    if not (folder / "imported" / "vlseg.json").is_file():
        model, kwargs = ref.build(seed=0, full=size == "full")
        ref.save_folder(model, kwargs, folder / "voxtell_model")
        dim = model.text_embedding_dim
        ref.save_bank(folder / "text_embeddings.npz", LABELS, dim=dim)
        del model
        assert vlseg_main(["import", "voxtell", "--model-dir", str(folder / "voxtell_model"), "--bank",
                           str(folder / "text_embeddings.npz"), "-o", str(folder / "imported")]) == 0
    return folder


def one_window_ct(ct: str, work: Path, side: int = 192) -> str:
    """The CT cut (centred, same voxels and affine) to at most ``side`` voxels per axis: one window on both sides."""
    import nibabel as nib

    img = nib.load(ct)
    starts = [max(0, (n - side) // 2) for n in img.shape[:3]]
    cut = img.slicer[tuple(slice(a, a + side) for a in starts)]
    path = work / f"one_window_{Path(ct).name.split('.')[0]}.nii.gz"
    nib.save(cut, path)
    return str(path)


def run_voxtell(folder: Path, ct: str, prompts: list[str], size: str) -> np.ndarray:
    import torch
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
    from voxtell.inference.predictor import VoxTellPredictor

    bank = str(folder / "text_embeddings.npz")
    if size == "full":
        predictor = VoxTellPredictor(model_dir=str(folder / "voxtell_model"), device=torch.device("cpu"),
                                     embedding_bank=bank, use_precomputed_embeddings=False)
    else:  # VoxTell's constructor hard-codes the released widths: assemble the predictor from its parts
        import voxtell_reference as ref
        from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
        from voxtell.utils.embedding_bank import load_embedding_bank

        model, _ = ref.build(seed=0)
        checkpoint = torch.load(folder / "voxtell_model" / "fold_0" / "checkpoint_final.pth", weights_only=False)
        model.load_state_dict(checkpoint["network_weights"])
        predictor = VoxTellPredictor.__new__(VoxTellPredictor)
        predictor.device, predictor.network, predictor.patch_size = torch.device("cpu"), model.eval(), ref.PATCH
        predictor.normalization = ZScoreNormalization(intensityproperties={})
        predictor.tile_step_size, predictor.perform_everything_on_device = 0.5, True
        predictor.embedding_bank, predictor.tokenizer, predictor.text_backbone = load_embedding_bank(bank), None, None
    data, _ = NibabelIOWithReorient().read_images([ct])
    masks = predictor.predict_single_image(data, text_prompts=prompts)  # [prompts, Z, Y, X]
    return np.stack([m.T for m in masks])  # vlseg's [X, Y, Z]


def run_vlseg(folder: Path, ct: str, prompts: list[str]) -> np.ndarray:
    from vlseg.infer.segmenter import Segmenter

    result = Segmenter.from_pretrained(folder / "imported", device="cpu").segment(ct, prompts)
    return np.stack([np.asarray(r.mask) for r in result.results])


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    folder, prompts = Path(args.folder), LABELS[:args.n]
    start = time.perf_counter()
    masks = run_voxtell(folder, args.ct, prompts, args.size) if args.worker == "voxtell" else \
        run_vlseg(folder, args.ct, prompts)
    seconds = time.perf_counter() - start
    np.save(args.masks, np.packbits(masks.astype(bool)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # kB → GB
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak, "shape": list(masks.shape)}))


def measure(tool: str, folder: Path, args, n: int) -> dict:
    masks = folder / f"masks_{tool}_{n}.npy"
    cmd = [sys.executable, __file__, "--worker", tool, "--folder", str(folder), "--ct", args.ct, "--n", str(n),
           "--size", args.size, "--threads", str(args.threads), "--masks", str(masks)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tool} with {n} prompts failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["masks"] = np.load(masks)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", required=True, help="a CT NIfTI spanning one or two 192³ windows")
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="outputs/bench_voxtell")
    parser.add_argument("--one-window", action="store_true", help="cut the CT to 192³ (centred) first")
    parser.add_argument("--worker", choices=("voxtell", "vlseg"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--masks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = prepare(work, args.size)
    if args.one_window:
        args.ct = one_window_ct(args.ct, work)
    print(f"VoxTell architecture ({args.size}), random weights; CT {args.ct}; {args.threads} threads")
    print(f"{'prompts':>7} | {'VoxTell s':>9} {'vlseg s':>8} {'time ×':>7} | {'VoxTell GB':>10} {'vlseg GB':>9} "
          f"{'RSS ×':>6} | masks differ")
    rows = []
    for n in args.prompts:
        theirs, mine = measure("voxtell", folder, args, n), measure("vlseg", folder, args, n)
        a, b = np.unpackbits(theirs["masks"]), np.unpackbits(mine["masks"])
        differ = float(np.mean(a != b))
        rows.append({"prompts": n, "voxtell": {k: theirs[k] for k in ("seconds", "peak_rss_gb")},
                     "vlseg": {k: mine[k] for k in ("seconds", "peak_rss_gb")}, "mask_voxels_differ": differ,
                     "positive_fraction_voxtell": float(a.mean())})
        print(f"{n:>7} | {theirs['seconds']:>9.1f} {mine['seconds']:>8.1f} {mine['seconds'] / theirs['seconds']:>7.2f}"
              f" | {theirs['peak_rss_gb']:>10.2f} {mine['peak_rss_gb']:>9.2f} "
              f"{mine['peak_rss_gb'] / theirs['peak_rss_gb']:>6.2f} | {differ:.4%}", flush=True)
    (work / f"results_{args.size}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
