"""Inference: ``Segmenter.from_pretrained(ckpt).segment(scan, ["liver tumor", "liver"])``.

The scan is brought to the model's frame (RAS-canonical, the training spacing if one was set, normalised), a sliding
window with Gaussian blending (``vlseg.stitching``) runs the image encoder once per window and decodes every prompt from
those features in chunks, and the masks are mapped back onto the input's exact grid (shape, orientation, affine) with
memory that does not grow with the number of prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import numpy as np
import torch

from vlseg.config import DataSection, InferenceSection
from vlseg.errors import VlsegError
from vlseg.infer.result import PromptResult, SegmentationResult
from vlseg.infer.stitching import BoxMask, stitch, upsample_box
from vlseg.io.scan import load_scan
from vlseg.models.network import network_from_checkpoint
from vlseg.transforms.boxes import mask_box
from vlseg.transforms.frame import to_model_frame
from vlseg.transforms.spatial import positive_triple, resample_to_shape
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


FOREGROUND_RULES = ("nonzero", "positive", "window")


def foreground_box(data, rule: str | None, ct_window=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray] | None:
    """``(lo, hi)`` of the foreground voxels by ``rule``: ``nonzero`` (!= 0, nnU-Net's crop), ``positive`` (> 0,
    MONAI's CropForeground on raw values, as SAT uses it), ``window`` (above the CT window's low end: CropForeground
    after the window, as CLIP-Universal uses it); None without a rule or when no voxel is foreground."""
    if rule is None:
        return None
    if rule not in FOREGROUND_RULES:
        raise VlsegError(f"data.crop_foreground={rule!r}: use null, {', '.join(FOREGROUND_RULES)}")
    data = np.asarray(data)
    threshold = float(ct_window[0]) if rule == "window" else 0.0
    box = mask_box(data != 0 if rule == "nonzero" else data > threshold)
    return None if box is None else (np.asarray(box[0]), np.asarray(box[1]))


@dataclasses.dataclass(frozen=True)
class Placement:
    """How a probability on the model's grid becomes a mask on the scan's: thresholded while only the box where it
    can be positive is brought to the scan's grid (``upsample_box``), shifted by where the model's input was cut out
    (``offset``), optionally reduced to its largest connected component."""

    shape: tuple
    frame: object
    offset: tuple
    threshold: float
    largest_component: bool

    def mask(self, prob) -> BoxMask:
        if prob is None:
            return BoxMask(self.shape)
        offset, crop = upsample_box(prob, self.frame.scan_shape, self.threshold)
        if self.largest_component and crop.any():
            crop = largest_component(crop)
        return BoxMask(self.shape, tuple(int(a) + int(b) for a, b in zip(offset, self.offset)), crop)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask, as uint8."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.astype(np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == int(np.argmax(sizes)) + 1).astype(np.uint8)


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
        threshold is the one ``vlseg calibrate`` stored with the checkpoint, if any, and a class's own where it
        fitted one (``calibrated=False``: the config's)."""
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
    def embed(self, prompts: list) -> torch.Tensor:
        """``[Q, D]`` embeddings of prompts as typed (strings) or as understood (``PromptMatch``: its ``query``, or,
        asked as a class's synonym ensemble, ``class_embeddings`` at the length of the class name's own embedding, for
        towers whose embeddings are not unit vectors: SAT).  SAT's modality is the one ``use_modality`` set last."""
        from vlseg.models.text.ensemble import class_embeddings

        emb = self.text_encoder.encode([p if isinstance(p, str) else p.query for p in prompts])
        rows = [i for i, p in enumerate(prompts) if not isinstance(p, str) and p.ensembled]
        if rows:
            mean = class_embeddings(self.text_encoder, self.vocabulary, [prompts[i].ensembled for i in rows])
            emb[rows] = (mean.to(emb) * emb[rows].norm(dim=-1, keepdim=True)).to(emb.dtype)
        return emb.to(self.device)

    @property
    def settings(self) -> InferenceSection:
        return InferenceSection.from_config(self.config)

    @property
    def presence_threshold(self) -> float:
        return self.settings.presence_threshold

    def presence_threshold_for(self, name: str | None) -> float:
        """The presence threshold a prompt understood as class ``name`` is vetoed at: the class's own where
        ``vlseg calibrate`` fitted one, else the global one."""
        by_class = (self.calibration or {}).get("class_thresholds") or {}
        return float(by_class.get(name, self.presence_threshold))

    def _stitch(self, x: torch.Tensor, prompt_ids: list[int], emb: torch.Tensor, tta: bool, region=None):
        """Windows over ``x`` with the backbone run once per window (and mirroring) for every prompt in
        ``prompt_ids``; see ``vlseg.infer.stitching.stitch``."""
        settings = self.settings
        emb = emb[:, prompt_ids]
        # Mirrorings as dims of [B, C, X, Y, Z] (the masks [B, Q, X, Y, Z] flip back on the same dims).
        flips = [()] + ([(3,), (4,)] if tta else [])

        def encode(windows: torch.Tensor):
            windows = windows.to(self.device)
            return [self.net.encode_image(windows.flip(f) if f else windows) for f in flips]

        as_logits = settings.blend == "logit"

        def decode(features, start: int, stop: int):
            probs = presence = 0.0
            for f, feats in zip(flips, features):
                out = self.net.decode(feats, emb[:, start:stop].expand(feats.batch_size, -1, -1))
                p = out.mask_logits.float() if as_logits else torch.sigmoid(out.mask_logits.float())
                probs = probs + (p.flip(f) if f else p)
                presence = presence + torch.sigmoid(out.presence_logits.float())
            return probs / len(flips), presence / len(flips)

        return stitch(x, DataSection.from_config(self.config).crop_size, settings.overlap, len(prompt_ids), encode,
                      decode, batch_size=settings.sw_batch_size, prompt_chunk=settings.prompt_chunk, region=region,
                      blend=settings.blend, placement=settings.window_placement, pad_mode=settings.pad_mode)

    def understand(self, prompts) -> list[PromptMatch]:
        """How each prompt will be asked (see ``vlseg.vocab.prompts.interpret_prompts``); a one-line error for prompts
        that cannot be meant as a structure."""
        settings = self.settings
        return interpret_prompts(prompts, self.vocabulary, self.text_encoder, settings.min_prompt_similarity,
                                 settings.prompt_ensemble, settings.nearest_min_similarity, settings.nearest_margin)

    def _coarse_pass(self, x: torch.Tensor, run, threshold: float, presence_threshold: float):
        """A pass at twice the spacing: which prompts are there, the box (plus a quarter window) covering them, their
        presence, and how many windows it took.  Returns ``(asked, region, presence, windows)``."""
        coarse = resample_to_shape(x[0, 0].numpy(), [max(1, round(n / 2)) for n in x.shape[2:]], order=1)
        n_prompts = run.keywords["emb"].shape[1]
        stitcher, presence = run(torch.from_numpy(coarse)[None, None], list(range(n_prompts)))
        asked, boxes = [], []
        scale = np.asarray(x.shape[2:]) / np.asarray(coarse.shape)
        margin = np.asarray(DataSection.from_config(self.config).crop_size) // 4
        for q in range(n_prompts):
            prob = stitcher.probability(q) if presence[q] >= presence_threshold else None
            box = None if prob is None else mask_box(prob >= 0.5 * threshold)
            if box is None:
                continue
            asked.append(q)
            boxes.append((np.maximum(np.floor(box[0] * scale) - margin, 0),
                          np.minimum(np.ceil(box[1] * scale) + margin, x.shape[2:])))
        region = None
        if boxes:
            region = (np.min([b[0] for b in boxes], 0).astype(int), np.max([b[1] for b in boxes], 0).astype(int))
        return asked, region, presence.clone(), len(stitcher.corners)

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
        interpret = interpret and self.settings.interpret_prompts
        if hasattr(self.text_encoder, "use_modality"):  # towers that embed the modality with the prompt (SAT)
            self.text_encoder.use_modality(modality)
        matches = self.understand(prompts) if interpret else [
            PromptMatch(p, p, self.vocabulary.resolve(p), "as written") for p in prompts]
        settings, data_cfg = self.settings, DataSection.from_config(self.config)
        threshold = settings.threshold if threshold is None else threshold
        threshold_from = "argument" if presence_threshold is not None else (
            "calibration" if self.calibration else "config")
        presence_threshold = settings.presence_threshold if presence_threshold is None else presence_threshold
        # A class's own threshold where vlseg calibrate fitted one (an argument overrides them all)
        presence_thresholds = [presence_threshold if threshold_from == "argument" else
                               self.presence_threshold_for(m.vocabulary_class) for m in matches]
        start = time.perf_counter()
        scan = load_scan(image)
        spacing = data_cfg.working_spacing()  # the rule training recorded it by
        if coarsen != 1.0:
            spacing = [float(coarsen) * float(v) for v in (spacing if spacing is not None else scan.spacing)]
        # crop_foreground: the model sees only the box of the foreground voxels; outside it every mask is empty
        box = foreground_box(scan.data, data_cfg.crop_foreground, data_cfg.ct_window)
        data, frame = to_model_frame(scan if box is None else dataclasses.replace(
            scan, data=scan.data[tuple(slice(a, b) for a, b in zip(*box))]), modality, data_cfg.ct_window, spacing,
                                     data_cfg.intensity)
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
        del data
        run = functools.partial(self._stitch, emb=self.embed(matches)[None], tta=tta)
        asked, region, windows = list(range(len(prompts))), None, 0  # which prompts the working-spacing pass decodes
        if coarse_to_fine:
            asked, region, presence, windows = self._coarse_pass(x, run, threshold, min(presence_thresholds))
        stitcher, fine_presence = run(x, asked, region=region) if asked else (None, torch.zeros(0))
        if not coarse_to_fine:
            presence = fine_presence
        else:  # found by the coarse pass: the working-spacing pass has the last word on presence too
            presence[asked] = fine_presence
        windows += len(stitcher.corners) if stitcher is not None else 0
        # The presence head vetoes masks for targets it judges absent: no hallucinated organs.
        kept = [q in asked and float(presence[q]) >= presence_thresholds[q] for q in range(len(prompts))]
        place = Placement(scan.data.shape, frame, (0, 0, 0) if box is None else tuple(box[0]), threshold,
                          settings.largest_component)
        results = [self._result(scan, place, prompt, matches[q], float(presence[q]),
                                stitcher.probability(asked.index(q)) if kept[q] else None)
                   for q, prompt in enumerate(prompts)]
        window = data_cfg.ct_window if str(modality).upper() == "CT" else None
        return SegmentationResult(scan, results, time.perf_counter() - start, self.checkpoint, window,
                                  extra={"device": str(self.device), "presence_threshold": presence_threshold,
                                         "presence_threshold_from": threshold_from,
                                         "class_presence_thresholds": {  # the prompts whose class had its own
                                             p: t for p, t in zip(prompts, presence_thresholds)
                                             if t != presence_threshold},
                                         "working_spacing_mm": None if spacing is None else [float(v) for v in spacing],
                                         "tta": bool(tta),
                                         "accumulated_prompts": stitcher.allocated if stitcher is not None else 0,
                                         "windows": windows, "coarse_to_fine": bool(coarse_to_fine)})

    @staticmethod
    def _result(scan, place: "Placement", prompt: str, match: PromptMatch, p_present: float, prob) -> PromptResult:
        """One prompt's answer on the scan's grid from its probability at the working spacing (None: no mask)."""
        mask = place.mask(prob)
        voxels = mask.sum()
        voxel_ml = float(np.prod(scan.spacing)) / 1000.0
        inside = None if prob is None else prob[prob >= place.threshold]
        mean_probability = float(inside.mean()) if inside is not None and inside.size else None
        return PromptResult(prompt, match.vocabulary_class, p_present, voxels > 0, mask, voxels, voxels * voxel_ml,
                            match, mean_probability)
