"""Reference outputs of the CLIP-Driven Universal Model (ljwztc/CLIP-Driven-Universal-Model) for vlseg's parity test.

    python benchmarks/parity/make_clip_universal_fixtures.py --repo /tmp/CLIP-Driven-Universal-Model \\
        --out tests/released/fixtures/clip_universal

Runs the original ``Universal_model`` (its own code, from a checkout; nothing of it is copied into vlseg) for both
backbones at their released size, with random weights, and writes per backbone:

* ``<backbone>.json``: every key of the checkpoint the original saves (``ckpt['net']``, in the released naming, see
  ``released_key``) with its shape and dtype, the seed and a digest of the generated weights;
* ``<backbone>.npz``: the input (float16 values, exact in float32), the eval-mode logits of two whole classes and of
  every class at 4096 sampled voxels, the global image vector (``GAP``) and the 153 dynamic-head parameters per
  class (``controller``), and the integer buffers of the checkpoint (Swin's relative-position index).

Both networks are full size (the U-Net's widths are fixed in its code; the Swin's head hard-codes 48 and 768
channels), so their weights (78 MB and 250 MB) are not stored: every floating tensor is drawn from ``torch.rand``
with a generator seeded by the key (``fixture_weights``), which the test repeats and checks against the digest.
The test rebuilds ``{'net': ...}`` from the key list, imports it with ``vlseg import`` and compares logits.

Also writes ``txt_encoding.pth``: the fixture's 32×512 class embeddings in float16, saved with the storage location
``cuda:0`` as the original's ``pretrained_weights/txt_encoding.pth`` is (that file itself is not redistributable:
CC BY-NC-ND), to test that the importer reads such a file on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

NUM_CLASSES = 32
INPUT_SHAPES = {"unet": (48, 40, 32), "swinunetr": (64, 32, 32)}  # non-cubic; Swin sides divisible by 32
FULL_CLASSES = (0, 31)
SAMPLED_VOXELS = 4096


def fixture_weights(spec: dict[str, dict], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for every floating key of ``spec`` ({key: {"shape", "dtype"}}): uniform draws from a
    generator seeded by (seed, crc32(key)), scaled by the role the key's name and rank give the tensor."""
    out = {}
    for key, entry in spec.items():
        if not entry["dtype"].startswith("float"):
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        u = torch.rand(entry["shape"], generator=gen) * 2 - 1
        out[key] = _scale(key, u)
    return out


def _scale(key: str, u: torch.Tensor) -> torch.Tensor:
    if key.endswith("running_var"):
        return 0.5 + u.abs()
    if key.endswith("relative_position_bias_table"):
        return 0.1 * u
    if key.endswith("organ_embedding"):
        return 0.7 * u  # CLIP embeddings are not normalised: norms near 9
    if u.dim() == 1:
        return 1 + 0.2 * u if key.endswith("weight") else 0.1 * u
    fan_in = u[0].numel()
    return u * (3.0 / fan_in) ** 0.5


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def released_key(key: str, backbone: str) -> str:
    """The name a key of ``Universal_model.state_dict()`` has in the released checkpoints: saved from the DDP wrapper
    (``module.``), and for the Swin without ``backbone.`` (the original's loader re-adds it to keys that contain
    swinViT/encoder/decoder; a Swin checkpoint that kept it would not load there), while the U-Net's keep it."""
    if backbone == "swinunetr" and key.startswith("backbone."):
        key = key[len("backbone."):]
    return "module." + key


def original_loader(model: torch.nn.Module, net: dict) -> None:
    """The original test.py's way of loading ``ckpt['net']`` (re-stated here, then loaded strictly)."""
    store = model.state_dict()
    for key, value in net.items():
        name = ".".join(key.split(".")[1:])
        if "swinViT" in key or "encoder" in key or "decoder" in key:
            name = "backbone." + name
        store[name] = value
    model.load_state_dict(store, strict=True)


def build(repo: Path, backbone: str) -> torch.nn.Module:
    sys.path.insert(0, str(repo))
    from model.Universal_model import Universal_model

    return Universal_model(img_size=(96, 96, 96), in_channels=1, out_channels=NUM_CLASSES, backbone=backbone,
                           encoding="word_embedding")


def checkpoint_for(model: torch.nn.Module, backbone: str, seed: int) -> tuple[dict, dict, str]:
    """``(spec, net, digest)``: the key list, the released-format state dict with fixture weights, their digest."""
    spec, fixed = {}, {}
    for key, value in model.state_dict().items():
        name = released_key(key, backbone)
        spec[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        if not value.is_floating_point():
            fixed[name] = value.clone()
    weights = fixture_weights(spec, seed)
    return spec, {**weights, **fixed}, weights_digest(weights)


def run(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode logits plus the global image vector and the dynamic-head parameters, caught by forward hooks."""
    caught: dict[str, torch.Tensor] = {}
    hooks = [model.GAP.register_forward_hook(lambda m, i, o: caught.__setitem__("gap", o.flatten(1).clone())),
             model.controller.register_forward_hook(lambda m, i, o: caught.__setitem__("theta", o.flatten(1).clone()))]
    model.eval()
    with torch.no_grad():
        caught["logits"] = model(x)
    for h in hooks:
        h.remove()
    return caught


def write_backbone(repo: Path, out: Path, backbone: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = build(repo, backbone)
    spec, net, digest = checkpoint_for(model, backbone, seed)
    original_loader(model, net)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand((1, 1, *INPUT_SHAPES[backbone]), generator=gen).half()
    got = run(model, x.float())
    logits = got["logits"][0].flatten(1)  # [32, voxels]
    index = torch.randperm(logits.shape[1], generator=gen)[:SAMPLED_VOXELS].sort().values
    ints = {f"int:{k}": v.numpy() for k, v in net.items() if not v.is_floating_point() and v.dim() > 0}
    np.savez_compressed(out / f"{backbone}.npz", input=x.numpy(), full_classes=np.array(FULL_CLASSES),
                        logits_full=got["logits"][0, list(FULL_CLASSES)].numpy(), sample_index=index.numpy(),
                        logits_sampled=logits[:, index].numpy(), gap=got["gap"].numpy(),
                        theta=got["theta"].numpy(), **ints)
    meta = {"backbone": backbone, "seed": seed, "num_classes": NUM_CLASSES, "input_shape": list(x.shape),
            "weights_digest": digest, "parameters": sum(p.numel() for p in model.parameters()),
            "logit_range": [float(got["logits"].min()), float(got["logits"].max())], "keys": spec}
    (out / f"{backbone}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{backbone}: {len(spec)} keys, {meta['parameters']} parameters, logits in {meta['logit_range']}")


def write_txt_encoding(out: Path, seed: int) -> None:
    """The fixture's ``organ_embedding`` (the same for both backbones: it is drawn by key) in float16, its storage
    tagged ``cuda:0`` in the file, like the original's ``txt_encoding.pth`` (from which training copies the buffer)."""
    spec = {"module.organ_embedding": {"shape": [NUM_CLASSES, 512], "dtype": "float32"}}
    values = fixture_weights(spec, seed)["module.organ_embedding"].half()
    storage_ptr = values.untyped_storage().data_ptr()
    torch.serialization.register_package(1, lambda obj: "cuda:0" if obj.data_ptr() == storage_ptr else None,
                                         lambda obj, location: None)
    torch.save(values, out / "txt_encoding.pth")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of ljwztc/CLIP-Driven-Universal-Model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbones", nargs="+", default=["unet", "swinunetr"])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for backbone in args.backbones:
        write_backbone(args.repo.resolve(), args.out, backbone, args.seed)
    write_txt_encoding(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
