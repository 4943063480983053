"""What a segmentation returns: per-prompt masks and statistics, a report, files on disk."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlseg.infer.stitching import BoxMask
from vlseg.io.scan import Scan
from vlseg.io.writers import save_like
from vlseg.vocab.prompts import PromptMatch, file_stems


@dataclass
class PromptResult:
    prompt: str
    vocabulary_class: str | None
    presence_probability: float
    present: bool
    mask: BoxMask  # uint8 on the canonical grid of the scan, stored as the box that holds it (np.asarray: full array)
    voxels: int
    volume_ml: float
    match: PromptMatch | None = None  # how the prompt was understood
    # mean probability over the model-grid voxels at or above the mask threshold; None when there is no mask
    mean_probability: float | None = None


@dataclass
class SegmentationResult:
    scan: Scan
    results: list[PromptResult]
    runtime_s: float
    checkpoint: str
    display_window: tuple[float, float] | None = None  # intensity window for the overlay (CT: the model's window)
    extra: dict = field(default_factory=dict)

    def mask(self, prompt: str, space: str = "original") -> np.ndarray:
        """A prompt's mask on the input's own array layout (``space="original"``) or the canonical grid."""
        for r in self.results:
            if r.prompt == prompt:
                return self.scan.to_original(r.mask) if space == "original" else np.asarray(r.mask)
        raise KeyError(prompt)

    def report(self, files: dict[str, str] | None = None) -> dict:
        return {
            "input": str(self.scan.path) if self.scan.path else None,
            "checkpoint": self.checkpoint,
            "shape": list(self.scan.original_shape),
            "spacing_mm": [float(s) for s in self.scan.spacing],
            "runtime_s": round(self.runtime_s, 3),
            "prompts": [{"prompt": r.prompt, "vocabulary_class": r.vocabulary_class,
                         "presence_probability": round(r.presence_probability, 4), "present": r.present,
                         "voxels": r.voxels, "volume_ml": round(r.volume_ml, 3),
                         **({k: v for k, v in r.match.as_dict().items() if k not in ("prompt", "understood_as")}
                            if r.match else {}),
                         **({"file": files[r.prompt]} if files else {})} for r in self.results],
            **self.extra,
        }

    def statistics(self) -> list[dict]:
        """Per prompt: volume (ml), voxels and the mean and standard deviation of the scan's intensities inside the mask
        (Hounsfield units for CT)."""
        rows = []
        for r in self.results:
            values = self.scan.data[r.mask.slices][r.mask.crop.astype(bool)] if r.present else np.zeros(0)
            rows.append({"prompt": r.prompt, "class": r.vocabulary_class, "present": r.present,
                         "volume_ml": round(r.volume_ml, 3), "voxels": r.voxels,
                         "mean_intensity": round(float(values.mean()), 2) if values.size else None,
                         "std_intensity": round(float(values.std()), 2) if values.size else None})
        return rows

    def label_map(self) -> tuple[np.ndarray, list[dict]]:
        """All masks in one label map on the canonical grid, label k for the k-th prompt (uint8, uint16 beyond 255).

        Overlaps: the smaller structure keeps the voxel (masks are painted from the largest to the smallest), so a
        tumour inside its organ stays visible; ``overlapped_voxels`` in the table says how much each lost."""
        dtype = np.uint8 if len(self.results) < 256 else np.uint16
        labels = np.zeros(self.scan.data.shape, dtype)
        order = sorted(range(len(self.results)), key=lambda i: -self.results[i].voxels)
        for i in order:
            r = self.results[i]
            if r.present:
                box = labels[r.mask.slices]
                box[r.mask.crop.astype(bool)] = i + 1
        counts = np.bincount(labels.ravel(), minlength=len(self.results) + 1)
        table = [{"label": i + 1, "prompt": r.prompt, "class": r.vocabulary_class, "voxels": int(counts[i + 1]),
                  "overlapped_voxels": r.voxels - int(counts[i + 1])} for i, r in enumerate(self.results)]
        return labels, table

    def save(self, out_dir: str | Path, overlay: bool = True, multilabel: bool = False,
             statistics: bool = False) -> dict[str, Path]:
        """Write one uint8 NIfTI per prompt (input geometry), ``report.json`` and ``overlay.png``; with ``multilabel``
        also ``labels.nii.gz`` and its names table ``labels.json`` (see ``label_map``); with ``statistics``,
        ``statistics.csv`` (see ``statistics``, also added to the report).  A prompt's file is named by its slug,
        short and distinct however long the prompt (``vlseg.vocab.prompts.file_stems``); the report keeps the prompt
        as typed.

        Files are written into a temporary folder beside ``out_dir`` and moved in only when all succeeded.
        """
        from vlseg.infer.overlay import save_overlay

        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".vlseg-", dir=out_dir.parent))
        try:
            stems = file_stems(r.prompt for r in self.results)
            files = {p: f"{stem}.nii.gz" for p, stem in stems.items()}
            # Two writers: compression releases the GIL, and most of a mask's file is a reused member of zeros
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(lambda r: save_like(r.mask, self.scan, tmp / files[r.prompt]), self.results))
            written = {p: out_dir / f for p, f in files.items()}
            if overlay:
                save_overlay(self.scan.data, {r.prompt: r.mask for r in self.results},
                             tmp / "overlay.png", spacing=self.scan.spacing, window=self.display_window,
                             title=Path(self.scan.path).name if self.scan.path else None)
                written["overlay"] = out_dir / "overlay.png"
            report = self.report(files)
            if multilabel:
                labels, table = self.label_map()
                save_like(labels, self.scan, tmp / "labels.nii.gz", dtype=labels.dtype)
                del labels
                (tmp / "labels.json").write_text(json.dumps({"rule": "overlaps go to the smaller structure",
                                                             "background": 0, "labels": table}, indent=2))
                written.update(labels=out_dir / "labels.nii.gz", labels_table=out_dir / "labels.json")
            if statistics:
                rows = self.statistics()
                report["statistics"] = rows
                with open(tmp / "statistics.csv", "w", newline="") as fh:
                    writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
                written["statistics"] = out_dir / "statistics.csv"
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            written["report"] = out_dir / "report.json"
            out_dir.mkdir(exist_ok=True)
            for item in tmp.iterdir():
                os.replace(item, out_dir / item.name)
            return written
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
