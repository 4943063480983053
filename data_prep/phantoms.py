"""Procedural abdomen phantoms: a partially labelled multi-dataset corpus for the vertical slice and the tests.

``python -m data_prep.phantoms --out data/phantoms`` writes the nnU-Net v2 raw layout plus ``manifest.jsonl``:

* Dataset001_PhantomLiver   annotates liver and liver tumour
* Dataset002_PhantomKidney  annotates right and left kidney
* Dataset003_PhantomSpleen  annotates spleen and liver, but not liver tumour (tumour voxels are drawn as liver)
* Dataset004_PhantomTest    annotates everything; held out (split "test")

One case per training dataset is split "val".  Volumes are CT-like (HU) in RAS orientation: array axis 0 runs toward
the patient's left, 1 toward anterior, 2 toward superior, so the liver sits at low x and the spleen at high x.
Label values: 1 liver, 2 liver tumour, 3 spleen, 4 right kidney, 5 left kidney.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from vlseg.data.manifest import Case, write_manifest

LABELS = {"liver": 1, "liver tumor": 2, "spleen": 3, "right kidney": 4, "left kidney": 5}
DATASETS = [  # (folder, name, annotated classes, split kind)
    ("Dataset001_PhantomLiver", "PhantomLiver", ["liver", "liver tumor"], "train"),
    ("Dataset002_PhantomKidney", "PhantomKidney", ["right kidney", "left kidney"], "train"),
    ("Dataset003_PhantomSpleen", "PhantomSpleen", ["spleen", "liver"], "train"),
    ("Dataset004_PhantomTest", "PhantomTest", list(LABELS), "test"),
]


def class_values(annotated: list[str]) -> dict[str, list[int]]:
    """Label values composing each annotated class.  The liver includes its tumours; a dataset that does not
    annotate tumours draws them as liver, so there its liver is value 1 alone."""
    out = {}
    for name in annotated:
        if name == "liver":
            out[name] = [1, 2] if "liver tumor" in annotated else [1]
        else:
            out[name] = [LABELS[name]]
    return out


def _blob(grid, centre, radii, rng, wobble=0.12):
    """Smooth ellipsoid-like mask: normalised ellipsoid distance perturbed by a random low-frequency field."""
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    freq = rng.uniform(1.5, 3.5, size=3)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    field = np.sin(freq[0] * grid[0] * np.pi + phase[0]) * np.sin(freq[1] * grid[1] * np.pi + phase[1]) \
        + 0.5 * np.sin(freq[2] * grid[2] * np.pi + phase[2])
    return np.sqrt(d2) + wobble * field / 1.5 <= 1.0, np.sqrt(d2)


def make_case(shape, spacing, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """→ (HU image float32, full label uint8) for one random abdomen."""
    axes = [(np.arange(n) + 0.5) / n * 2 - 1 for n in shape]
    grid = np.meshgrid(*axes, indexing="ij")
    x, y, z = grid
    shift = rng.uniform(-0.05, 0.05, size=3)
    s = rng.uniform(0.88, 1.12)
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    body_r = ((x - shift[0]) / 0.9) ** 2 + ((y - shift[1]) / 0.72) ** 2
    body = body_r <= 1.0
    image[body] = -90.0
    image[body & (body_r > 0.78)] = 45.0  # muscle wall
    spine = ((x - shift[0]) ** 2 + (y - shift[1] + 0.5) ** 2) <= 0.11 ** 2
    image[spine] = 420.0

    organs = [  # name, centre, radii, HU
        ("liver", (-0.38, 0.08, 0.25), (0.33, 0.38, 0.38), 62.0),
        ("spleen", (0.55, -0.2, 0.3), (0.14, 0.19, 0.22), 46.0),
        ("right kidney", (-0.3, -0.38, -0.22), (0.11, 0.13, 0.22), 30.0),
        ("left kidney", (0.3, -0.38, -0.17), (0.11, 0.13, 0.22), 30.0),
    ]
    taken = spine.copy()
    for name, centre, radii, hu in organs:
        c = [ci + si + rng.uniform(-0.03, 0.03) for ci, si in zip(centre, shift)]
        r = [ri * s * rng.uniform(0.92, 1.08) for ri in radii]
        mask, dist = _blob(grid, c, r, rng)
        mask &= body & ~taken
        mask = ndimage.binary_opening(mask, iterations=1)
        taken |= ndimage.binary_dilation(mask, iterations=1)
        image[mask] = hu + rng.normal(0, 3)
        if "kidney" in name:
            image[mask & (dist > 0.7)] = 150.0  # enhancing cortex
        label[mask] = LABELS[name]

    liver = label == LABELS["liver"]
    inner = ndimage.distance_transform_edt(liver)
    n_tumours = rng.choice([0, 1, 2, 3], p=[0.3, 0.35, 0.2, 0.15])
    for _ in range(n_tumours):
        radius = rng.uniform(2.0, 5.0)
        candidates = np.argwhere(inner > radius + 1.5)
        if len(candidates) == 0:
            break
        centre = candidates[rng.integers(len(candidates))]
        vox = [np.arange(n) for n in shape]
        d2 = sum(((v.reshape([-1 if i == a else 1 for i in range(3)]) - centre[a]) * 1.0) ** 2
                 for a, v in enumerate(vox))
        lesion = (np.sqrt(d2) <= radius * rng.uniform(0.85, 1.15)) & liver
        image[lesion] = rng.uniform(10.0, 25.0)
        label[lesion] = LABELS["liver tumor"]

    image = ndimage.gaussian_filter(image, sigma=0.6) + rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    return image.astype(np.float32), label


def _affine(shape, spacing) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-n * s / 2.0 for n, s in zip(shape, spacing)]
    return aff


def generate_corpus(out_dir, n_train: int = 12, n_test: int = 6, shape=(56, 56, 40), spacing=(3.0, 3.0, 3.0),
                    seed: int = 0, progress: bool = True) -> Path:
    """Write the corpus; returns the manifest path.  Deterministic for a seed."""
    out_dir = Path(out_dir)
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    affine = _affine(shape, spacing)
    jobs = [(ds, i) for ds in DATASETS for i in range(n_test if ds[3] == "test" else n_train)]
    cases = []
    for (folder, name, annotated, kind), i in tqdm(jobs, desc="phantoms", disable=not progress):
        rng = np.random.default_rng([seed, DATASETS.index((folder, name, annotated, kind)), i])
        image, full = make_case(shape, spacing, rng)
        values = class_values(annotated)
        label = np.zeros_like(full)
        for cls in annotated:
            label[full == LABELS[cls]] = LABELS[cls]
        if "liver" in annotated and "liver tumor" not in annotated:
            label[full == LABELS["liver tumor"]] = LABELS["liver"]
        sub = ("imagesTs", "labelsTs") if kind == "test" else ("imagesTr", "labelsTr")
        case_id = f"{name}_{i:03d}"
        img_path = out_dir / folder / sub[0] / f"{case_id}_0000.nii.gz"
        lab_path = out_dir / folder / sub[1] / f"{case_id}.nii.gz"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        lab_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.rint(image).astype(np.int16), affine), img_path)
        nib.save(nib.Nifti1Image(label, affine), lab_path)
        split = "test" if kind == "test" else ("val" if i == n_train - 1 else "train")
        present = {cls: bool(np.isin(label, v).any()) for cls, v in values.items()}
        cases.append(Case(case_id, name, "CT", img_path, lab_path, values, present, shape, spacing, split))
    for folder, name, annotated, kind in DATASETS:
        labels = {"background": 0}
        labels.update({cls: (v if len(v) > 1 else v[0]) for cls, v in class_values(annotated).items()})
        meta = {"name": name, "channel_names": {"0": "CT"}, "labels": labels,
                "numTraining": 0 if kind == "test" else n_train, "file_ending": ".nii.gz",
                "description": "vlseg procedural abdomen phantom"}
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        (out_dir / folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return write_manifest(out_dir / "manifest.jsonl", cases)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.phantoms", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/phantoms")
    parser.add_argument("--n-train", type=int, default=12, help="cases per training dataset (one becomes val)")
    parser.add_argument("--n-test", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[56, 56, 40])
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = generate_corpus(args.out, args.n_train, args.n_test, args.shape, args.spacing, args.seed)
    print(f"manifest: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
