"""Registries for the parts an ablation swaps: each is chosen by the ``name`` key of its config section.

A component registers itself where it is defined (``@FUSIONS.register("query_decoder")``).  Each registry knows the
module or package its components live in (its ``home``) and imports it, every module of a package included, the first
time it is asked for a name: adding a component is adding a file, with no import list to keep.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from typing import Any, Callable

from vlseg.errors import VlsegError


class Registry:
    """``supplied``: constructor arguments the code passes when it builds a component (the text embedding width a
    fusion gets from the text encoder, ...); they are not settings of the config section."""

    def __init__(self, kind: str, home: str | None = None, supplied: tuple[str, ...] = ()):
        self.kind, self.home, self.supplied = kind, home, tuple(supplied)
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

    def defaults(self, name: str) -> dict:
        """The settings of component ``name`` that have a default, in signature order: its constructor's defaults,
        the one place they are written (tuples as lists, as a YAML config holds them)."""
        skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        params = inspect.signature(self.get(name)).parameters.values()
        return {p.name: _as_config_value(p.default) for p in params
                if p.default is not p.empty and p.kind not in skip and p.name not in self.supplied}

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def unregister(self, name: str) -> None:
        """Forget a component (a test's own, once the test is done with it)."""
        self._items.pop(name, None)


def _as_config_value(value):
    if isinstance(value, (list, tuple)):
        return [_as_config_value(v) for v in value]
    return copy.deepcopy(value)


TEXT_ENCODERS = Registry("text encoder", "vlseg.models.text", supplied=("vocabulary",))
IMAGE_ENCODERS = Registry("image encoder", "vlseg.models.encoders")
FUSIONS = Registry("fusion", "vlseg.models.fusions",
                   supplied=("text_dim", "feature_channels", "embed_dim", "strides"))
LOSSES = Registry("loss", "vlseg.train.losses")
METRICS = Registry("metric", "vlseg.evaluate.metrics")
SCAN_READERS = Registry("scan format", "vlseg.io")
DATASET_LAYOUTS = Registry("dataset layout", "vlseg.prepare.layouts")
