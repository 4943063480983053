"""The CLIP-Driven Universal Model (Liu et al., ICCV 2023; ljwztc/CLIP-Driven-Universal-Model) → a vlseg model:
``clip_universal_unet`` or ``swinunetr`` + ``dynamic_head`` + a closed ``embedding_bank`` of its 32 classes.

The released checkpoint (``unet.pth`` / ``swinunetr.pth``) holds the weights under ``ckpt['net']``.  What the
import handles:

* the keys carry DDP's ``module.``; the U-Net's then ``backbone.``, the Swin's not (the original's loader re-adds
  ``backbone.`` to keys containing swinViT/encoder/decoder): both forms, and ``backbone.`` anywhere, are accepted;
* the text side is a buffer: ``organ_embedding`` (32×512), CLIP ViT-B/32 embeddings of "A computerized tomography of
  a {class}", not normalised.  It becomes the model's embedding bank, labelled with the original's class names; any
  other prompt is refused with that list (the model was never asked anything else).  The optional
  ``txt_encoding.pth`` (the same vectors in float16, saved from ``cuda:0``) is read on the CPU and must agree with
  the buffer up to float16 rounding; it supplies the bank when a checkpoint lacks the buffer;
* the controller is a 1×1×1 ``Conv3d`` there, a ``Linear`` here (its weight is flattened); its 153 outputs are read
  weights-first (``fusion.param_order: weights_first``);
* the U-Net's ``ContBatchNorm3d`` normalises with batch statistics in eval mode: ``batch_stats_in_eval: true``.

Class-name quirks kept visible: the original's list says "Celiac Truck" (the embedding was made from that text;
"celiac trunk" is accepted as a synonym) and its embedding script spelt the aorta "Arota" (the label here is "aorta").
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from vlseg.config import load_config
from vlseg.errors import VlsegError
from vlseg.released.base import RELEASED, ReleasedFamily, network_state, read_torch_file, write_model_dir

# The original's 32 classes in channel order (utils/utils.py ORGAN_NAME), lower-cased, with extra wordings users type.
CLASSES: list[tuple[str, list[str]]] = [
    ("spleen", []), ("right kidney", []), ("left kidney", []), ("gall bladder", ["gallbladder"]), ("esophagus", []),
    ("liver", []), ("stomach", []), ("aorta", []), ("postcava", ["inferior vena cava", "ivc"]),
    ("portal vein and splenic vein", ["portal and splenic vein"]), ("pancreas", []), ("right adrenal gland", []),
    ("left adrenal gland", []), ("duodenum", []), ("hepatic vessel", []), ("right lung", []), ("left lung", []),
    ("colon", []), ("intestine", []), ("rectum", []), ("bladder", ["urinary bladder"]), ("prostate", []),
    ("left head of femur", ["left femoral head"]), ("right head of femur", ["right femoral head"]),
    ("celiac truck", ["celiac trunk"]), ("kidney tumor", []), ("liver tumor", []), ("pancreas tumor", []),
    ("hepatic vessel tumor", []), ("lung tumor", []), ("colon tumor", []), ("kidney cyst", []),
]
BANK = "clip_universal_classes.npz"
EMBED_DIM = 512
HEAD = {"precls_conv": "fusion.voxel_proj", "GAP": "fusion.global_proj", "controller": "fusion.controller",
        "text_to_vision": "fusion.code_proj"}
UNET_LEVELS = {"down_tr64": "down.0", "down_tr128": "down.1", "down_tr256": "down.2", "down_tr512": "down.3",
               "up_tr64": "up.0", "up_tr128": "up.1", "up_tr256": "up.2"}
SWIN_ROOTS = re.compile(r"^(swinViT|encoder\d+|decoder\d+)\.")


def bare_key(key: str) -> str:
    """A checkpoint key without DDP's ``module.`` and the ``backbone.`` of the original's wrapper."""
    return re.sub(r"^(module\.)?(backbone\.)?", "", key)


def rename_unet(key: str) -> str | None:
    """``down_tr64.ops.1.bn1.weight`` → ``image_encoder.down.0.convs.1.norm.weight``; ``up_tr256.up_conv.*`` →
    ``image_encoder.up.2.up.*``; the head as ``rename_head``."""
    key = bare_key(key)
    m = re.match(r"(down_tr\d+|up_tr\d+)\.(ops\.(\d)\.(conv1|bn1)|up_conv)\.(.+)$", key)
    if m and m.group(1) in UNET_LEVELS:
        level, _, conv, part, rest = m.groups()
        inner = "up" if part is None else f"convs.{conv}.{'conv' if part == 'conv1' else 'norm'}"
        return f"image_encoder.{UNET_LEVELS[level]}.{inner}.{rest}"
    return rename_head(key)


def rename_swin(key: str) -> str | None:
    """MONAI's SwinUNETR keys, unchanged, under ``image_encoder.net.``; the head as ``rename_head``."""
    key = bare_key(key)
    return f"image_encoder.net.{key}" if SWIN_ROOTS.match(key) else rename_head(key)


def rename_head(key: str) -> str | None:
    root, _, rest = key.partition(".")
    if root in HEAD:
        return f"{HEAD[root]}.{rest}"
    if key == "organ_embedding":
        return None  # the class embeddings: the model's embedding bank, not a network weight
    return key  # anything else: map_state reports it as having no place in the vlseg network


def read_net(path: Path) -> dict[str, torch.Tensor]:
    ckpt = read_torch_file(path)
    net = ckpt.get("net") if isinstance(ckpt, dict) else None
    if not isinstance(net, dict):
        found = ", ".join(map(str, list(ckpt)[:6])) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise VlsegError(f"{path}: no 'net' entry (found {found}); not a CLIP-Driven Universal Model checkpoint")
    return dict(net)


def class_embeddings(net: dict, checkpoint: Path, txt_encoding: Path | None) -> torch.Tensor:
    """The 32×512 class embeddings: the checkpoint's buffer, checked against ``txt_encoding.pth`` when given."""
    buffer = next((v for k, v in net.items() if bare_key(k) == "organ_embedding"), None)
    txt = read_torch_file(txt_encoding) if txt_encoding else None
    if txt is not None and (not isinstance(txt, torch.Tensor) or tuple(txt.shape) != (len(CLASSES), EMBED_DIM)):
        raise VlsegError(f"{txt_encoding}: expected a {len(CLASSES)}×{EMBED_DIM} tensor of class embeddings")
    if buffer is None and txt is None:
        raise VlsegError(f"{checkpoint}: no 'organ_embedding' (the class embeddings); give --txt-encoding")
    if buffer is None:
        return txt.float()
    if tuple(buffer.shape) != (len(CLASSES), EMBED_DIM):
        raise VlsegError(f"{checkpoint}: key 'organ_embedding' has shape {tuple(buffer.shape)}, expected "
                         f"({len(CLASSES)}, {EMBED_DIM}): the 32 classes' CLIP embeddings")
    if txt is not None and not torch.equal(buffer.half(), txt.half()):
        diff = float((buffer.float() - txt.float()).abs().max())
        raise VlsegError(f"{txt_encoding}: differs from the checkpoint's organ_embedding (max |Δ| {diff:.3g}); the "
                         f"checkpoint's are the embeddings the model was trained with")
    return buffer.float()


def prepare(net: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, the controller's 1×1×1 convolution weight flattened to a linear layer's."""
    return {k: v.flatten(1) if bare_key(k) == "controller.weight" and v.dim() == 5 else v for k, v in net.items()}


def vocabulary() -> dict:
    return {"version": 2, "classes": [{"name": n, "synonyms": [n, *extra], "modalities": ["CT"]}
                                      for n, extra in CLASSES]}


class ClipUniversal(ReleasedFamily):
    """Shared by the two backbones; a subclass names its key renaming and the other family's telltale."""

    licence = "CC BY-NC-ND 4.0 (Johns Hopkins University; non-commercial use, no derivatives, attribute)"
    origin = "https://github.com/ljwztc/CLIP-Driven-Universal-Model (weights linked from its README)"
    other_family, other_marker = "", ""

    def rename(self, key: str) -> str | None:
        raise NotImplementedError

    def add_arguments(self, parser) -> None:
        parser.add_argument("--checkpoint", required=True, help="the released checkpoint (unet.pth / swinunetr.pth)")
        parser.add_argument("--txt-encoding", help="optional: the original's pretrained_weights/txt_encoding.pth, "
                                                   "checked against the checkpoint's class embeddings")

    def convert(self, args, out: Path) -> Path:
        checkpoint = Path(args.checkpoint).expanduser()
        txt = Path(args.txt_encoding).expanduser() if getattr(args, "txt_encoding", None) else None
        net = read_net(checkpoint)
        if any(self.other_marker in k for k in net):
            raise VlsegError(f"{checkpoint}: holds the other backbone's keys ({self.other_marker}…); use vlseg "
                             f"import {self.other_family}")
        embeddings = class_embeddings(net, checkpoint, txt)
        with tempfile.TemporaryDirectory() as tmp:
            bank = write_class_bank(Path(tmp) / BANK, embeddings)
            model, identity, cfg = self.build(bank)
            state = network_state(prepare(net), model, self.rename, str(checkpoint))
            provenance = self.provenance(checkpoint=checkpoint, txt_encoding=txt)
            return write_model_dir(out, cfg, state, vocabulary(), identity, provenance, {BANK: bank})

    def build(self, bank: Path):
        """``(network, text-encoder identity, config)``: the family's config with the bank named relative to the model
        folder, and the network built from it."""
        from vlseg.models.network import build_network
        from vlseg.vocab.vocabulary import Vocabulary

        cfg = load_config(self.recipe)
        cfg["text_encoder"]["bank"] = BANK
        net, text_encoder = build_network({**cfg, "text_encoder": {**cfg["text_encoder"], "bank": str(bank)}},
                                          Vocabulary.from_dict(vocabulary(), self.name))
        return net, text_encoder.identity(), cfg


def write_class_bank(path: Path, embeddings: torch.Tensor) -> Path:
    from vlseg.models.text.bank import write_bank

    return write_bank(path, [name for name, _ in CLASSES], embeddings.float().numpy())


@RELEASED.register("clip-universal-unet")
class ClipUniversalUNetFamily(ClipUniversal):
    name = "clip-universal-unet"
    description = ("CLIP-Driven Universal Model, 3D U-Net backbone (19.1 M): 25 abdominal organs and 7 tumour/cyst "
                   "classes on CT, prompts limited to its 32 class names.")
    other_family, other_marker = "clip-universal-swin", "swinViT."

    def rename(self, key: str) -> str | None:
        return rename_unet(key)


@RELEASED.register("clip-universal-swin")
class ClipUniversalSwinFamily(ClipUniversal):
    name = "clip-universal-swin"
    description = ("CLIP-Driven Universal Model, SwinUNETR backbone (62.2 M): 25 abdominal organs and 7 tumour/cyst "
                   "classes on CT, prompts limited to its 32 class names.")
    other_family, other_marker = "clip-universal-unet", "down_tr64."

    def rename(self, key: str) -> str | None:
        return rename_swin(key)
