"""A class's embedding from all its training wordings: the unit-length mean of its name's and synonyms' embeddings
(prompt ensembling), the one definition that retrieval, prompt reading and inference share."""

from __future__ import annotations

import torch


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def class_embeddings(text_encoder, vocabulary, names=None, ensemble: bool = True) -> torch.Tensor:
    """``[N, D]`` unit vectors, one per class of ``names`` (default: every class of ``vocabulary``): with
    ``ensemble`` the normalised mean of the unit embeddings of the class's name and synonyms, else its name's."""
    names = list(vocabulary.names if names is None else names)
    if not ensemble:
        return unit(text_encoder.encode(names))
    texts = [list(dict.fromkeys([name, *vocabulary.synonyms[name]])) for name in names]
    flat = [t for group in texts for t in group]
    vectors = unit(text_encoder.encode(flat))
    out, start = [], 0
    for group in texts:
        out.append(vectors[start:start + len(group)].mean(0))
        start += len(group)
    return unit(torch.stack(out))
