"""The training corpus: the split's cases, preprocessed into the cache, and the classes a new model learns."""

from __future__ import annotations

from pathlib import Path

from vlseg.config import DataSection, save_config
from vlseg.errors import VlsegError
from vlseg.prepare.cache.build import preprocess_corpus
from vlseg.prepare.cache.keys import cache_location, cache_settings
from vlseg.prepare.cache.read import open_cache
from vlseg.prepare.manifest import read_manifest
from vlseg.train.resume import RunStart
from vlseg.vocab.vocabulary import Vocabulary


def load_training_cases(data: DataSection, split: str, progress: bool = True, accelerator=None) -> list:
    """The split's cases, preprocessed into the cache where needed (up-to-date cases are skipped) and opened as
    memory maps.  Any case that cannot be preprocessed stops training with a one-line error."""
    manifest = Path(data.manifest)
    cases = read_manifest(manifest, split=split)
    if not cases:
        raise VlsegError(f"{manifest}: no cases in split {split!r}")
    settings, cache = cache_settings(data), cache_location(data)
    if accelerator is None or accelerator.is_main_process:
        report = preprocess_corpus(cases, cache, settings, workers=data.preprocess_workers, progress=progress)
        if report["errors"]:
            first = report["errors"][0]
            raise VlsegError(f"{first['file']}: {first['problem']} ({len(report['errors'])} case(s) failed "
                             f"preprocessing; all are listed in {cache / 'report.json'})")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return open_cache(cases, cache, settings)


def model_vocabulary(data: DataSection, vocabulary: str, cases: list) -> Vocabulary:
    """The canonical classes a new model learns: those its training cases annotate (and the synthesised target),
    only ``data.classes`` among them when given (the other annotated classes become unknown, never supervised)."""
    full = Vocabulary.load(vocabulary)
    annotated = {name for cc in cases for name in cc.case.classes}
    if data.synthesis.get("enabled"):
        target = str(data.synthesis["target"])
        annotated.add(full.resolve(target) or target)
    if data.classes:
        chosen = {full.resolve(n) or n for n in data.classes}
        full.subset(chosen, source="data.classes")  # unknown names: one-line error
        annotated &= chosen
    return full.subset(annotated, source=data.manifest)


def training_corpus(cfg: dict, data: DataSection, start: RunStart, accelerator,
                    progress: bool) -> tuple[list, Vocabulary]:
    """The cases training draws from and the model's vocabulary.  A new model's vocabulary comes from its corpus and
    its working spacing is recorded in ``cfg`` (``data.inference_spacing``, saved again with the run); a resumed
    model keeps its checkpoint's.  Cases whose dataset annotates none of the model's classes are left out."""
    cases = load_training_cases(data, data.train_split, progress, accelerator)
    if start.meta is None:
        vocabulary = model_vocabulary(data, cfg["vocabulary"], cases)
        cfg["data"]["inference_spacing"] = data.working_spacing([c.spacing for c in cases])
        if accelerator.is_main_process:
            save_config(cfg, start.run_dir / "config.yaml")
    else:
        vocabulary = Vocabulary.from_dict(start.meta["vocabulary"])
    names = set(vocabulary.names)
    kept = [cc for cc in cases if any(n in names for n in cc.case.classes)]
    return kept or cases, vocabulary
