"""``vlseg calibrate``: choose the presence threshold on held-out data and store it with the checkpoint."""

from __future__ import annotations

import argparse
import json

from vlseg.errors import VlsegError, run_guarded
from vlseg.infer import calibrate as calibration
from vlseg.infer.calibrate import CALIBRATION, calibrate, calibrate_from_crops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg calibrate", description=calibration.__doc__.split("\n\n")[0],
                                     epilog=calibration.__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run or checkpoint directory")
    parser.add_argument("--manifest", help="manifest JSONL (default: the one the model was trained on)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--from-training-crops", action="store_true",
                        help="no validation split: fit on targets cut from the annotated training scans")
    parser.add_argument("--crops-per-case", type=int, default=8, help="with --from-training-crops (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="with --from-training-crops: where the crops fall")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def go():
        from vlseg.atomic import atomic_path
        from vlseg.checkpoint import resolve_checkpoint
        from vlseg.infer.segmenter import Segmenter

        if args.split == "test" and not args.from_training_crops:
            raise VlsegError("calibrating on the test split would tune the threshold on the data it is scored on: "
                             "use a validation split")
        if args.crops_per_case < 1:
            raise VlsegError(f"--crops-per-case {args.crops_per_case}: give at least 1")
        ckpt = resolve_checkpoint(args.checkpoint)
        segmenter = Segmenter.from_pretrained(ckpt, device=args.device, calibrated=False)
        manifest = args.manifest or segmenter.config["data"]["manifest"]
        if args.from_training_crops:
            result = calibrate_from_crops(segmenter, manifest, args.crops_per_case, args.seed,
                                          progress=not args.no_progress)
        else:
            result = calibrate(segmenter, manifest, args.split, progress=not args.no_progress)
        with atomic_path(ckpt / CALIBRATION) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(f"presence threshold {result['presence_threshold']:.3f} (was {result['threshold_before']:.3f}): "
              f"balanced accuracy {result['balanced_accuracy']:.3f} (was {result['balanced_accuracy_before']:.3f}) "
              f"on {result['present']} present and {result['absent']} absent targets of "
              + ("crops of the training scans" if args.from_training_crops else f"split {args.split!r}"))
        for name, value in result.get("class_thresholds", {}).items():
            print(f"  {name}: threshold {value:.3f}")
        print(f"written to {ckpt / CALIBRATION}")

    return run_guarded(go)
