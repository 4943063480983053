"""Dataset recipes: ready-made convert maps for public datasets, shipped as data in ``data_prep/recipes/<NAME>.yaml``.

A recipe is an ordinary convert map (``dataset``, ``modality``, ``layout``, ``labels`` and the layout's own keys) plus
what a user needs to find and check the data: ``recipe`` (its name, the file's stem), ``title``, ``url``,
``licence``, ``folder`` (the downloaded folder as the user has it), ``published_labels`` (label value → the name the
dataset publishes; absent for formats whose files name their classes) and ``unmapped`` (published labels left
unannotated → why).  ``vlseg prepare --recipe NAME --source DIR`` converts with it, no map to write::

    vlseg prepare recipes                  # name, modality, mapped classes, title
    vlseg prepare --recipe AMOS22 --source /data/amos22

Names are matched without regard to case.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from vlseg.errors import VlsegError
from vlseg.prepare.convert import load_map

REQUIRED = ("recipe", "title", "url", "licence", "dataset", "modality", "layout", "folder", "labels")


def recipe_folder() -> Path:
    """Where the recipes lie: the ``recipes`` folder of the ``data_prep`` package (package data)."""
    return Path(str(resources.files("data_prep").joinpath("recipes")))


def recipe_paths() -> dict[str, Path]:
    """Lower-case recipe name → its YAML file."""
    return {p.stem.lower(): p for p in sorted(recipe_folder().glob("*.yaml"), key=lambda p: p.stem.lower())}


def find_recipe(name: str) -> Path:
    """The YAML file of recipe ``name`` (any case); an unknown name is one error line naming the close matches."""
    paths = recipe_paths()
    path = paths.get(str(name).lower())
    if path is not None:
        return path
    close = difflib.get_close_matches(str(name).lower(), list(paths), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(paths[c].stem for c in close)}?" if close else \
        "`vlseg prepare recipes` lists them"
    raise VlsegError(f"unknown recipe {name!r} ({len(paths)} recipes in {recipe_folder()}); {hint}")


def check_recipe(spec: dict, path: Path) -> dict:
    """A recipe's metadata: every required key, its name equal to the file's stem, and labels drawn from what the
    dataset publishes (when it publishes a list)."""
    missing = [key for key in REQUIRED if key not in spec]
    if missing:
        raise VlsegError(f"{path}: missing {', '.join(repr(k) for k in missing)}")
    if str(spec["recipe"]) != path.stem:
        raise VlsegError(f"{path}: recipe {spec['recipe']!r} differs from the file name {path.stem!r}")
    published = spec.get("published_labels")
    if published is None:
        return spec
    if not isinstance(published, dict):
        raise VlsegError(f"{path}: published_labels must map label values to names")
    known = {str(n) for n in published.values()} | {str(v) for v in published}
    labels = spec["labels"] if isinstance(spec["labels"], dict) else {}
    unmapped = spec.get("unmapped") or {}
    strays = [str(k) for k in [*labels, *unmapped] if str(k) not in known]
    if strays:
        raise VlsegError(f"{path}: label {strays[0]!r} is not among the published labels")
    return spec


def load_recipe(name: str) -> dict:
    """Recipe ``name`` as a checked mapping (the convert map plus its metadata)."""
    path = find_recipe(name)
    return check_recipe(load_map(path), path)


def list_recipes() -> list[dict]:
    """Every shipped recipe, sorted by name."""
    return [load_recipe(path.stem) for path in recipe_paths().values()]


def mapped_classes(spec: dict) -> int:
    """How many canonical classes a recipe maps labels onto (0 for ``labels: auto``: the files name them)."""
    labels = spec.get("labels")
    return len({str(v) for v in labels.values()}) if isinstance(labels, dict) else 0
