"""``vlseg predict``: one scan, or every scan in a folder with the model loaded once.

    vlseg predict -i scan.nii.gz -p "liver tumor" -p liver -o out/
    vlseg predict -i scans/ -p liver -o out/ --num-parts 4 --part-id 0      # a quarter of the folder, e.g. per GPU

``-i`` is a NIfTI or NRRD/MetaImage file, a folder holding one DICOM series, or a folder of such inputs (files with a
scan suffix, and sub-folders each holding a DICOM series): each case is written to ``<out>/<case name>/``.  A case
that fails is reported in one line (file and problem) and the others go on; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vlseg.errors import VlsegError, run_guarded
from vlseg.io.readers import scan_suffixes
from vlseg.vocab.prompts import PROMPT_ENSEMBLES


def case_name(path: Path) -> str:
    name = path.name
    for suffix in scan_suffixes():  # longest first
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_inputs(source: str | Path) -> list[Path] | None:
    """The cases of a folder of scans, sorted by name; None when ``source`` is one scan (a file, or a folder that
    holds a DICOM series itself: no scan files and no sub-folders)."""
    source = Path(source).expanduser()
    if not source.is_dir():
        return None
    entries = sorted(p for p in source.iterdir() if not p.name.startswith("."))
    suffixes = scan_suffixes()
    cases = [p for p in entries if p.is_dir() or p.name.lower().endswith(suffixes)]
    if not cases:
        return None
    names = [case_name(p) for p in cases]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise VlsegError(f"{source}: two inputs would both be written to {dup!r}")
    return cases


def select_part(cases: list, num_parts: int, part_id: int) -> list:
    """Every ``num_parts``-th case starting at ``part_id``: parts are disjoint and together cover the folder."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise VlsegError(f"--part-id {part_id} with --num-parts {num_parts}: need 0 <= part-id < num-parts")
    return cases[part_id::num_parts]


def checked_prompts(prompts, model) -> list[str]:
    """The prompts validated, and refused in one line if one negates ("not the liver", see ``refuse_negation``; a
    class of the model's vocabulary such as "non-enhancing tumor" is kept).  Reads only the checkpoint's metadata:
    this runs before any scan is read."""
    from vlseg.checkpoint import read_metadata, resolve_checkpoint
    from vlseg.vocab.prompts import refuse_negation, validate_prompts
    from vlseg.vocab.vocabulary import Vocabulary

    prompts = validate_prompts(prompts)
    checkpoint = resolve_checkpoint(model)
    refuse_negation(prompts, Vocabulary.from_dict(read_metadata(checkpoint)["vocabulary"], str(checkpoint)))
    return prompts


def describe(r, presence_threshold: float) -> str:
    m, notes = r.match, []
    if m is not None and m.how == "free text":
        notes.append("free text; nearest " + ", ".join(f"{c!r} {v:.2f}" for c, v in m.nearest[:2]))
    elif m is not None and m.how not in ("name", "as written"):
        notes.append(f"as {m.vocabulary_class!r}: {m.how}")
    if m is not None and m.embedding not in ("as typed", "class name"):
        notes.append(f"embedding: {m.embedding}")
    asked = f" ({'; '.join(notes)})" if notes else ""
    verdict = (f"{r.volume_ml:.1f} ml" if r.present else
               "judged absent: empty mask" if r.presence_probability < presence_threshold else
               "nothing above the mask threshold")
    return f"{r.prompt!r}{asked}: presence {r.presence_probability:.2f}, {verdict}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlseg predict", description="Segment 3D scans with text prompts.",
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", required=True,
                        help="scan (NIfTI, NRRD/MHA), a DICOM series folder, or a folder of these")
    parser.add_argument("-p", "--prompt", action="append", default=[], help="structure to segment (repeatable)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("-m", "--model", default=os.environ.get("VLSEG_MODEL", "checkpoints/phantom"),
                        help="checkpoint or run directory (default: $VLSEG_MODEL or checkpoints/phantom)")
    parser.add_argument("--modality", default="CT", help="CT or MR (intensity normalisation)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--spacing", help="the working spacing in mm, one number or x,y,z (default: the one the "
                        "checkpoint records); the masks are always written on the scan's own grid")
    parser.add_argument("--fast", action="store_true",
                        help="work at 1.5x the checkpoint's spacing, or the scan's own for a model without one "
                        "(about 3x fewer voxels; coarser masks)")
    parser.add_argument("--coarse-to-fine", action="store_true",
                        help="find the targets at twice the spacing first, then work at full spacing only around them")
    parser.add_argument("--tta", action="store_true",
                        help="average over front-back and head-foot mirrorings (3x the work; never left-right)")
    parser.add_argument("--prompt-ensemble", choices=PROMPT_ENSEMBLES, default=None,
                        help="embed a prompt understood as a class by its name and synonyms together (synonyms), and "
                        "also free text by its nearest class when that is confident (nearest); default: the "
                        "checkpoint's inference.prompt_ensemble (none)")
    parser.add_argument("--multilabel", action="store_true",
                        help="also write labels.nii.gz (label k = k-th prompt; overlaps go to the smaller structure) "
                        "and its names table labels.json")
    parser.add_argument("--statistics", action="store_true",
                        help="volume (ml) and mean/std intensity per target: statistics.csv and the report")
    parser.add_argument("--no-overlay", action="store_true")
    parser.add_argument("--num-parts", type=int, default=1, help="split a folder into this many parts ...")
    parser.add_argument("--part-id", type=int, default=0, help="... and process this one (0-based)")
    return parser


def plan(args) -> tuple[list[str], list[tuple[Path, Path, object]], bool, tuple | None]:
    """Everything checked before the model is loaded: the prompts, the cases ``(source, out_dir, scan or None)``
    (a single scan is read now), whether the input is a folder of cases, and the working spacing asked for."""
    from vlseg.infer.segmenter import parse_spacing

    prompts = checked_prompts(args.prompt, args.model)
    cases = list_inputs(args.input)
    if cases is not None:
        cases = select_part(cases, args.num_parts, args.part_id)
    elif args.num_parts != 1:
        raise VlsegError(f"{args.input}: --num-parts splits a folder of scans; this is a single scan")
    spacing = parse_spacing(args.spacing) if args.spacing is not None else None
    if args.fast and spacing is not None:
        raise VlsegError("--fast and --spacing both set the working spacing: give one")
    if cases is None:  # one scan: check it before importing and loading the model
        from vlseg.io.scan import load_scan

        return prompts, [(Path(args.input), Path(args.output), load_scan(args.input))], False, spacing
    return prompts, [(c, Path(args.output) / case_name(c), None) for c in cases], True, spacing


def answer(segmenter, args, prompts, source: Path, out_dir: Path, scan, head: str) -> None:
    """Segment one case, write its files and say, one line per prompt, what was found and where it went."""
    result = segmenter.segment(scan if scan is not None else source, prompts, modality=args.modality, tta=args.tta,
                               coarsen=1.5 if args.fast else 1.0, coarse_to_fine=args.coarse_to_fine)
    files = result.save(out_dir, overlay=not args.no_overlay, multilabel=args.multilabel, statistics=args.statistics)
    stats = {row["prompt"]: row for row in result.statistics()} if args.statistics else {}
    for r in result.results:
        extra = ""
        if r.prompt in stats and stats[r.prompt]["mean_intensity"] is not None:
            extra = f", mean intensity {stats[r.prompt]['mean_intensity']:.1f}"
        print(f"{head}{describe(r, segmenter.presence_threshold)}{extra} -> {files[r.prompt]}")
    for key in ("labels", "statistics", "report", "overlay"):
        if key in files:
            print(f"{head}{key}: {files[key]}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        prompts, todo, folder, spacing = plan(args)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from vlseg.infer.segmenter import Segmenter

        segmenter = Segmenter.from_pretrained(args.model, device=args.device, spacing=spacing)
        if args.prompt_ensemble is not None:
            segmenter.config.setdefault("inference", {})["prompt_ensemble"] = args.prompt_ensemble
        segmenter.understand(prompts)  # a nonsense prompt stops here, before any scan is read
        failures = 0
        for i, (source, out_dir, scan) in enumerate(todo, 1):
            head = f"[{i}/{len(todo)}] {source.name}: " if folder else ""
            try:
                answer(segmenter, args, prompts, source, out_dir, scan, head)
            except VlsegError as exc:
                if not folder:
                    raise
                failures += 1
                print(f"{head}error: {exc}", file=sys.stderr, flush=True)
        if failures:
            raise VlsegError(f"{failures} of {len(todo)} case(s) failed (see above)")

    return run_guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
