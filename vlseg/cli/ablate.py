"""``vlseg ablate`` (also ``python -m vlseg.ablate``): run an ablation study, or emit its commands, and tabulate it."""

from __future__ import annotations

import argparse
import dataclasses

from vlseg.errors import VlsegError, run_guarded
from vlseg.evaluate.ablate.runner import commands, execute
from vlseg.evaluate.ablate.study import load_study
from vlseg.evaluate.ablate.tables import collect, write_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="study YAML (configs/ablations/...)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--emit-commands", action="store_true", help="print one launch line per run instead of running")
    mode.add_argument("--collect", action="store_true", help="only build the table from the runs that finished")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="K",
                        help="run (or emit) only these of the study's seeds; the table still shows every finished run")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="run (or emit) only these variants (with every grid point of each); the table still shows "
                             "every finished run")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def go():
        study = load_study(args.study)
        todo = study
        if args.seeds:
            missing = sorted(set(args.seeds) - {r.seed for r in study.runs})
            if missing:
                raise VlsegError(f"{args.study}: seed {missing[0]} is not one of the study's seeds")
            todo = dataclasses.replace(todo, runs=[r for r in todo.runs if r.seed in args.seeds])
        if args.variants:
            names = list(dict.fromkeys(r.named for r in study.runs if r.named))
            missing = [v for v in args.variants if v not in names]
            if missing:
                raise VlsegError(f"{args.study}: no variant named {missing[0]!r} "
                                 f"(the study has: {', '.join(names) or 'no named variants'})")
            todo = dataclasses.replace(todo, runs=[r for r in todo.runs if r.named in args.variants])
        if args.emit_commands:
            print("\n".join(commands(todo, args.study)))
            return
        if not args.collect:
            execute(todo, progress=not args.no_progress)
        rows = collect(study)
        for path in write_table(study, rows, f"vlseg ablate {args.study}"):
            print(f"wrote {path}")
        print((study.table / f"{study.name}.md").read_text())

    return run_guarded(go)
