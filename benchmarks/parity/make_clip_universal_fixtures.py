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

With ``--pipeline`` it writes no fixtures and measures instead the inference recipe on a whole scan (``--scan``, or
a synthetic CT): the original's preprocessing (its test transforms, restated for MONAI 1.x: RAS, 1.5 mm bilinear,
[-175, 250] → [0, 1]) against vlseg's model frame, and, on the same preprocessed volume, MONAI's
``sliding_window_inference`` (96³, batch 1, overlap 0.5, Gaussian, logits) with the original model against vlseg's
stitching with the imported one.  Its foreground crop and post-processing are left out (vlseg has neither).

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


def synthetic_ct(path: Path) -> Path:
    """A small CT-like NIfTI stored in LPS order with anisotropic voxels: air, a body, two brighter blobs."""
    import nibabel as nib

    gen = np.random.default_rng(0)
    shape, spacing = (160, 110, 54), (1.3, 1.3, 2.5)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = (grid[0] ** 2 + grid[1] ** 2 / 0.7 + grid[2] ** 2 / 1.5) < 0.8
    blob = lambda c, r: ((grid - np.array(c)[:, None, None, None]) ** 2).sum(0) < r ** 2
    hu = np.where(body, 40.0, -1000.0) + 80 * blob((0.3, 0.1, 0.0), 0.3) + 200 * blob((-0.4, -0.2, 0.2), 0.15)
    hu = (hu + gen.normal(0, 20, shape)).astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    nib.save(nib.Nifti1Image(hu, affine), path)
    return path


def their_preprocessing(scan: Path) -> torch.Tensor:
    """The original's test-time transforms up to its foreground crop, with MONAI 1.x names: ``[1, 1, X, Y, Z]``."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd

    chain = Compose([LoadImaged(keys=["image"]), EnsureChannelFirstd(keys=["image"]),
                     Orientationd(keys=["image"], axcodes="RAS"),
                     Spacingd(keys=["image"], pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
                     ScaleIntensityRanged(keys=["image"], a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True)])
    return torch.as_tensor(np.asarray(chain({"image": str(scan)})["image"]), dtype=torch.float32)[None]


def compare_pipeline(repo: Path, scan: Path | None, backbone: str, seed: int) -> dict:
    """The recipe's figures (see the module docstring) for one backbone with the fixture's weights."""
    import argparse
    import tempfile

    from monai.inferers import sliding_window_inference

    from vlseg.infer.segmenter import Segmenter
    from vlseg.io.scan import load_scan
    from vlseg.released.base import RELEASED
    from vlseg.released.clip_universal import CLASSES
    from vlseg.transforms.frame import to_model_frame

    family = {"unet": "clip-universal-unet", "swinunetr": "clip-universal-swin"}[backbone]
    with tempfile.TemporaryDirectory() as tmp:
        scan = scan or synthetic_ct(Path(tmp) / "ct.nii.gz")
        model = build(repo, backbone)
        _, net, _ = checkpoint_for(model, backbone, seed)
        original_loader(model, net)
        torch.save({"net": net}, Path(tmp) / "ckpt.pth")
        RELEASED.get(family)().convert(argparse.Namespace(checkpoint=str(Path(tmp) / "ckpt.pth"), txt_encoding=None),
                                       Path(tmp) / "model")
        seg = Segmenter.from_pretrained(Path(tmp) / "model", device="cpu")
        theirs = their_preprocessing(scan)
        ours, _ = to_model_frame(load_scan(scan), "CT", seg.config["data"]["ct_window"],
                                 seg.config["data"]["inference_spacing"], seg.config["data"]["intensity"])
        figures = {"backbone": backbone, "their_grid": list(theirs.shape[2:]), "vlseg_grid": list(ours.shape)}
        if tuple(ours.shape) == tuple(theirs.shape[2:]):
            delta = np.abs(ours - theirs[0, 0].numpy())
            figures.update(preprocess_max_abs=float(delta.max()), preprocess_mean_abs=float(delta.mean()))
        with torch.no_grad():
            logits = sliding_window_inference(theirs, (96, 96, 96), 1, model.eval(), overlap=0.5, mode="gaussian")
            ref = torch.sigmoid(logits)[0].numpy()
            stitcher, _ = seg._stitch(theirs, list(range(len(CLASSES))), seg.embed([n for n, _ in CLASSES])[None],
                                      tta=False)
        got = np.stack([stitcher.probability(k) for k in range(len(CLASSES))])
        figures.update(windows=len(stitcher.corners), probability_max_abs=float(np.abs(got - ref).max()),
                       mask_voxels=int((ref > 0.5).sum()), mask_disagreements=int(((got > 0.5) != (ref > 0.5)).sum()),
                       voxels_within_1e3_of_logit_0=int((logits.abs() < 1e-3).sum()))
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of ljwztc/CLIP-Driven-Universal-Model")
    parser.add_argument("--out", type=Path, help="fixture folder (required without --pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbones", nargs="+", default=["unet", "swinunetr"])
    parser.add_argument("--pipeline", action="store_true", help="measure the inference recipe instead (no fixtures)")
    parser.add_argument("--scan", type=Path, help="with --pipeline: a CT NIfTI (default: a synthetic one)")
    args = parser.parse_args(argv)
    if args.pipeline:
        for backbone in args.backbones:
            print(json.dumps(compare_pipeline(args.repo.resolve(), args.scan, backbone, args.seed)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    for backbone in args.backbones:
        write_backbone(args.repo.resolve(), args.out, backbone, args.seed)
    write_txt_encoding(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
