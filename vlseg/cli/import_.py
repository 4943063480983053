"""``vlseg import <family> ... -o DIR``: a released model's downloaded files → an ordinary vlseg model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlseg.errors import run_guarded


def _families():
    from vlseg.released.base import RELEASED

    return {name: RELEASED.get(name)() for name in RELEASED.names()}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    families = _families()
    parser = argparse.ArgumentParser(prog="vlseg import", description=(
        "Turn the files a user downloaded from a released model's page into a vlseg model directory "
        "(safetensors, resolved config, vocabulary, text-encoder identity, licence and provenance). Every key is "
        "mapped strictly; nothing is downloaded."))
    sub = parser.add_subparsers(dest="family", required=True, metavar="{" + ",".join(families) + "}")
    for name, family in families.items():
        one = sub.add_parser(name, help=family.description, description=f"{family.description} "
                             f"Weights: {family.origin}. Licence: {family.licence}.")
        family.add_arguments(one)
        one.add_argument("-o", "--out", required=True, help="new model directory to write")
    args = parser.parse_args(argv)

    def go():
        family = families[args.family]
        out = family.convert(args, Path(args.out))
        print(f"imported {args.family} to {out} (licence: {family.licence})")

    return run_guarded(go)
