"""``vlseg classes``: the canonical vocabulary, as a table or JSON, whole or searched.

    vlseg classes                       every class: name, modalities, other wordings, hierarchy
    vlseg classes --search kidney       classes whose name or any wording contains "kidney", with what they lie
                                        within and what they contain
    vlseg classes --modality MR --json  machine-readable, one modality
"""

from __future__ import annotations

import argparse

from vlseg.errors import VlsegError, run_guarded


def _row(vocab, name: str) -> str:
    links = "".join(f"; {label} {', '.join(names)}" for label, names in
                    (("includes", vocab.includes[name]), ("= union of", vocab.union_of[name])) if names)
    return f"{name:<24} {'/'.join(vocab.modalities[name]) or '-':<6} {', '.join(vocab.synonyms[name][1:])}{links}"


def _search_block(vocab, name: str) -> list[str]:
    """A matched class with its held-out wordings and its place in the hierarchy (links not pruned to the matches)."""
    lines = [f"{name}  [{'/'.join(vocab.modalities[name]) or '-'}]",
             f"    wordings:  {', '.join(vocab.synonyms[name][1:]) or '-'}",
             f"    held out:  {', '.join(vocab.heldout[name]) or '-'}"]
    parents, children = vocab.parents(name), vocab.children(name)
    if parents:
        lines.append(f"    within:    {', '.join(parents)}")
    if vocab.union_of[name]:
        lines.append(f"    union of:  {', '.join(vocab.union_of[name])}")
    if vocab.includes[name]:
        lines.append(f"    includes:  {', '.join(vocab.includes[name])}")
    if not parents and not children:
        lines.append("    hierarchy: -")
    return lines


def _no_match(vocab, query: str, modality: str | None) -> VlsegError:
    """Why a search found nothing: no wording holds the text (with close spellings), or the modality filtered all."""
    import difflib

    found = vocab.search(query)
    if found and modality:
        return VlsegError(f"no {modality} class matches {query!r}: {len(found)} match it in other modalities "
                          f"({', '.join(found[:3])}{' …' if len(found) > 3 else ''}); drop --modality to see them")
    candidates = sorted({w for n in vocab.names for w in n.split()} | set(vocab.names))
    close = difflib.get_close_matches(query.lower(), candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return VlsegError(f"no class matches {query!r} (searched names, wordings and held-out paraphrases){hint}")


def _searched_json(vocab, names: list[str]) -> dict:
    full = {entry["name"]: entry for entry in vocab.to_dict()["classes"]}
    return {"version": 2, "classes": [{**full[n], "parents": vocab.parents(n)} for n in names]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg classes", description="List or search the canonical vocabulary.")
    parser.add_argument("--search", metavar="TEXT",
                        help="only classes whose name, a synonym or a held-out wording contains TEXT (any case; "
                             "underscores read as spaces), shown with their parents and children")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--modality", help="only classes expected in this modality (CT, MR)")
    parser.add_argument("--vocabulary", default="default", help="a vocabulary YAML (default: the bundled one)")
    args = parser.parse_args(argv)

    def go():
        import json

        from vlseg.io.scan import canonical_modality
        from vlseg.vocab.vocabulary import Vocabulary

        vocab = Vocabulary.load(args.vocabulary)
        names, kind = vocab.names, None
        if args.modality:
            kind = canonical_modality(args.modality)
            names = [n for n in names if kind in vocab.modalities[n]]
        if args.search is not None:
            wanted = set(vocab.search(args.search))
            names = [n for n in names if n in wanted]
            if not names:
                raise _no_match(vocab, args.search, kind)
            if args.json:
                print(json.dumps(_searched_json(vocab, names), indent=2))
                return
            print("\n".join(line for n in names for line in _search_block(vocab, n)))
            print(f"{len(names)} of {len(vocab)} classes match {args.search!r}")
            return
        vocab = vocab.subset(names)
        if args.json:
            print(json.dumps(vocab.to_dict(), indent=2))
            return
        print("\n".join(_row(vocab, n) for n in vocab.names))
        print(f"{len(vocab)} classes")

    return run_guarded(go)
