"""``vlseg classes``: the canonical vocabulary, as a table or JSON."""

from __future__ import annotations

import argparse

from vlseg.errors import run_guarded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg classes", description="List the canonical vocabulary.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--modality", help="only classes expected in this modality (CT, MR)")
    parser.add_argument("--vocabulary", default="default", help="a vocabulary YAML (default: the bundled one)")
    args = parser.parse_args(argv)

    def go():
        import json

        from vlseg.io.scan import canonical_modality
        from vlseg.vocab.vocabulary import Vocabulary

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
