"""Registries for the parts an ablation swaps: each is chosen by the ``name`` key of its config section."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from vlseg.errors import VlsegError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str):
        def decorator(obj):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise VlsegError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def build(self, section: dict, **extra) -> Any:
        """Build from a config section: ``{"name": ..., **constructor kwargs}``."""
        kwargs = {k: v for k, v in section.items() if k != "name"}
        factory = self.get(section["name"])
        try:
            inspect.signature(factory).bind(**kwargs, **extra)
        except TypeError as exc:  # e.g. a setting of another component left in the section
            raise VlsegError(f"{self.kind} {section['name']!r}: {exc}") from None
        return factory(**kwargs, **extra)

    def names(self) -> list[str]:
        return sorted(self._items)


TEXT_ENCODERS = Registry("text encoder")
IMAGE_ENCODERS = Registry("image encoder")
FUSIONS = Registry("fusion")
LOSSES = Registry("loss")
