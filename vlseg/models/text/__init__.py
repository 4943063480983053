"""Text encoders behind one interface: ``encode(list of str) → [N, D]``, chosen by ``text_encoder.name``."""

from vlseg.models.text.base import TextEncoder, clear_embedding_cache
from vlseg.registry import TEXT_ENCODERS


def build_text_encoder(section: dict, vocabulary) -> TextEncoder:
    return TEXT_ENCODERS.build(section, vocabulary=vocabulary)


__all__ = ["TextEncoder", "build_text_encoder", "clear_embedding_cache"]
