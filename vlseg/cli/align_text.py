"""``vlseg align-text``: adapt a text tower contrastively on the vocabulary and write it as a folder that training
and prediction load like any other (``vlseg.train.align_text``).

    vlseg align-text --out checkpoints/text/minilm-aligned               # the bundled MiniLM
    vlseg align-text --out DIR text_encoder.path=/models/PubMedBERT      # any hf tower
    vlseg align-text --out DIR --config configs/my_clip.yaml             # the text_encoder section of an experiment
    then: vlseg train --config configs/real.yaml text_encoder.path=checkpoints/text/minilm-aligned

Held-out paraphrase → class retrieval over the whole vocabulary is measured before and after, printed and kept in the
folder's alignment.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from vlseg.errors import VlsegError, run_guarded


def _parser() -> argparse.ArgumentParser:
    from vlseg.train.align_text import AlignSettings

    defaults = AlignSettings()
    parser = argparse.ArgumentParser(prog="vlseg align-text", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the adapted tower into")
    parser.add_argument("--config", help="experiment YAML whose text_encoder section is adapted (default: vlseg's "
                                         "default, the bundled MiniLM)")
    parser.add_argument("--vocabulary", default="default", help="vocabulary YAML (default: vlseg's, every class)")
    for field in dataclasses.fields(AlignSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="text_encoder.key=value, e.g. text_encoder.path=/models/bert")
    return parser


def retrieval_line(label: str, found: dict) -> str:
    lo, hi = found["top1_interval"] or (float("nan"), float("nan"))
    return (f"{label:<28} top-1 {found['top1']:.3f} [{lo:.3f}, {hi:.3f}]  top-5 {found['top5']:.3f}  "
            f"left/right confusions {found['left_right_confusions']}/{found['left_right_queries']}  "
            f"organ/lesion confusions {found['organ_lesion_confusions']}/{found['lesion_queries']}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    def go():
        from vlseg.atomic import atomic_dir
        from vlseg.config import load_config
        from vlseg.evaluate.retrieval import paraphrase_retrieval
        from vlseg.models.text import build_text_encoder
        from vlseg.train.align_text import AlignSettings, align, write_alignment
        from vlseg.vocab.vocabulary import Vocabulary

        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise VlsegError(f"{out}: already exists and is not empty (--overwrite replaces it)")
        bad = [o for o in args.overrides if not o.startswith("text_encoder.")]
        if bad:
            raise VlsegError(f"{bad[0]!r}: align-text takes text_encoder.key=value overrides only")
        section = load_config(args.config, args.overrides)["text_encoder"]
        vocabulary = Vocabulary.load(args.vocabulary)
        encoder = build_text_encoder(section, vocabulary)
        if not hasattr(encoder, "export"):
            raise VlsegError(f"text_encoder.name={section.get('name')!r}: align-text adapts hf and clip towers")
        settings = AlignSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AlignSettings)})
        base = encoder.identity()
        before = paraphrase_retrieval(encoder, vocabulary)
        print(retrieval_line("before (class names)", before), flush=True)
        started = time.perf_counter()
        losses = align(encoder, vocabulary, settings, progress=not args.no_progress)
        seconds = time.perf_counter() - started
        after = paraphrase_retrieval(encoder, vocabulary)
        print(retrieval_line("after (class names)", after))
        if out.exists() and args.overwrite:
            shutil.rmtree(out)
        with atomic_dir(out) as tmp:
            # the section names files in the temporary folder: name them where they will be
            exported = {k: v.replace(str(tmp), str(out)) if isinstance(v, str) else v
                        for k, v in encoder.export(tmp).items()}
            write_alignment(tmp, exported, base, settings, args.vocabulary, len(vocabulary), before, after, losses,
                            seconds)
        print(f"aligned in {seconds:.0f} s; written to {out}\nuse it: " +
              " ".join(f"text_encoder.{k}={v}" for k, v in exported.items() if k in ("name", "path", "weights",
                                                                                      "config_dir") and v))

    return run_guarded(go)
