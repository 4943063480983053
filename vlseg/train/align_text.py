"""Text-side alignment (``vlseg align-text``): a text tower adapted contrastively on the vocabulary before any image is
seen, in the spirit of SAT's first stage but from the vocabulary alone.

Every wording a class is trained with (its name and synonyms, each also inside a few neutral phrasings such as
"the {}") is pulled towards the class's other wordings and pushed away from every other class's, by a supervised
contrastive loss over batches of classes.  What the hierarchy says shapes the negatives:

* a class and the classes inside it that are anatomy (a lung and its lobes, the spine and a vertebra) are neither
  positives nor negatives: "lung" should stay near "left lung";
* the other side of a left/right pair, and a lesion and the organ it lies in ("liver tumor" / "liver"), are hard
  negatives: each batch that draws one draws the other, and they weigh ``hard_weight`` times more in the loss.

Held-out paraphrases are never used: they are what ``vlseg.evaluate.retrieval`` measures before and after.  The
adapted tower is written by its encoder's ``export`` into a folder that ``text_encoder.path`` (or ``weights``) loads
like any other, with ``alignment.json`` recording where it came from, how it was trained, and the retrieval figures.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from vlseg.errors import VlsegError
from vlseg.models.text.base import clear_embedding_cache
from vlseg.vocab.relations import relation_matrices

ALIGNMENT = "alignment.json"
# Neutral phrasings a wording is also trained inside (never a held-out paraphrase's words): robustness to framing.
PHRASINGS = ("{}", "the {}", "{} region", "segment the {}", "a scan showing the {}")


@dataclasses.dataclass
class AlignSettings:
    steps: int = 400
    classes_per_batch: int = 64
    wordings_per_class: int = 2
    lr: float = 3e-5
    temperature: float = 0.05
    hard_weight: float = 3.0  # how much more a left/right or organ/lesion counterpart counts in the denominator
    seed: int = 0


def _batch(rng: np.random.Generator, vocabulary, hard: np.ndarray, settings: AlignSettings) -> tuple[list, list]:
    """Texts and their class indices: half the classes drawn at random, each with one hard counterpart when it has
    one, the rest filled at random; each class with ``wordings_per_class`` wordings in random phrasings."""
    n = len(vocabulary.names)
    k = min(settings.classes_per_batch, n)
    chosen = list(rng.choice(n, size=max(1, k // 2), replace=False))
    for c in list(chosen):
        partners = np.flatnonzero(hard[c])
        if partners.size and len(chosen) < k:
            chosen.append(int(rng.choice(partners)))
    rest = np.setdiff1d(np.arange(n), chosen)
    chosen = list(dict.fromkeys(int(c) for c in chosen))
    chosen += [int(c) for c in rng.choice(rest, size=min(k - len(chosen), rest.size), replace=False)]
    texts, labels = [], []
    for c in chosen:
        name = vocabulary.names[c]
        wordings = list(dict.fromkeys([name, *vocabulary.synonyms[name]]))
        for _ in range(settings.wordings_per_class):
            phrasing = PHRASINGS[int(rng.integers(len(PHRASINGS)))]
            texts.append(phrasing.format(wordings[int(rng.integers(len(wordings)))]))
            labels.append(c)
    return texts, labels


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, neutral: torch.Tensor, hard: torch.Tensor,
                     temperature: float, hard_weight: float) -> torch.Tensor:
    """Supervised contrastive loss of unit ``embeddings`` [B, D] with class ``labels`` [B]: for each text, the mean
    over its same-class texts of -log(exp(s⁺) / Σ w·exp(s)), the sum over every other text that is not ``neutral`` to
    it, hard counterparts weighted ``hard_weight``."""
    sims = embeddings @ embeddings.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=sims.device)
    positive = same & ~eye
    pair_neutral = neutral[labels][:, labels] & ~same
    weight = torch.where(hard[labels][:, labels], torch.tensor(float(hard_weight)), torch.tensor(1.0))
    logits = sims + torch.log(weight.to(sims))
    logits = logits.masked_fill(eye | pair_neutral, float("-inf"))
    log_prob = sims - torch.logsumexp(logits, dim=1, keepdim=True)
    has = positive.any(1)
    per_text = (log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp_min(1))[has]
    return -per_text.mean()


def align(encoder, vocabulary, settings: AlignSettings, progress: bool = True, log=None) -> list[float]:
    """Train ``encoder`` (a text tower built unfrozen) in place; returns the loss per step."""
    from tqdm.auto import tqdm

    if not hasattr(encoder, "export"):
        raise VlsegError(f"text encoder {encoder.identity().get('name')!r} cannot be aligned: align-text adapts hf "
                         f"and clip towers")
    if len(vocabulary) < 2:
        raise VlsegError("align-text needs a vocabulary of two classes or more")
    nested, counterparts = relation_matrices(vocabulary)
    neutral, hard = torch.from_numpy(nested), torch.from_numpy(counterparts)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    encoder.frozen = False
    if not getattr(encoder, "lora", None):  # with LoRA only the adapters train
        encoder.requires_grad_(True)
    encoder.train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / max(settings.steps, 1)))
    losses = []
    bar = tqdm(range(settings.steps), desc="aligning text", disable=not progress)
    for step in bar:
        texts, labels = _batch(rng, vocabulary, counterparts, settings)
        emb = torch.nn.functional.normalize(encoder.embed(texts).float(), dim=-1)
        loss = contrastive_loss(emb, torch.tensor(labels), neutral, hard, settings.temperature, settings.hard_weight)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if log is not None:
            log(step, losses[-1])
    encoder.freeze_()
    clear_embedding_cache()  # the tower's identity is unchanged until it is written: drop what it encoded before
    return losses


def write_alignment(out: Path, section: dict, base_identity: dict, settings: AlignSettings, vocabulary_source: str,
                    classes: int, before: dict, after: dict, losses: list[float], seconds: float) -> Path:
    """The folder's ``alignment.json``: the text-encoder section that loads it, its origin, the training settings and
    the retrieval figures before and after."""
    from vlseg import __version__

    trim = lambda r: {k: v for k, v in r.items() if k != "errors"}  # noqa: E731
    record = {"text_encoder": section, "adapted_from": base_identity, "by": f"vlseg {__version__} align-text",
              "licence": "that of the tower it was adapted from (see adapted_from)",
              "settings": dataclasses.asdict(settings), "vocabulary": vocabulary_source, "classes": classes,
              "retrieval_before": trim(before), "retrieval_after": trim(after),
              "loss_first_last": [losses[0], float(np.mean(losses[-20:]))] if losses else None,
              "seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(out) / ALIGNMENT
    path.write_text(json.dumps(record, indent=2))
    return path


def read_alignment(folder: Path) -> dict | None:
    path = Path(folder) / ALIGNMENT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise VlsegError(f"{path}: not an alignment record vlseg wrote") from None
