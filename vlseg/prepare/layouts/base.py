"""The table of dataset layouts: how a source folder is recognised, and the cases and labels it holds.

``convert`` asks every registered layout whether it recognises the source folder (at most one may), unless the map
names one (``layout: nnunet``); a folder none recognises goes to the fallback layout, whose message says what it
lacks.  Adding a layout is adding a module to this package with one decorated function::

    @dataset_layout("jsonl", recognises=lambda source: (source / "cases.jsonl").is_file())
    def list_jsonl(source: Path, spec: dict, manifest: Path) -> Listing:
        ...

The function gets the source folder, the map (its ``dataset``, ``labels`` and any keys of the layout's own) and the
manifest path (beside which built files go), and returns a ``Listing``; bad input is one ``VlsegError`` line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vlseg.errors import VlsegError
from vlseg.registry import DATASET_LAYOUTS

if TYPE_CHECKING:
    from vlseg.vocab.vocabulary import Vocabulary


@dataclass
class Listing:
    """What a layout finds in a source folder."""

    labels: dict[str, list[int]]  # local label name → the label values it covers
    cases: list[tuple[str, Path, Path]]  # (case id as the source names it, image, label)
    # Builds a case's label where the source holds none as such (masks merged into one map) and returns the scan
    # and label read; None: image and label are read as they are.  A third element, when returned, is the case's
    # own local labels (name → values), used for that case instead of ``labels`` (formats whose label values differ
    # from case to case: SAT-DS JSONL lines, CVPR-BiomedSegFM .npz files of several datasets).
    load: Callable[[Path, Path, Vocabulary], tuple] | None = None
    modalities: dict[str, str] = field(default_factory=dict)  # case id → CT/MR where the source says per case
    dataset: str | None = None  # the dataset's own name, used when the map says ``dataset: auto``
    report: dict = field(default_factory=dict)  # what the layout read besides cases, added to the convert report
    splits: dict[str, str] = field(default_factory=dict)  # case id → split the dataset itself assigns


@dataclass(frozen=True)
class DatasetLayout:
    name: str
    recognises: Callable[[Path], bool]  # source folder → whether it is laid out so
    list_cases: Callable[[Path, dict, Path], Listing]  # (source folder, map, manifest) → Listing
    fallback: bool = False  # lists any folder no layout recognises


def dataset_layout(name: str, *, recognises: Callable[[Path], bool], fallback: bool = False):
    """Decorator: register ``list_cases(source, spec, manifest) -> Listing`` as the layout ``name``."""

    def decorator(list_cases):
        DATASET_LAYOUTS.register(name)(DatasetLayout(name, recognises, list_cases, fallback))
        return list_cases

    return decorator


def choose_layout(source: Path, name: str | None = None) -> DatasetLayout:
    """The layout called ``name``, or else the one layout that recognises ``source``, or else (for a folder) the
    fallback layout."""
    if name is not None:
        return DATASET_LAYOUTS.get(str(name))
    names = DATASET_LAYOUTS.names()
    layouts = [DATASET_LAYOUTS.get(n) for n in names]
    found = [layout for layout in layouts if layout.recognises(source)]
    found = found or [layout for layout in layouts if layout.fallback and source.is_dir()]
    if len(found) > 1:
        raise VlsegError(f"{source}: recognised by several dataset layouts ({', '.join(f.name for f in found)}); "
                         f"name one in the map (layout: NAME)")
    if not found:
        raise VlsegError(f"{source / 'dataset.json'}: not found (expected an nnU-Net v2 or MSD dataset folder, or "
                         f"another known layout: {', '.join(names)})")
    return found[0]


def dataset_description(source: Path, required: bool = True) -> dict | None:
    """The ``dataset.json`` nnU-Net v2 and MSD folders describe themselves with (it must have ``labels``).  When
    there is none: an error, or None when not ``required``."""
    path = source / "dataset.json"
    if not path.is_file():
        if not required:
            return None
        raise VlsegError(f"{path}: not found (expected an nnU-Net v2 or MSD dataset folder)")
    try:
        meta = json.loads(path.read_text())
        labels = meta["labels"]
    except (ValueError, KeyError, TypeError) as exc:  # ValueError: not JSON, or not text
        raise VlsegError(f"{path}: unreadable dataset description ({exc})") from None
    if not isinstance(labels, dict):
        raise VlsegError(f"{path}: unreadable dataset description (labels is not a mapping)")
    return meta
