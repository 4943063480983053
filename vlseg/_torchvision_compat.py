"""Let torchvision's Python side import when its compiled ops cannot load.

PyPI's only torchvision wheel that matches the pinned CPU torch is built for CUDA; importing it beside CPU torch fails
while it registers meta kernels for ``torchvision::nms`` / ``torchvision::qnms``, operators its C++ library would have
defined.  open_clip, timm and (indirectly) transformers import torchvision, so the whole text side would be unusable.

We try to load torchvision's library first.  Only when that fails do we declare the two operator schemas, so that the
meta registrations succeed; torchvision's C++ kernels (nms, roi_align, ...) stay unavailable, and vlseg never calls
them.  When the library loads (GPU installs, matching CPU builds) nothing is touched.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_FALLBACK_LIB = None  # keeps the torch.library.Library alive for the life of the process


def _torchvision_extension(spec) -> Path | None:
    for location in spec.submodule_search_locations or []:
        for candidate in sorted(Path(location).glob("_C*.so")) + sorted(Path(location).glob("_C*.pyd")):
            return candidate
    return None


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``apply`` the first time torchvision is looked up, so that ``import vlseg`` does not load torch."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            apply()
        return None  # the ordinary finders locate the module


def defer() -> None:
    """``apply`` just before torchvision is first imported (``import vlseg`` stays light: no torch)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def apply() -> bool:
    """Make ``import torchvision`` safe. Returns True when the fallback schemas were declared."""
    global _FALLBACK_LIB
    if _FALLBACK_LIB is not None or "torchvision" in sys.modules:
        return _FALLBACK_LIB is not None
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return False
    import torch

    ext = _torchvision_extension(spec)
    if ext is not None:
        try:
            torch.ops.load_library(str(ext))
            return False
        except (OSError, RuntimeError):
            pass
    try:
        torch.ops.torchvision.nms  # defined already (by the library or an earlier fallback)
        return False
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _FALLBACK_LIB = lib
    return True
