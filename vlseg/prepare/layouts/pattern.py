"""Datasets found by path patterns: the map's ``label`` and ``image`` keys are paths relative to the source folder
with ``{name}`` placeholders, and its ``published_labels`` (label value → name) say what the label values mean::

    layout: pattern
    label: "label/label{case}.nii.gz"            # BTCV: RawData/Training/label/label0001.nii.gz
    image: "img/img{case}.nii.gz"
    published_labels: {1: spleen, 2: right kidney, ...}

Every file under the source that the label pattern matches is a case; a placeholder matches one path component or
part of one and may appear more than once (``"{case}/{case}_seg.nii.gz"``: the same value both times).  The image
is the image pattern filled with the same values; a ``*`` left in it (a folder name that varies, a DICOM series
folder) must match exactly one path.  The case id is the value of ``{case}`` when the pattern has one, else the
placeholders' values joined by ``_``.  Chosen by name only (``layout: pattern``), never recognised.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlseg.errors import VlsegError
from vlseg.prepare.layouts.base import Listing, dataset_layout

PLACEHOLDER = re.compile(r"\{(\w+)\}")


def pattern_regex(pattern: str) -> re.Pattern:
    """A path pattern → the regular expression matching the relative paths it describes (named groups)."""
    parts, seen, pos = [], set(), 0
    for match in PLACEHOLDER.finditer(pattern):
        name = match.group(1)
        parts.append(re.escape(pattern[pos:match.start()]))
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)")
        seen.add(name)
        pos = match.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts))


def fill(pattern: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], pattern)


def published_local(spec: dict, source: Path) -> dict[str, list[int]]:
    """The map's ``published_labels`` (value → name) as local labels (name → values)."""
    published = spec.get("published_labels")
    if not isinstance(published, dict) or not published:
        raise VlsegError(f"{source}: layout pattern needs published_labels in the map (label value → name)")
    local: dict[str, list[int]] = {}
    for value, name in published.items():
        if not str(value).isdigit():
            raise VlsegError(f"{source}: published label {value!r} is not a label value (a whole number)")
        local.setdefault(str(name), []).append(int(value))
    return local


def _patterns(spec: dict, source: Path) -> tuple[str, str]:
    label, image = spec.get("label"), spec.get("image")
    if not isinstance(label, str) or not isinstance(image, str):
        raise VlsegError(f"{source}: layout pattern needs the keys label and image (paths under the source with "
                         f"{{case}} placeholders)")
    unknown = set(PLACEHOLDER.findall(image)) - set(PLACEHOLDER.findall(label))
    if unknown:
        raise VlsegError(f"{source}: image pattern {image!r} uses {{{sorted(unknown)[0]}}}, which the label "
                         f"pattern {label!r} does not give")
    return label, image


def find_image(source: Path, image_pattern: str, values: dict[str, str]) -> Path:
    """The image of one case; a ``*`` must match one path (none: the pattern's path, so the error names it)."""
    relative = fill(image_pattern, values)
    if "*" not in relative:
        return source / relative
    found = sorted(source.glob(relative))
    if len(found) > 1:
        raise VlsegError(f"{source / relative}: matches {len(found)} paths ({found[0].name}, {found[1].name} ...); "
                         f"the image pattern must name one per case")
    return found[0] if found else source / relative


@dataset_layout("pattern", recognises=lambda source: False)
def list_pattern(source: Path, spec: dict, manifest: Path) -> Listing:
    if not source.is_dir():
        raise VlsegError(f"{source}: not a folder")
    label_pattern, image_pattern = _patterns(spec, source)
    local = published_local(spec, source)
    regex = pattern_regex(label_pattern)
    cases, seen = [], {}
    for path in sorted(source.glob(PLACEHOLDER.sub("*", label_pattern))):
        match = regex.fullmatch(path.relative_to(source).as_posix())
        if match is None:
            continue
        values = match.groupdict()
        case_id = values.get("case") or "_".join(values.values())
        if case_id in seen:
            raise VlsegError(f"{path}: case id {case_id!r} is also that of {seen[case_id]}")
        seen[case_id] = path
        cases.append((case_id, find_image(source, image_pattern, values), path))
    if not cases:
        raise VlsegError(f"{source}: no file matches the label pattern {label_pattern!r}")
    return Listing(local, cases)
