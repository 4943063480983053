"""vlseg: text-prompted 3D medical image segmentation."""

from vlseg import _torchvision_compat

_torchvision_compat.defer()  # applied when torchvision is first imported

from vlseg.errors import VlsegError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Segmenter", "VlsegError", "__version__"]


def __getattr__(name):
    # Segmenter pulls in torch, MONAI and the text towers: load it on first use, keep `import vlseg` light.
    if name == "Segmenter":
        from vlseg.infer.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'vlseg' has no attribute {name!r}")
