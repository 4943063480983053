"""Medical Segmentation Decathlon task folders: ``dataset.json`` with ``labels`` value → name and a ``training``
list of ``{"image": ..., "label": ...}`` paths relative to the folder; the case id is the label file's name up to its
first dot."""

from __future__ import annotations

from pathlib import Path

from vlseg.errors import VlsegError
from vlseg.prepare.layouts.base import Listing, dataset_description, dataset_layout


def _recognises(source: Path) -> bool:
    meta = dataset_description(source, required=False)
    return meta is not None and "training" in meta


@dataset_layout("msd", recognises=_recognises)
def list_msd(source: Path, spec: dict, manifest: Path) -> Listing:
    meta = dataset_description(source)
    labels = {str(name): [int(value)] for value, name in meta["labels"].items()}
    cases = []
    for k, item in enumerate(meta.get("training") or []):
        try:
            image, label = source / item["image"], source / item["label"]
        except (KeyError, TypeError) as exc:
            raise VlsegError(f"{source / 'dataset.json'}: training entry {k} has no image and label "
                             f"({type(exc).__name__}: {exc})") from None
        cases.append((label.name.split(".")[0], image, label))
    return Listing(labels, cases)
