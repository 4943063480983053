"""``vlseg calibrate``: choose the presence threshold on held-out data and store it with the checkpoint."""

from __future__ import annotations

import argparse
import json

from vlseg.errors import VlsegError, run_guarded
from vlseg.infer import calibrate as calibration
from vlseg.infer.calibrate import CALIBRATION, calibrate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg calibrate", description=calibration.__doc__.split("\n\n")[0],
                                     epilog=calibration.__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run or checkpoint directory")
    parser.add_argument("--manifest", help="manifest JSONL (default: the one the model was trained on)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def go():
        from vlseg.atomic import atomic_path
        from vlseg.checkpoint import resolve_checkpoint
        from vlseg.infer.segmenter import Segmenter

        if args.split == "test":
            raise VlsegError("calibrating on the test split would tune the threshold on the data it is scored on: "
                             "use a validation split")
        ckpt = resolve_checkpoint(args.checkpoint)
        segmenter = Segmenter.from_pretrained(ckpt, device=args.device, calibrated=False)
        result = calibrate(segmenter, args.manifest or segmenter.config["data"]["manifest"], args.split,
                           progress=not args.no_progress)
        with atomic_path(ckpt / CALIBRATION) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(f"presence threshold {result['presence_threshold']:.3f} (was {result['threshold_before']:.3f}): "
              f"balanced accuracy {result['balanced_accuracy']:.3f} (was {result['balanced_accuracy_before']:.3f}) "
              f"on {result['present']} present and {result['absent']} absent targets of split {args.split!r}\n"
              f"written to {ckpt / CALIBRATION}")

    return run_guarded(go)
