"""Inference: ``Segmenter.from_pretrained(ckpt).segment(scan, ["liver tumor", "liver"])``.

The scan is brought to the model's frame (RAS-canonical, the training spacing if one was set, normalised), a MONAI
sliding window with Gaussian blending runs the image encoder once per window and decodes every prompt from those
features, and the masks are mapped back onto the input's exact grid (shape, orientation, affine).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlseg.io import (Scan, load_scan, normalize_intensity, positive_triple, resample_to_shape, resample_to_spacing,
                      save_like)
from vlseg.models.network import network_from_checkpoint
from vlseg.prompts import slug, validate_prompts


@dataclass
class PromptResult:
    prompt: str
    vocabulary_class: str | None
    presence_probability: float
    present: bool
    mask: np.ndarray  # uint8 on the canonical grid of the scan
    voxels: int
    volume_ml: float


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
                return self.scan.to_original(r.mask) if space == "original" else r.mask
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
                         **({"file": files[r.prompt]} if files else {})} for r in self.results],
            **self.extra,
        }

    def save(self, out_dir: str | Path, overlay: bool = True) -> dict[str, Path]:
        """Write one uint8 NIfTI per prompt (input geometry), ``report.json`` and ``overlay.png``.

        Files are written into a temporary folder beside ``out_dir`` and moved in only when all succeeded.
        """
        from vlseg.overlay import save_overlay

        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".vlseg-", dir=out_dir.parent))
        try:
            names, files = {}, {}
            for r in self.results:
                name = slug(r.prompt)
                while name in names.values():
                    name += "_"
                names[r.prompt] = name
                files[r.prompt] = f"{name}.nii.gz"
                save_like(r.mask, self.scan, tmp / files[r.prompt])
            written = {p: out_dir / f for p, f in files.items()}
            if overlay:
                save_overlay(self.scan.data, {r.prompt: r.mask.astype(bool) for r in self.results},
                             tmp / "overlay.png", spacing=self.scan.spacing, window=self.display_window,
                             title=Path(self.scan.path).name if self.scan.path else None)
                written["overlay"] = out_dir / "overlay.png"
            (tmp / "report.json").write_text(json.dumps(self.report(files), indent=2))
            written["report"] = out_dir / "report.json"
            out_dir.mkdir(exist_ok=True)
            for item in tmp.iterdir():
                os.replace(item, out_dir / item.name)
            return written
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_spacing(value) -> tuple[float, float, float]:
    """A working spacing given by a user: one number (isotropic), three numbers, or "3" / "4,4,3" from a command
    line → three positive floats, else a one-line error."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    elif isinstance(value, (int, float)):
        value = [value]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = list(value) * 3
    return positive_triple(value, "the spacing (mm)", where="spacing")


def working_spacing(dcfg: dict):
    """The spacing the model predicts at: recorded by training (``inference_spacing``), else a fixed
    ``target_spacing``; None keeps the scan's own grid."""
    if dcfg.get("inference_spacing"):
        return dcfg["inference_spacing"]
    target = dcfg.get("target_spacing")
    return target if isinstance(target, (list, tuple)) else None


class Segmenter:
    def __init__(self, net, text_encoder, vocabulary, config: dict, checkpoint: str = "", device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device).eval()
        self.vocabulary, self.config, self.checkpoint = vocabulary, config, checkpoint

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, spacing=None) -> "Segmenter":
        """``spacing`` (mm: one number or three) replaces the working spacing the checkpoint records."""
        net, text_encoder, vocabulary, cfg, meta = network_from_checkpoint(path)
        if spacing is not None:
            cfg["data"]["inference_spacing"] = list(parse_spacing(spacing))
        return cls(net, text_encoder, vocabulary, cfg, checkpoint=str(path), device=device)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts).to(self.device)

    @torch.no_grad()
    def segment(self, image, prompts, modality: str = "CT", threshold: float | None = None,
                presence_threshold: float | None = None) -> SegmentationResult:
        from monai.inferers import sliding_window_inference

        prompts = validate_prompts(prompts)
        icfg, dcfg = self.config["inference"], self.config["data"]
        threshold = icfg["threshold"] if threshold is None else threshold
        presence_threshold = icfg["presence_threshold"] if presence_threshold is None else presence_threshold
        start = time.perf_counter()
        scan = load_scan(image)
        data = normalize_intensity(scan.data, modality, tuple(dcfg["ct_window"]))
        spacing = working_spacing(dcfg)
        if spacing is not None:
            data = resample_to_spacing(data, scan.spacing, spacing, order=1)
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None].to(self.device)
        emb = self.embed(prompts)[None]  # [1, Q, D]
        presence = torch.zeros(len(prompts), device=self.device)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            nonlocal presence
            features = self.net.encode_image(window)  # once per window, shared by every prompt
            out = self.net.decode(features, emb.expand(window.shape[0], -1, -1))
            presence = torch.maximum(presence, torch.sigmoid(out["presence_logits"].float()).amax(0))
            return torch.sigmoid(out["mask_logits"].float())

        prob = sliding_window_inference(x, roi_size=list(dcfg["crop_size"]), sw_batch_size=int(icfg["sw_batch_size"]),
                                        predictor=predictor, overlap=float(icfg["overlap"]), mode="gaussian",
                                        padding_mode="replicate")[0]
        prob = prob.cpu().numpy()
        if prob.shape[1:] != scan.data.shape:
            prob = resample_to_shape(prob, scan.data.shape, order=1)
        voxel_ml = float(np.prod(scan.spacing)) / 1000.0
        results = []
        for q, prompt in enumerate(prompts):
            p_present = float(presence[q])
            # The presence head vetoes masks for targets it judges absent: no hallucinated organs.
            if p_present >= presence_threshold:
                mask = (prob[q] >= threshold).astype(np.uint8)
            else:
                mask = np.zeros(scan.data.shape, np.uint8)
            results.append(PromptResult(prompt, self.vocabulary.resolve(prompt), p_present, bool(mask.any()), mask,
                                        int(mask.sum()), int(mask.sum()) * voxel_ml))
        window = tuple(dcfg["ct_window"]) if str(modality).upper() == "CT" else None
        return SegmentationResult(scan, results, time.perf_counter() - start, self.checkpoint, window,
                                  extra={"device": str(self.device),
                                         "working_spacing_mm": None if spacing is None else [float(v) for v in spacing]})
