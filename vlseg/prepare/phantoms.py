"""Procedural abdomen phantoms: a small, partially labelled, multi-dataset CT corpus.

``vlseg prepare phantoms --out data/phantoms`` writes the nnU-Net v2 raw layout plus ``manifest.jsonl``:

* ``Dataset001_PhantomLiver``   annotates liver and liver tumour
* ``Dataset002_PhantomKidney``  annotates right and left kidney
* ``Dataset003_PhantomSpleen``  annotates spleen and liver but not liver tumour (tumour voxels are written as liver)
* ``Dataset004_PhantomTest``    annotates all five classes; split "test"

The last case of each training dataset is split "val".  Every dataset keeps its cases in ``imagesTr``/``labelsTr``
(the test one too: nnU-Net wants labelled cases there; the manifest says which split a case belongs to), so each folder
passes nnU-Net v2's ``verify_dataset_integrity``.  A label file holds only its dataset's annotated classes, numbered
1, 2, ... in the order liver, liver tumour, spleen, right kidney, left kidney (nnU-Net wants consecutive values):
PhantomLiver 1 liver, 2 liver tumour; PhantomKidney 1 right, 2 left kidney; PhantomSpleen 1 liver, 2 spleen;
PhantomTest 1 liver, 2 liver tumour, 3 spleen, 4 right kidney, 5 left kidney.  "liver" is the union of liver and
liver tumour wherever tumours are annotated; everything else is 0.

Images are HU, int16 NIfTI, RAS: array axis 0 runs toward the patient's left, 1 toward anterior, 2 toward superior,
so the liver sits at low x and the spleen at high x.  The anatomy is drawn in normalised coordinates (-1..1 per axis),
so a case looks the same at any grid size; only the voxel noise depends on the grid.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from vlseg.errors import VlsegError
from vlseg.prepare.layouts.nnunet import write_description
from vlseg.prepare.manifest import Case, write_manifest
from vlseg.transforms.boxes import class_boxes
from vlseg.transforms.spatial import positive_triple

# Values in make_case's full label map (and in PhantomTest); each dataset renumbers its own classes 1, 2, ...
LABELS = {"liver": 1, "liver tumor": 2, "spleen": 3, "right kidney": 4, "left kidney": 5}
DATASETS = [  # (folder, dataset name, annotated classes, kind)
    ("Dataset001_PhantomLiver", "PhantomLiver", ["liver", "liver tumor"], "train"),
    ("Dataset002_PhantomKidney", "PhantomKidney", ["right kidney", "left kidney"], "train"),
    ("Dataset003_PhantomSpleen", "PhantomSpleen", ["spleen", "liver"], "train"),
    ("Dataset004_PhantomTest", "PhantomTest", list(LABELS), "test"),
]
MIN_SIDE = 24  # below this the kidneys are a voxel or two across

# Mean HU per tissue (each case jitters them a little).
HU = {"air": -1000.0, "fat": -100.0, "muscle": 42.0, "bone": 420.0, "cortical bone": 700.0, "csf": 10.0,
      "aorta": 160.0, "ivc": 120.0, "gas": -800.0, "bowel": 15.0,
      "liver": 60.0, "spleen": 48.0, "kidney": 30.0, "kidney cortex": 95.0}

# Labelled organs in normalised coordinates: centre (x, y, z), radii, rotation about (x, y, z) in degrees.
# x: -1 patient right .. +1 left; y: -1 posterior .. +1 anterior; z: -1 inferior .. +1 superior.
ORGANS = {
    "liver": [((-0.40, 0.02, 0.25), (0.32, 0.40, 0.40), (0.0, 0.0, -10.0)),   # right lobe
              ((-0.04, 0.27, 0.36), (0.25, 0.19, 0.24), (0.0, 0.0, 10.0))],   # left lobe, across the midline
    "spleen": [((0.53, -0.20, 0.32), (0.14, 0.24, 0.25), (0.0, 0.0, 35.0))],
    "right kidney": [((-0.33, -0.32, -0.29), (0.13, 0.16, 0.27), (8.0, 0.0, 20.0))],
    "left kidney": [((0.33, -0.32, -0.19), (0.13, 0.16, 0.27), (8.0, 0.0, -20.0))],
}


def local_values(annotated: list[str]) -> dict[str, int]:
    """The label value each annotated class is written with in its dataset: 1, 2, ... in the order of ``LABELS``."""
    return {name: i + 1 for i, name in enumerate(n for n in LABELS if n in annotated)}


def class_values(annotated: list[str]) -> dict[str, list[int]]:
    """Label values composing each annotated class.  The liver includes its tumours; a dataset that does not annotate
    tumours writes them as liver, so there the liver is its own value alone."""
    local = local_values(annotated)
    out = {name: [local[name]] for name in annotated}
    if "liver" in local and "liver tumor" in local:
        out["liver"] = [local["liver"], local["liver tumor"]]
    return out


def dataset_labels(annotated: list[str]) -> dict:
    """nnU-Net v2 ``labels`` of a dataset (background is added by ``write_description``): each annotated class, a
    list where it is a region."""
    labels = {}
    for name, values in class_values(annotated).items():
        labels[name] = values if len(values) > 1 else values[0]
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# geometry helpers

def _rotation(degrees) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _waves(axes, rng: np.random.Generator, n: int = 6, freq=(1.0, 2.5)) -> np.ndarray:
    """A smooth random field of roughly unit amplitude on the grid spanned by the 1-D ``axes``: a sum of random
    low-frequency plane waves (each one an outer product of three 1-D complex exponentials, so it is cheap)."""
    out = np.zeros([len(a) for a in axes], dtype=np.float32)
    for _ in range(n):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = direction * rng.uniform(*freq) * np.pi
        phase = rng.uniform(0, 2 * np.pi)
        ex, ey, ez = (np.exp(1j * (k[a] * axes[a] + (phase if a == 2 else 0.0))).astype(np.complex64) for a in range(3))
        out += (ex[:, None, None] * ey[None, :, None] * ez[None, None, :]).real
    return out * np.float32(np.sqrt(2.0 / n))


def _ellipsoid_distance(grid, centre, radii, degrees) -> np.ndarray:
    """Normalised distance (1 on the surface) of every voxel to a rotated ellipsoid."""
    rot = _rotation(degrees).T  # world -> organ frame
    d = [g - np.float32(c) for g, c in zip(grid, centre)]
    out = np.zeros(grid[0].shape, dtype=np.float32)
    for row, r in zip(rot, radii):
        local = np.float32(row[0]) * d[0] + np.float32(row[1]) * d[1] + np.float32(row[2]) * d[2]
        out += (local / np.float32(r)) ** 2
    return np.sqrt(out)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, n + 1))
    return labelled == (1 + int(np.argmax(sizes)))


# ---------------------------------------------------------------------------------------------------------------------
# one case

class _Frame:
    """The normalised grid one phantom is drawn on: axes in [-1, 1], a smooth random deformation of them shared by
    the whole body (shapes are not plain ellipsoids), the patient's position on the table, and its tissue HU."""

    def __init__(self, shape, rng: np.random.Generator):
        self.shape = tuple(int(n) for n in shape)
        self.axes = [((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1) for n in self.shape]
        self.base = np.meshgrid(*self.axes, indexing="ij")
        self.voxel = [2.0 / n for n in self.shape]  # one voxel in normalised units, per axis
        self.grid = [g + np.float32(0.045) * _waves(self.axes, rng, n=4, freq=(0.8, 1.8)) for g in self.base]
        self.shift = rng.uniform(-0.04, 0.04, size=3) * np.array([1.0, 1.0, 0.5])
        self.tissue = {k: v + rng.normal(0.0, 3.0) for k, v in HU.items() if k not in ("air", "gas")}
        self.xs, self.ys = self.grid[0] - self.shift[0], self.grid[1] - self.shift[1] + 0.02

    def disc(self, cx, cy, rx, ry) -> np.ndarray:
        return ((self.xs - cx) / rx) ** 2 + ((self.ys - cy) / ry) ** 2 <= 1.0


def _body(f: _Frame, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Body (rounded-rectangle cross-section: subcutaneous fat, muscle wall, intra-abdominal fat), spine, paraspinal
    muscles, aorta and IVC — unlabelled structures the model must ignore.  Returns the masks later steps avoid."""
    bx, by = 0.90 * rng.uniform(0.95, 1.03), 0.74 * rng.uniform(0.95, 1.03)
    body_r = (np.abs(f.xs / bx) ** 2.4 + np.abs(f.ys / by) ** 2.4) ** (1 / 2.4)
    body = body_r <= 1.0
    wall_in, wall_out = 0.86, 0.93
    image[body] = f.tissue["fat"]
    image[body & (body_r > wall_in) & (body_r <= wall_out)] = f.tissue["muscle"]
    vertebra = f.disc(0.0, -0.49, 0.12, 0.10)
    canal = f.disc(0.0, -0.63, 0.045, 0.04)
    posterior = f.disc(0.0, -0.70, 0.035, 0.08) | (f.disc(0.0, -0.63, 0.09, 0.065) & ~canal)
    paraspinal = (f.disc(-0.19, -0.64, 0.11, 0.08) | f.disc(0.19, -0.64, 0.11, 0.08)) & body
    image[paraspinal] = f.tissue["muscle"]
    image[vertebra] = f.tissue["bone"]
    image[vertebra & ~f.disc(0.0, -0.49, 0.095, 0.075)] = f.tissue["cortical bone"]
    image[posterior] = f.tissue["bone"]
    image[canal] = f.tissue["csf"]
    return {"body": body, "cavity": body_r <= wall_in, "spine": vertebra | posterior | canal, "paraspinal": paraspinal,
            "aorta": f.disc(0.07, -0.31, 0.05, 0.05), "ivc": f.disc(-0.11, -0.30, 0.055, 0.045)}


def _organs(f: _Frame, image, label, parts: dict, rng: np.random.Generator) -> np.ndarray:
    """Labelled organs: ellipsoid parts with jittered pose and size, bumpy surface, no overlaps, fat between
    neighbours, never on the grid's edge.  Returns the voxels they took."""
    inner = np.ones(f.shape, dtype=bool)
    for a in (2, 0, 1):
        inner &= np.abs(f.base[a]) < 1.0 - 2.5 * f.voxel[a]
    allowed = ndimage.binary_erosion(parts["cavity"], iterations=1) & ~ndimage.binary_dilation(
        parts["spine"] | parts["paraspinal"] | parts["aorta"] | parts["ivc"], iterations=1) & inner
    taken = np.zeros(f.shape, dtype=bool)
    for name, ellipsoids in ORGANS.items():
        scale = rng.uniform(0.85, 1.15)
        jitter = rng.uniform(-0.03, 0.03, size=3)
        spin = rng.uniform(-6.0, 6.0, size=3)
        bumps = _waves(f.axes, rng, n=5, freq=(1.5, 3.5))
        dist = None
        for centre, radii, degrees in ellipsoids:
            c = np.asarray(centre) + f.shift + jitter
            r = np.asarray(radii) * scale * rng.uniform(0.95, 1.05, size=3)
            d = _ellipsoid_distance(f.grid, c, r, np.asarray(degrees) + spin)
            dist = d if dist is None else np.minimum(dist, d)
        dist = dist + np.float32(0.07) * bumps
        mask = (dist <= 1.0) & allowed & ~ndimage.binary_dilation(taken, iterations=1)
        mask = ndimage.binary_opening(mask, iterations=1)
        mask = _largest_component(mask) if mask.any() else mask
        taken |= mask
        label[mask] = LABELS[name]
        if "kidney" in name:
            image[mask] = f.tissue["kidney"]
            image[mask & (dist > 0.68)] = f.tissue["kidney cortex"]  # brighter cortex around the medulla
        else:
            image[mask] = f.tissue[name]
    return taken


def _vessels_and_bowel(f: _Frame, image, parts: dict, taken, rng: np.random.Generator) -> None:
    """Vessels where the organs left room, then a few bowel loops (fluid or gas) in the free space of the lower,
    anterior abdomen."""
    for name in ("aorta", "ivc"):
        image[parts[name] & parts["body"] & ~taken] = f.tissue[name]
    free = parts["cavity"] & ~ndimage.binary_dilation(
        taken | parts["spine"] | parts["paraspinal"] | parts["aorta"] | parts["ivc"], iterations=2)
    for _ in range(int(rng.integers(3, 7))):
        c = (rng.uniform(-0.45, 0.45), rng.uniform(-0.05, 0.45), rng.uniform(-0.85, 0.05))
        r = rng.uniform(0.06, 0.11) * np.array([1.0, 1.0, rng.uniform(1.0, 2.0)])
        loop = (_ellipsoid_distance(f.grid, c, r, rng.uniform(-30, 30, size=3)) <= 1.0) & free
        gas = rng.random() < 0.4
        image[loop] = HU["gas"] + rng.normal(0, 40) if gas else f.tissue["bowel"]


def _liver_tumours(shape, image, label, rng: np.random.Generator) -> int:
    """0-3 near-spherical hypodense lesions, strictly inside the liver, apart from each other; returns how many."""
    liver = label == LABELS["liver"]
    room = liver.copy()
    n_wanted = int(rng.choice([0, 1, 2, 3], p=[0.3, 0.35, 0.2, 0.15]))
    n_tumours = 0
    vox = [np.arange(n, dtype=np.float32) for n in shape]
    for _ in range(n_wanted):
        depth = ndimage.distance_transform_edt(room)
        radius = rng.uniform(2.0, 5.0)
        axes_r = radius * rng.uniform(0.85, 1.15, size=3)
        radius_max = min(float(axes_r.max()), float(depth.max()) - 2.0)  # small livers get small tumours
        if radius_max < 2.0:
            break
        axes_r = np.minimum(axes_r, radius_max)
        candidates = np.argwhere(depth >= radius_max + 1.5)  # a voxel of liver all around the lesion
        if len(candidates) == 0:
            break
        centre = candidates[rng.integers(len(candidates))]
        d2 = sum(((v.reshape([-1 if i == a else 1 for i in range(3)]) - np.float32(centre[a])) / np.float32(axes_r[a]))
                 ** 2 for a, v in enumerate(vox))
        lesion = (d2 <= 1.0) & liver
        label[lesion] = LABELS["liver tumor"]
        image[lesion] = rng.uniform(10.0, 25.0)
        room &= ~ndimage.binary_dilation(lesion, iterations=3)
        n_tumours += 1
    return n_tumours


def make_case(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """One random abdomen → (HU image float32, full label map uint8 with all five values, number of tumours).

    The steps draw from ``rng`` in a fixed order, so a seed always gives the same phantom."""
    f = _Frame(shape, rng)
    image = np.full(f.shape, HU["air"], dtype=np.float32)
    label = np.zeros(f.shape, dtype=np.uint8)
    parts = _body(f, image, rng)
    taken = _organs(f, image, label, parts, rng)
    _vessels_and_bowel(f, image, parts, taken, rng)
    n_tumours = _liver_tumours(f.shape, image, label, rng)
    # Scanner: slight blur (partial volume), slow intensity drift, quantum noise.
    image = ndimage.gaussian_filter(image, sigma=0.65)
    image += np.float32(4.0) * _waves(f.axes, rng, n=3, freq=(0.3, 0.8))
    image += rng.normal(0.0, 12.0, size=f.shape).astype(np.float32)
    return image.astype(np.float32), label, n_tumours


def phantom_affine(shape, spacing, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine ``diag(spacing)`` whose origin puts the grid centre near the scanner isocentre, plus ``offset`` mm."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = [-(n - 1) * s / 2.0 + o for n, s, o in zip(shape, spacing, offset)]
    return aff


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, tmp)
    tmp.replace(path)


def _check_args(n_train, n_test, shape, spacing):
    if n_train < 2:
        raise VlsegError(f"n_train: need at least 2 cases per training dataset (one is held out as val), got {n_train}")
    if n_test < 1:
        raise VlsegError(f"n_test: need at least 1 test case, got {n_test}")
    if len(shape) != 3 or any(n < MIN_SIDE for n in shape):
        raise VlsegError(f"shape: need three sizes of at least {MIN_SIDE} voxels, got {list(shape)}")
    positive_triple(spacing, "spacing (voxel sizes in mm)", where="")


# ---------------------------------------------------------------------------------------------------------------------
# the corpus

def generate_corpus(out_dir, n_train: int = 12, n_test: int = 6, shape=(56, 56, 40), spacing=(3.0, 3.0, 3.0),
                    seed: int = 0, progress: bool = True) -> Path:
    """Write the four phantom datasets under ``out_dir`` and return the manifest path (``out_dir/manifest.jsonl``).

    Deterministic for a seed.  Case files of earlier runs that this run did not write are removed from the four
    dataset folders, so each folder matches its ``dataset.json``; the manifest is written last (atomically).
    """
    out_dir = Path(out_dir)
    n_train, n_test = int(n_train), int(n_test)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    _check_args(n_train, n_test, shape, spacing)

    jobs = [(d, i) for d, ds in enumerate(DATASETS) for i in range(n_test if ds[3] == "test" else n_train)]
    cases, written = [], set()
    for d, i in tqdm(jobs, desc="phantoms", unit="case", disable=not progress):
        folder, name, annotated, kind = DATASETS[d]
        rng = np.random.default_rng([seed, d, i])
        image, full, _ = make_case(shape, rng)
        affine = phantom_affine(shape, spacing, offset=np.round(rng.uniform(-20.0, 20.0, size=3), 1))

        values, local = class_values(annotated), local_values(annotated)
        label = np.zeros_like(full)
        for cls in annotated:
            label[full == LABELS[cls]] = local[cls]
        if "liver" in annotated and "liver tumor" not in annotated:
            label[full == LABELS["liver tumor"]] = local["liver"]

        case_id = f"{name}_{i:03d}"
        img_path = out_dir / folder / "imagesTr" / f"{case_id}_0000.nii.gz"
        lab_path = out_dir / folder / "labelsTr" / f"{case_id}.nii.gz"
        _save(np.clip(np.rint(image), -1024, 3071).astype(np.int16), affine, img_path)
        _save(label, affine, lab_path)
        written |= {img_path, lab_path}

        split = "test" if kind == "test" else ("val" if i == n_train - 1 else "train")
        boxes = class_boxes(label, values)  # the arrays are already RAS-canonical
        present = {cls: cls in boxes for cls in values}
        cases.append(Case(case_id=case_id, dataset=name, modality="CT", image=img_path.resolve(),
                          label=lab_path.resolve(), classes=values, present=present, shape=shape, spacing=spacing,
                          split=split, boxes=boxes, affine=affine.tolist()))

    for d, (folder, name, annotated, kind) in enumerate(DATASETS):
        pattern = re.compile(rf"{re.escape(name)}_\d+(_0000)?\.nii\.gz")
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):  # (older versions wrote the test cases in *Ts)
            for f in (out_dir / folder / sub).glob("*.nii.gz"):
                if pattern.fullmatch(f.name) and f not in written:
                    f.unlink()
        description = "vlseg procedural abdomen CT phantom" + (" (vlseg's test split)" if kind == "test" else "")
        labels = dataset_labels(annotated)
        regions = any(isinstance(v, list) for v in labels.values())  # region-based: how regions become labels
        write_description(out_dir / folder, "CT", labels, n_test if kind == "test" else n_train, name=name,
                          description=description, reference="vlseg/prepare/phantoms.py", licence="CC0",
                          **({"regions_class_order": sorted(local_values(annotated).values())} if regions else {}))
    return write_manifest(out_dir / "manifest.jsonl", cases)
