"""Prompt lists as users give them: validated up front (before any model is loaded) and named for output files."""

from __future__ import annotations

import re

from vlseg.errors import VlsegError


def validate_prompts(prompts) -> list[str]:
    """Strip, drop exact duplicates, refuse an empty list or a blank prompt."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts:
        raise VlsegError("no prompt given: pass at least one, e.g. -p 'liver'")
    out = []
    for i, p in enumerate(prompts, 1):
        if not isinstance(p, str) or not p.strip():
            raise VlsegError(f"prompt {i} is blank: give a structure name such as 'liver tumor'")
        if p.strip() not in out:
            out.append(p.strip())
    return out


def slug(text: str) -> str:
    """File-name form of a prompt: ``"Liver tumor"`` → ``liver_tumor``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "prompt"
