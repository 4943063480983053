"""Registries for the parts an ablation swaps: each is chosen by the ``name`` key of its config section.

A component registers itself where it is defined (``@FUSIONS.register("query_decoder")``).  Each registry knows the
module or package its components live in (its ``home``) and imports it, every module of a package included, the first
time it is asked for a name: adding a component is adding a file, with no import list to keep.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable

from vlseg.errors import VlsegError


class Registry:
    def __init__(self, kind: str, home: str | None = None):
        self.kind, self.home = kind, home
        self._items: dict[str, Callable[..., Any]] = {}
        self._loaded = False

    def _load(self) -> None:
        """Import the home module, or every module of the home package, so that their components register."""
        if self._loaded or self.home is None:
            return
        self._loaded = True
        home = importlib.import_module(self.home)
        for module in pkgutil.iter_modules(getattr(home, "__path__", [])):
            importlib.import_module(f"{self.home}.{module.name}")

    def register(self, name: str):
        def decorator(obj):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
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
        self._load()
        return sorted(self._items)


TEXT_ENCODERS = Registry("text encoder", "vlseg.models.text")
IMAGE_ENCODERS = Registry("image encoder", "vlseg.models.encoders")
FUSIONS = Registry("fusion", "vlseg.models.fusions")
LOSSES = Registry("loss", "vlseg.train.losses")
