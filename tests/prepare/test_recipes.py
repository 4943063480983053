"""Dataset recipes: each one's published labels checked against the dataset's own documentation (typed below), its
targets against the vocabulary, and a tiny stand-in laid out like the dataset converted through the CLI."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from tests.prepare.recipe_standins import image_volume, label_volume, save, write_standin
from vlseg.cli.prepare import main as prepare_main
from vlseg.errors import VlsegError
from vlseg.prepare.convert import convert
from vlseg.prepare.manifest import read_manifest
from vlseg.prepare.recipes import list_recipes, load_recipe
from vlseg.vocab.vocabulary import Vocabulary


def _numbered(names: str) -> dict[int, str]:
    return {i + 1: name for i, name in enumerate(names.split())}


_TOTAL = ("spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right "
          "adrenal_gland_left lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right "
          "lung_lower_lobe_right "
          "esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left "
          "kidney_cyst_right sacrum vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 "
          "vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5 "
          "vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4 "
          "vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk "
          "subclavian_artery_right subclavian_artery_left common_carotid_artery_right common_carotid_artery_left "
          "brachiocephalic_vein_left brachiocephalic_vein_right atrial_appendage_left superior_vena_cava "
          "inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right iliac_vena_left "
          "iliac_vena_right humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right "
          "femur_left femur_right hip_left hip_right spinal_cord gluteus_maximus_left gluteus_maximus_right "
          "gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right autochthon_left "
          "autochthon_right iliopsoas_left iliopsoas_right brain skull "
          + " ".join(f"rib_left_{i}" for i in range(1, 13)) + " " + " ".join(f"rib_right_{i}" for i in range(1, 13))
          + " sternum costal_cartilages")
_TOTAL_MR = ("spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right "
             "adrenal_gland_left lung_left lung_right esophagus small_bowel duodenum colon urinary_bladder prostate "
             "sacrum vertebrae "
             "intervertebral_discs spinal_cord heart aorta inferior_vena_cava portal_vein_and_splenic_vein "
             "iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right "
             "scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right hip_left hip_right "
             "gluteus_maximus_left gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left "
             "gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain")
_AMOS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gall bladder", 5: "esophagus", 6: "liver",
         7: "stomach", 8: "arota", 9: "postcava", 10: "pancreas", 11: "right adrenal gland", 12: "left adrenal gland",
         13: "duodenum", 14: "bladder", 15: "prostate/uterus"}

# The label lists as each dataset publishes them (value → name), typed from its own documentation.
PUBLISHED = {
    # AMOS22 dataset.json in amos22.zip, https://zenodo.org/records/7262581 (its spelling: "arota", "postcava")
    "AMOS22": _AMOS,
    "AMOS22-MR": _AMOS,
    # https://www.synapse.org/#!Synapse:syn3193805/wiki/217789 (BTCV abdomen, 13 organs)
    "BTCV": {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
             7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal vein and splenic vein", 11: "pancreas",
             12: "right adrenal gland", 13: "left adrenal gland"},
    # https://flare22.grand-challenge.org/Dataset/
    "FLARE22": {1: "liver", 2: "right kidney", 3: "spleen", 4: "pancreas", 5: "aorta", 6: "inferior vena cava",
                7: "right adrenal gland", 8: "left adrenal gland", 9: "gallbladder", 10: "esophagus", 11: "stomach",
                12: "duodenum", 13: "left kidney"},
    # https://github.com/HiLab-git/WORD (README, label table)
    "WORD": {1: "liver", 2: "spleen", 3: "left kidney", 4: "right kidney", 5: "stomach", 6: "gallbladder",
             7: "esophagus", 8: "pancreas", 9: "duodenum", 10: "colon", 11: "intestine", 12: "adrenal",
             13: "rectum", 14: "bladder", 15: "head of femur left", 16: "head of femur right"},
    # https://github.com/JunMa11/AbdomenCT-1K
    "AbdomenCT-1K": {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"},
    # https://github.com/neheller/kits23 (README: 1 kidney, 2 tumor, 3 cyst)
    "KiTS23": {1: "kidney", 2: "tumor", 3: "cyst"},
    # https://github.com/neheller/kits19
    "KiTS19": {1: "kidney", 2: "tumor"},
    # https://competitions.codalab.org/competitions/17094 (LiTS: 0 background, 1 liver, 2 tumor)
    "LiTS": {1: "liver", 2: "tumor"},
    # https://www.cancerimagingarchive.net/collection/ct-org/ (README)
    "CT-ORG": {1: "liver", 2: "bladder", 3: "lungs", 4: "kidneys", 5: "bone", 6: "brain"},
    # https://www.cancerimagingarchive.net/collection/pancreas-ct/
    "Pancreas-CT": {1: "pancreas"},
    # https://competitions.codalab.org/competitions/21145 (SegTHOR)
    "SegTHOR": {1: "esophagus", 2: "heart", 3: "trachea", 4: "aorta"},
    # http://medicaldecathlon.com/ : each task's dataset.json
    "MSD-Task01_BrainTumour": {1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"},
    "MSD-Task02_Heart": {1: "left atrium"},
    "MSD-Task03_Liver": {1: "liver", 2: "cancer"},
    "MSD-Task04_Hippocampus": {1: "Anterior", 2: "Posterior"},
    "MSD-Task05_Prostate": {1: "PZ", 2: "TZ"},
    "MSD-Task06_Lung": {1: "cancer"},
    "MSD-Task07_Pancreas": {1: "pancreas", 2: "cancer"},
    "MSD-Task08_HepaticVessel": {1: "Vessel", 2: "Tumour"},
    "MSD-Task09_Spleen": {1: "spleen"},
    "MSD-Task10_Colon": {1: "colon cancer primaries"},
    # BraTS 2021 (Baid et al. 2021, arXiv:2107.02314): NCR 1, ED 2, ET 4
    "BraTS2021": {1: "necrotic tumor core (NCR)", 2: "peritumoral edematous/invaded tissue (ED)",
                  4: "GD-enhancing tumor (ET)"},
    # BraTS 2023 GLI (https://www.synapse.org/#!Synapse:syn51156910): NETC 1, SNFH 2, ET 3
    "BraTS2023-GLI": {1: "non-enhancing tumor core (NETC)",
                      2: "surrounding non-enhancing FLAIR hyperintensity (SNFH)", 3: "enhancing tissue (ET)"},
    # https://www.creatis.insa-lyon.fr/Challenge/acdc/databases.html: 1 RV, 2 MYO, 3 LV
    "ACDC": {1: "right ventricle cavity (RV)", 2: "myocardium (MYO)", 3: "left ventricle cavity (LV)"},
    # https://github.com/anjany/verse: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 28 T13 (26, 27 reserved, not labelled)
    "VerSe": {**{i: f"C{i}" for i in range(1, 8)}, **{i + 7: f"T{i}" for i in range(1, 13)},
              **{i + 19: f"L{i}" for i in range(1, 7)}, 28: "T13"},
    # TotalSegmentator class_map["total"] / ["total_mr"] (totalsegmentator/map_to_binary.py, v2.18.0)
    "TotalSegmentator": _numbered(_TOTAL),
    "TotalSegmentator-MRI": _numbered(_TOTAL_MR),
    # https://zenodo.org/records/7442914 (HaN-Seg: 30 OAR files per case, in this order)
    "HaN-Seg": _numbered("A_Carotid_L A_Carotid_R Arytenoid Bone_Mandible Brainstem BuccalMucosa Cavity_Oral "
                         "Cochlea_L Cochlea_R Cricopharyngeus Esophagus_S Eye_AL Eye_AR Eye_PL Eye_PR Glnd_Lacrimal_L "
                         "Glnd_Lacrimal_R Glnd_Submand_L Glnd_Submand_R Glnd_Thyroid Glottis Larynx_SG Lips "
                         "OpticChiasm OpticNrv_L OpticNrv_R Parotid_L Parotid_R Pituitary SpinalCord"),
    # https://www.imagenglab.com/newsite/pddca/ (9 structure files per case)
    "PDDCA": _numbered("BrainStem Chiasm Mandible OpticNerve_L OpticNerve_R Parotid_L Parotid_R Submandibular_L "
                       "Submandibular_R"),
}
FORMATS = {"SAT-DS", "CVPR-BiomedSegFM"}  # name their classes in their files; tested with their layouts
RECIPES = sorted(r["recipe"] for r in list_recipes())
# Stand-in case names where the recipe cares; (written, converted).
CASES = {"AMOS22": (["amos_0001", "amos_0507"], ["amos_0001"]),
         "AMOS22-MR": (["amos_0001", "amos_0507"], ["amos_0507"])}


def test_at_least_25_recipes_each_with_its_published_labels():
    assert len(RECIPES) >= 25
    assert set(RECIPES) - FORMATS == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_labels_are_the_datasets_own(name):
    spec = load_recipe(name)
    assert {int(v): str(n) for v, n in spec["published_labels"].items()} == PUBLISHED[name]
    assert spec["recipe"] == name and spec["url"].startswith("http") and spec["licence"] and spec["folder"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_published_label_is_mapped_to_a_known_class_or_left_out_with_a_reason(name):
    spec, vocabulary = load_recipe(name), Vocabulary.load()
    labels, unmapped = spec["labels"], spec.get("unmapped") or {}
    for value, published in spec["published_labels"].items():
        assert (published in labels) != (published in unmapped), f"{name}: {published!r} mapped xor unmapped"
        assert published not in unmapped or len(str(unmapped[published])) > 10  # a reason, not a word
    unknown = sorted({t for t in labels.values() if vocabulary.resolve(t) != t})
    assert not unknown, f"{name}: targets the vocabulary does not know: {unknown}"


def _values_of(spec: dict) -> dict[str, int]:
    """Local label → the value it has in the converted label maps (mask folders: merged in the labels' order)."""
    if spec["layout"] == "mask_folders":
        return {str(k): i + 1 for i, k in enumerate(spec["labels"])}
    return {str(n): int(v) for v, n in spec["published_labels"].items()}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_stand_in_laid_out_like_the_dataset_converts(name, tmp_path, capsys):
    spec = load_recipe(name)
    written, converted = CASES.get(name, (["0001", "0002"] if spec["layout"] != "mask_folders" else ["s01"],) * 2)
    source = write_standin(spec, tmp_path / "data", written)
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    code = prepare_main(["--recipe", name.lower(), "--source", str(source), "--manifest", str(manifest),
                         "--val-fraction", "0"])
    assert code == 0, capsys.readouterr().err
    cases = read_manifest(manifest)
    assert sorted(c.case_id for c in cases) == sorted(f"{spec['dataset']}_{c}" for c in converted)
    values = _values_of(spec)
    for case in cases:
        assert case.modality == spec["modality"] and case.split == "train"
        for local, canonical in spec["labels"].items():
            assert values[str(local)] in case.classes[canonical] and case.present[canonical], (local, canonical)
        for local in spec.get("unmapped") or {}:
            assert all(values[str(local)] not in v for v in case.classes.values())
        label = np.asarray(nib.load(case.label).dataobj)
        assert set(np.unique(label).tolist()) == {0, *values.values()}  # every painted label survived


@pytest.mark.parametrize("name, canonical, values", [
    ("KiTS23", "kidney", [1, 2, 3]),  # the kidney label is parenchyma only; tumour and cyst lie in the kidney
    ("KiTS23", "kidney tumor", [2]),
    ("BraTS2021", "brain tumor", [1, 2, 4]),
    ("BraTS2021", "tumor core", [1, 4]),
    ("BraTS2023-GLI", "brain tumor", [1, 2, 3]),
    ("MSD-Task08_HepaticVessel", "liver tumor", [2]),
    ("MSD-Task01_BrainTumour", "brain tumor", [1, 2, 3]),
    ("MSD-Task01_BrainTumour", "peritumoral edema", [1]),
    ("VerSe", "lumbar spine", [20, 21, 22, 23, 24, 25]),
])
def test_classes_close_over_the_hierarchy(name, canonical, values):
    from vlseg.prepare.convert import class_values

    spec = load_recipe(name)
    local = {str(n): [int(v)] for v, n in spec["published_labels"].items()}
    assert class_values(local, spec["labels"], Vocabulary.load(), name).get(canonical) == values


def test_unknown_recipe_is_one_line_naming_close_matches(capsys):
    with pytest.raises(VlsegError, match=r"unknown recipe 'amos'.*did you mean AMOS22"):
        load_recipe("amos")
    assert load_recipe("kits23")["recipe"] == "KiTS23"  # names match without regard to case
    assert prepare_main(["--recipe", "BTVC", "--source", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown recipe 'BTVC'") and "BTCV" in err and "\n" not in err
    with pytest.raises(SystemExit):  # --recipe and --map exclude each other
        prepare_main(["convert", "--recipe", "BTCV", "--map", "m.yaml", "--source", "x"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_recipes_are_listed(capsys):
    assert prepare_main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 26 and lines[0].split() == ["recipe", "modality", "classes", "title"]
    assert any(re.match(r"AMOS22\s+CT\s+14\s+AMOS 2022 ", line) for line in lines)
    assert prepare_main(["recipes", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"]: r["classes"] for r in rows}["TotalSegmentator"] == 117 and len(rows) == len(RECIPES)


def _channel_task(tmp_path, channels):
    spec = {"dataset": "Brain", "published_labels": {1: "edema"}, "channel": 2}
    task = tmp_path / "task"
    for case, n in [("good", channels), ("flat", None)]:
        save(task / "imagesTr" / f"{case}.nii.gz", image_volume(n))
        save(task / "labelsTr" / f"{case}.nii.gz", label_volume([1]))
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("good", "flat")]
    (task / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "edema"},
                                                   "training": training}))
    mapping = tmp_path / "map.yaml"
    mapping.write_text(json.dumps({**spec, "modality": "MR", "labels": {"edema": "brain"}}))
    return task, mapping


def test_one_channel_of_4d_images_is_written_as_a_3d_image(tmp_path):
    task, mapping = _channel_task(tmp_path, channels=4)
    manifest = tmp_path / "corpus" / "m.jsonl"
    cases, errors, _ = convert(task, mapping, manifest, val_fraction=0, progress=False)
    assert [c.case_id for c in cases] == ["Brain_good"]
    assert errors == [f"{task / 'imagesTr' / 'flat.nii.gz'}: not a multi-channel image (shape 10x10x10; channels "
                      f"along a 4th axis expected)"]
    image = read_manifest(manifest)[0].image
    assert image == (tmp_path / "corpus" / "images" / "Brain" / "good_0002.nii.gz").resolve()
    source = nib.load(task / "imagesTr" / "good.nii.gz")
    written = nib.load(image)
    assert written.shape == (10, 10, 10) and np.allclose(written.affine, source.affine)
    assert np.allclose(np.asarray(written.dataobj), np.asarray(source.dataobj)[..., 2])
    task3, mapping3 = _channel_task(tmp_path / "two", channels=2)
    _, errors, _ = convert(task3, mapping3, manifest, val_fraction=0, progress=False)
    assert any("good.nii.gz: has 2 channels; channel 2 does not exist" in e for e in errors), errors


def _pattern_map(tmp_path, name, **keys):
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"dataset": "P", "modality": "CT", "layout": "pattern", "labels": {"liver": "liver"},
                                "published_labels": {1: "liver"}, **keys}))
    return path


def test_pattern_layout_errors(tmp_path):
    source = tmp_path / "src"
    for case in ("a", "b"):
        save(source / case / f"{case}_seg.nii.gz", label_volume([1]))
    save(source / "a" / "a_ct.nii.gz", image_volume())
    mapping = _pattern_map(tmp_path, "seg", label="{case}/{case}_seg.nii.gz", image="{case}/{case}_ct.nii.gz")
    cases, errors, _ = convert(source, mapping, tmp_path / "m.jsonl", val_fraction=0, progress=False)
    assert [c.case_id for c in cases] == ["P_a"]
    assert errors == [f"{source / 'b' / 'b_ct.nii.gz'}: file not found"]  # the expected image, named
    report = json.loads((tmp_path / "convert_report_P.json").read_text())
    assert report["errors"] == [{"case": "P_b", "file": str(source / "b" / "b_ct.nii.gz"), "problem": "file not found"}]
    nothing = _pattern_map(tmp_path, "nothing", label="{case}/{case}_label.nii.gz", image="{case}/{case}_ct.nii.gz")
    with pytest.raises(VlsegError, match=r"src: no file matches the label pattern '\{case\}/\{case\}_label.nii.gz'"):
        convert(source, nothing, tmp_path / "m.jsonl", progress=False)
    stray = _pattern_map(tmp_path, "stray", label="{case}/{case}_seg.nii.gz", image="{case}/{site}.nii.gz")
    with pytest.raises(VlsegError, match=r"uses \{site\}, which the label pattern"):
        convert(source, stray, tmp_path / "m.jsonl", progress=False)
    save(source / "b" / "c_seg.nii.gz", label_volume([1]))  # {case} twice: b/c_seg is not a case
    save(source / "b" / "b_ct.nii.gz", image_volume())
    cases, errors, _ = convert(source, mapping, tmp_path / "m.jsonl", val_fraction=0, progress=False)
    assert [c.case_id for c in cases] == ["P_a", "P_b"] and not errors


def test_map_keys_are_replaced_from_the_command_line(tmp_path, capsys):
    """``image=...`` after the options swaps the BraTS sequence a recipe reads, without a copy of the recipe; a word
    that is not key=value is one error line."""
    spec = load_recipe("BraTS2021")
    source = write_standin(spec, tmp_path / "data", ["BraTS2021_00000"])
    for case_dir in source.iterdir():  # a FLAIR beside the t1ce the recipe reads, with other voxels
        flair = case_dir / f"{case_dir.name}_flair.nii.gz"
        nib.save(nib.Nifti1Image(image_volume() + 5000, np.eye(4)), flair)
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    args = ["--recipe", "BraTS2021", "--source", str(source), "--manifest", str(manifest), "--val-fraction", "0"]
    assert prepare_main([*args, "image={case}/{case}_flair.nii.gz"]) == 0, capsys.readouterr().err
    (case,) = read_manifest(manifest)
    assert case.image.name == "BraTS2021_00000_flair.nii.gz"
    assert prepare_main(args) == 0
    (case,) = read_manifest(manifest)
    assert case.image.name != "BraTS2021_00000_flair.nii.gz"
    capsys.readouterr()
    assert prepare_main([*args, "image"]) == 2
    assert "expected key=value" in capsys.readouterr().err
