"""Inference: ``Segmenter.from_pretrained(ckpt).segment(scan, ["liver tumor", "liver"])``.

The scan is brought to the model's frame (RAS-canonical, the training spacing if one was set, normalised), a sliding
window with Gaussian blending (``vlseg.stitching``) runs the image encoder once per window and decodes every prompt from
those features in chunks, and the masks are mapped back onto the input's exact grid (shape, orientation, affine) with
memory that does not grow with the number of prompts.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch

from vlseg.infer.result import PromptResult, SegmentationResult
from vlseg.infer.stitching import BoxMask, bounding_box, stitch, upsample_box
from vlseg.io.scan import load_scan
from vlseg.models.network import network_from_checkpoint
from vlseg.transforms.intensity import normalize_intensity
from vlseg.transforms.spatial import positive_triple, resample_to_shape, resample_to_spacing
from vlseg.vocab.prompts import PromptMatch, interpret_prompts, validate_prompts


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
        self.calibration = None  # what vlseg calibrate chose, when the checkpoint has it

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, spacing=None, calibrated: bool = True) -> "Segmenter":
        """``spacing`` (mm: one number or three) replaces the working spacing the checkpoint records.  The presence
        threshold is the one ``vlseg calibrate`` stored with the checkpoint, if any (``calibrated=False``: the
        config's)."""
        from vlseg.checkpoint import resolve_checkpoint
        from vlseg.infer.calibrate import read_calibration

        net, text_encoder, vocabulary, cfg, meta = network_from_checkpoint(path)
        if spacing is not None:
            cfg["data"]["inference_spacing"] = list(parse_spacing(spacing))
        calibration = read_calibration(resolve_checkpoint(path)) if calibrated else None
        if calibration is not None:
            cfg["inference"]["presence_threshold"] = float(calibration["presence_threshold"])
        segmenter = cls(net, text_encoder, vocabulary, cfg, checkpoint=str(path), device=device)
        segmenter.calibration = calibration
        return segmenter

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts).to(self.device)

    @property
    def presence_threshold(self) -> float:
        return float(self.config["inference"]["presence_threshold"])

    def _stitch(self, x: torch.Tensor, prompt_ids: list[int], emb: torch.Tensor, tta: bool, region=None):
        """Windows over ``x`` with the backbone run once per window (and mirroring) for every prompt in
        ``prompt_ids``; see ``vlseg.stitching.stitch``."""
        icfg, dcfg = self.config["inference"], self.config["data"]
        emb = emb[:, prompt_ids]
        # Mirrorings as dims of [B, C, X, Y, Z] (the masks [B, Q, X, Y, Z] flip back on the same dims).
        flips = [()] + ([(3,), (4,)] if tta else [])

        def encode(windows: torch.Tensor):
            windows = windows.to(self.device)
            return [self.net.encode_image(windows.flip(f) if f else windows) for f in flips]

        def decode(features, start: int, stop: int):
            probs = presence = 0.0
            for f, feats in zip(flips, features):
                out = self.net.decode(feats, emb[:, start:stop].expand(feats.voxel_embedding.shape[0], -1, -1))
                p = torch.sigmoid(out["mask_logits"].float())
                probs = probs + (p.flip(f) if f else p)
                presence = presence + torch.sigmoid(out["presence_logits"].float())
            return probs / len(flips), presence / len(flips)

        return stitch(x, tuple(dcfg["crop_size"]), float(icfg["overlap"]), len(prompt_ids), encode, decode,
                      batch_size=int(icfg["sw_batch_size"]), prompt_chunk=int(icfg.get("prompt_chunk", 16)),
                      region=region)

    def understand(self, prompts) -> list[PromptMatch]:
        """How each prompt will be asked (see ``vlseg.prompts.interpret_prompts``); a one-line error for prompts that
        cannot be meant as a structure."""
        return interpret_prompts(prompts, self.vocabulary, self.text_encoder,
                                 float(self.config["inference"].get("min_prompt_similarity", 0.3)))

    @torch.no_grad()
    def segment(self, image, prompts, modality: str = "CT", threshold: float | None = None,
                presence_threshold: float | None = None, interpret: bool = True, tta: bool = False,
                coarsen: float = 1.0, coarse_to_fine: bool = False) -> SegmentationResult:
        """``interpret=False`` gives the text encoder every prompt exactly as written (evaluation does, so held-out
        paraphrases test the encoder rather than the vocabulary lookup).  ``tta``: each window is also run mirrored
        front–back and head–foot and the three answers are averaged (3× the backbone work).  Never mirrored
        left–right, which would swap the left and right organs.  ``coarsen`` multiplies the working spacing (the
        checkpoint's, or the scan's own for a model without one): ``vlseg predict --fast`` uses 1.5.
        ``coarse_to_fine``: a first pass at twice the spacing keeps the prompts it finds and the box around them
        (plus a quarter window); the pass at the working spacing then covers only that box, for those prompts."""
        prompts = validate_prompts(prompts)
        matches = self.understand(prompts) if interpret else [
            PromptMatch(p, p, self.vocabulary.resolve(p), "as written") for p in prompts]
        icfg, dcfg = self.config["inference"], self.config["data"]
        threshold = icfg["threshold"] if threshold is None else threshold
        threshold_from = "argument" if presence_threshold is not None else (
            "calibration" if self.calibration else "config")
        presence_threshold = icfg["presence_threshold"] if presence_threshold is None else presence_threshold
        start = time.perf_counter()
        scan = load_scan(image)
        data = normalize_intensity(scan.data, modality, tuple(dcfg["ct_window"]))
        spacing = working_spacing(dcfg)
        if coarsen != 1.0:
            spacing = [float(coarsen) * float(v) for v in (spacing if spacing is not None else scan.spacing)]
        if spacing is not None:
            data = resample_to_spacing(data, scan.spacing, spacing, order=1)
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
        del data
        emb = self.embed([m.query for m in matches])[None]  # [1, Q, D]

        run = functools.partial(self._stitch, emb=emb, tta=tta)
        asked = list(range(len(prompts)))  # which prompts the full-resolution pass decodes
        region, windows = None, 0
        if coarse_to_fine:
            # A pass at twice the spacing finds which targets are there and where; the pass at the working spacing
            # then runs only over the windows covering them, and only for them.
            coarse = resample_to_shape(x[0, 0].numpy(), [max(1, round(n / 2)) for n in x.shape[2:]], order=1)
            coarse_stitcher, coarse_presence = run(torch.from_numpy(coarse)[None, None], list(asked))
            windows += len(coarse_stitcher.corners)
            asked, boxes = [], []
            for q in range(len(prompts)):
                prob = coarse_stitcher.probability(q) if coarse_presence[q] >= presence_threshold else None
                box = None if prob is None else bounding_box(prob >= 0.5 * threshold)
                if box is None:
                    continue
                asked.append(q)
                scale = np.asarray(x.shape[2:]) / np.asarray(coarse.shape)
                margin = np.asarray(dcfg["crop_size"]) // 4
                boxes.append((np.maximum(np.floor(box[0] * scale) - margin, 0),
                              np.minimum(np.ceil(box[1] * scale) + margin, x.shape[2:])))
            if boxes:
                region = (np.min([b[0] for b in boxes], 0).astype(int), np.max([b[1] for b in boxes], 0).astype(int))
            presence = coarse_presence.clone()
        stitcher, fine_presence = run(x, asked, region=region) if asked else (None, torch.zeros(0))
        if not coarse_to_fine:
            presence = fine_presence
        else:  # found by the coarse pass: the working-spacing pass has the last word on presence too
            presence[asked] = fine_presence
        windows += len(stitcher.corners) if stitcher is not None else 0
        voxel_ml = float(np.prod(scan.spacing)) / 1000.0
        results = []
        for q, prompt in enumerate(prompts):
            p_present = float(presence[q])
            mask = BoxMask(scan.data.shape)
            # The presence head vetoes masks for targets it judges absent: no hallucinated organs.
            prob = (stitcher.probability(asked.index(q)) if q in asked and p_present >= presence_threshold
                    else None)
            if prob is not None:
                # Only the box where the mask can be positive is brought to the scan's grid (one prompt at a time).
                offset, crop = upsample_box(prob, scan.data.shape, threshold)
                mask = BoxMask(scan.data.shape, offset, crop)
            voxels = mask.sum()
            results.append(PromptResult(prompt, matches[q].vocabulary_class, p_present, voxels > 0, mask, voxels,
                                        voxels * voxel_ml, matches[q]))
        stats = {"accumulated_prompts": stitcher.allocated if stitcher is not None else 0, "windows": windows,
                 "coarse_to_fine": bool(coarse_to_fine)}
        window = tuple(dcfg["ct_window"]) if str(modality).upper() == "CT" else None
        return SegmentationResult(scan, results, time.perf_counter() - start, self.checkpoint, window,
                                  extra={"device": str(self.device), "presence_threshold": presence_threshold,
                                         "presence_threshold_from": threshold_from,
                                         "working_spacing_mm": None if spacing is None else [float(v) for v in spacing],
                                         "tta": bool(tta),
                                         **stats})
