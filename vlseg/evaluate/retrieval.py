"""Paraphrase → class retrieval: how well a text encoder alone maps wordings it was never trained on (the vocabulary's
held-out paraphrases) onto the right class among every class of a vocabulary.

Each held-out paraphrase is a query; each class is represented by its name's embedding, or (``ensemble``) by the
mean of its name's and synonyms' (``vlseg.models.text.ensemble``).  Reported: top-1 and top-5 accuracy with a
bootstrap interval over classes (a class's paraphrases resampled together), and the two confusions that matter most
for segmentation, counted apart among the top-1 errors: the other side of a left/right pair ("left kidney" answered
with the right one) and organ ↔ lesion ("liver" answered with "liver tumor" or the reverse).
"""

from __future__ import annotations

import numpy as np

from vlseg.models.text.ensemble import class_embeddings, unit
from vlseg.vocab.relations import counterpart, is_lesion, side, sideless


def paraphrase_retrieval(text_encoder, vocabulary, ensemble: bool = False, resamples: int = 1000,
                         seed: int = 0) -> dict:
    """Top-1/top-5 retrieval of every held-out paraphrase of ``vocabulary`` among all its classes (see the module
    docstring).  ``errors`` lists each top-1 miss with what it was answered with and its confusion kind."""
    import torch

    names = list(vocabulary.names)
    queries = [(text, i) for i, name in enumerate(names) for text in vocabulary.heldout[name]]
    if not queries:
        return {"queries": 0, "classes": len(names), "top1": None, "top5": None}
    with torch.no_grad():
        keys = class_embeddings(text_encoder, vocabulary, names, ensemble=ensemble)
        asked = unit(text_encoder.encode([q for q, _ in queries]))
    ranking = (asked @ keys.T).argsort(dim=1, descending=True)[:, :5].numpy()
    truth = np.array([i for _, i in queries])
    hit1, hit5 = ranking[:, 0] == truth, (ranking == truth[:, None]).any(1)
    errors, counts = [], {"left/right": 0, "organ/lesion": 0}
    for (text, i), row in zip(queries, ranking):
        if row[0] != i:
            kind = counterpart(vocabulary, names[i], names[row[0]])
            if kind is not None:
                counts[kind] += 1
            errors.append({"query": text, "class": names[i], "answered": names[row[0]], "confusion": kind})
    sided = [k for k, (_, i) in enumerate(queries) if _sided_pair(vocabulary, names[i])]
    lesion = [k for k, (_, i) in enumerate(queries) if is_lesion(names[i])]
    return {
        "queries": len(queries), "classes": len(names), "ensemble": bool(ensemble),
        "top1": float(hit1.mean()), "top5": float(hit5.mean()),
        "top1_interval": _class_bootstrap(hit1, truth, resamples, seed),
        "top5_interval": _class_bootstrap(hit5, truth, resamples, seed),
        "left_right_confusions": counts["left/right"], "left_right_queries": len(sided),
        "organ_lesion_confusions": counts["organ/lesion"], "lesion_queries": len(lesion),
        "errors": errors,
    }


def _sided_pair(vocabulary, name: str) -> bool:
    """The class has a counterpart of the other side in the vocabulary."""
    return side(name) is not None and any(side(n) not in (None, side(name)) and sideless(n) == sideless(name)
                                          for n in vocabulary.names)


def _class_bootstrap(hits: np.ndarray, classes: np.ndarray, resamples: int, seed: int) -> list[float] | None:
    """95% interval of the hit rate, resampling classes and then their paraphrases (a class's are not independent)."""
    from vlseg.evaluate.uncertainty import bootstrap, mean

    rows = [{"class": int(c), "hit": float(h)} for h, c in zip(hits, classes)]
    return bootstrap(rows, mean("hit"), cluster="class", resamples=resamples, seed=seed)["interval"]
