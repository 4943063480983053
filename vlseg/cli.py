"""The ``vlseg`` command: ``predict``, ``classes``, ``train``, ``evaluate``, ``demo``, ``export``, ``params``,
``launch``.

Bad input ends in one line on stderr, ``error: <file>: <problem>``, and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from vlseg.errors import VlsegError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time; fail fast instead of retrying
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_guarded(fn) -> int:
    try:
        fn()
    except VlsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def predict(argv=None) -> int:
    from vlseg.predict import main as predict_main  # (its own module: single scans and folders of them)

    return predict_main(argv)


def classes(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg classes", description="List the canonical vocabulary.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--modality", help="only classes expected in this modality (CT, MR)")
    parser.add_argument("--vocabulary", default="default", help="a vocabulary YAML (default: the bundled one)")
    args = parser.parse_args(argv)

    def go():
        import json

        from vlseg.io import canonical_modality
        from vlseg.vocab import Vocabulary

        vocab = Vocabulary.load(args.vocabulary)
        names = vocab.names
        if args.modality:
            kind = canonical_modality(args.modality)
            names = [n for n in names if kind in vocab.modalities[n]]
        vocab = vocab.subset(names)
        if args.json:
            print(json.dumps(vocab.to_dict(), indent=2))
            return
        for n in vocab.names:
            extra = "".join(f"; {label} {', '.join(vocab_list)}" for label, vocab_list in
                            (("includes", vocab.includes[n]), ("= union of", vocab.union_of[n])) if vocab_list)
            print(f"{n:<24} {'/'.join(vocab.modalities[n]) or '-':<6} {', '.join(vocab.synonyms[n][1:])}{extra}")
        print(f"{len(vocab)} classes")

    return run_guarded(go)


def export(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg export", description=(
        "Write a release copy of a checkpoint: consolidated fp32 weights (DeepSpeed ZeRO partitions merged) and its "
        "metadata, without optimiser state. Segmenter.from_pretrained, vlseg predict and evaluate.py load it."))
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("out", help="new directory to write")
    args = parser.parse_args(argv)

    def go():
        from vlseg.checkpoint import export_checkpoint

        print(f"exported to {export_checkpoint(args.checkpoint, args.out)}")

    return run_guarded(go)


def params(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg params", description=(
        "Count the parameters a config builds (image encoder and fusion; the text tower is not built), without "
        "allocating them."))
    parser.add_argument("config", help="experiment YAML, e.g. configs/reference/sat_nano.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--text-dim", type=int, default=None,
                        help="the text tower's width (default: 512 for clip, as ViT-B; 768 otherwise, as BERT-base)")
    args = parser.parse_args(argv)

    def go():
        from vlseg.config import load_config
        from vlseg.models.network import count_parameters

        cfg = load_config(args.config, args.overrides)
        text_dim = args.text_dim or (512 if cfg["text_encoder"].get("name") == "clip" else 768)
        try:
            counts = count_parameters(cfg, text_dim)
        except (TypeError, ValueError) as exc:
            raise VlsegError(f"{args.config}: cannot build the network ({exc})") from None
        for key, n in counts.items():
            print(f"{key:<14} {n / 1e6:10.2f} M")
        print(f"(text tower of width {text_dim} not counted)")

    return run_guarded(go)


def launch(argv=None) -> int:
    """``vlseg launch [accelerate launch options] train.py ...``: accelerate's launcher, started after vlseg's
    torchvision shim, so it also works where the plain ``accelerate`` command cannot import (see README)."""
    import vlseg  # noqa: F401  (the shim)
    from accelerate.commands.accelerate_cli import main as accelerate_main

    sys.argv = ["accelerate", "launch", *(sys.argv[2:] if argv is None else argv)]
    accelerate_main()
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"predict": "vlseg.cli", "classes": "vlseg.cli", "train": "vlseg.train", "evaluate": "vlseg.evaluate",
                "demo": "vlseg.demo", "export": "vlseg.cli", "launch": "vlseg.cli", "params": "vlseg.cli",
                "calibrate": "vlseg.calibrate"}
    if not argv or argv[0] not in commands:
        print("usage: vlseg {predict,classes,train,evaluate,calibrate,demo,export,params,launch} ...\n"
              "  predict   segment a scan: vlseg predict -i scan.nii.gz -p 'liver tumor' -p liver -o out/\n"
              "  classes   list the canonical vocabulary (--json, --modality CT)\n"
              "  train     train a model: vlseg train --config configs/phantom.yaml [key=value ...]\n"
              "  evaluate  score a checkpoint on a manifest split (Dice, NSD, HD95)\n"
              "  calibrate choose the presence threshold on a validation split and store it with the checkpoint\n"
              "  demo      the main job: phantoms -> train -> evaluate -> predict 'liver tumor'\n"
              "  export    consolidated fp32 copy of a (DeepSpeed) checkpoint, without optimiser state\n"
              "  params    parameter counts of a config's network, e.g. vlseg params configs/reference/sat_pro.yaml\n"
              "  launch    accelerate launch, e.g. vlseg launch --multi_gpu --num_processes 8 train.py ...",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(commands[argv[0]])  # import only what the chosen command needs
    own = ("predict", "classes", "export", "launch", "params")  # defined here; the others are modules' main()
    return getattr(module, argv[0] if argv[0] in own else "main")(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
