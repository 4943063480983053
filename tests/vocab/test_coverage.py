"""The bundled vocabulary covers the field: TotalSegmentator v2, the benchmark label lists, SAT's terminology, with
the hierarchy the converters close over; `vlseg classes --search` finds classes fast."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlseg.prepare.convert import class_values, load_map
from vlseg.vocab.vocabulary import Vocabulary, normalize_text

REPO = Path(__file__).resolve().parents[2]
MAPS = REPO / "vlseg" / "prepare" / "sample_maps"
SIDES = ("left", "right")

# TotalSegmentator v2.x class_map["total"] (117 structures) and class_map["total_mr"] (50), as published.
TS_TOTAL = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
    "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right lung_lower_lobe_right "
    "esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left "
    "kidney_cyst_right sacrum vertebrae_S1 " + " ".join(f"vertebrae_L{i}" for i in range(5, 0, -1)) + " "
    + " ".join(f"vertebrae_T{i}" for i in range(12, 0, -1)) + " " + " ".join(f"vertebrae_C{i}" for i in range(7, 0, -1))
    + " heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right subclavian_artery_left "
    "common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left brachiocephalic_vein_right "
    "atrial_appendage_left superior_vena_cava inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left "
    "iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right scapula_left scapula_right "
    "clavicula_left clavicula_right femur_left femur_right hip_left hip_right spinal_cord gluteus_maximus_left "
    "gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right "
    "autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain skull "
    + " ".join(f"rib_{s}_{i}" for s in SIDES for i in range(1, 13)) + " sternum costal_cartilages").split()
TS_TOTAL_MR = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
    "lung_left lung_right esophagus small_bowel duodenum colon urinary_bladder prostate sacrum vertebrae "
    "intervertebral_discs spinal_cord heart aorta inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left "
    "iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right scapula_left scapula_right "
    "clavicula_left clavicula_right femur_left femur_right hip_left hip_right gluteus_maximus_left "
    "gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right "
    "autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain").split()


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load()


def test_the_lists_typed_here_are_the_published_ones():
    assert len(TS_TOTAL) == len(set(TS_TOTAL)) == 117 and len(TS_TOTAL_MR) == len(set(TS_TOTAL_MR)) == 50


def test_size_and_integrity(vocab):
    assert len(vocab) >= 300
    owners: dict[str, set] = {}
    for name in vocab.names:
        assert vocab.resolve(name) == name  # a class name is never another class's wording
        assert vocab.modalities[name] and set(vocab.modalities[name]) <= {"CT", "MR"}
        assert 1 <= len(vocab.heldout[name]) <= 3, name
        for text in (name, *vocab.synonyms[name], *vocab.heldout[name]):
            owners.setdefault(normalize_text(text), set()).add(name)
    assert not {t: o for t, o in owners.items() if len(o) > 1}  # no wording names two classes


def test_hierarchy_has_no_cycle_and_parents_are_indexed(vocab):
    def below(name, seen=()):
        assert name not in seen, f"cycle through {name!r}"
        for child in vocab.children(name):
            below(child, (*seen, name))

    for name in vocab.names:
        below(name)
        brute = [n for n in vocab.names if name in vocab.includes[n] or name in vocab.union_of[n]]
        assert vocab.parents(name) == brute


@pytest.mark.parametrize("table, task", [(TS_TOTAL, "totalseg_total.yaml"), (TS_TOTAL_MR, "totalseg_total_mr.yaml")])
def test_every_totalsegmentator_structure_has_a_class(vocab, table, task):
    labels = load_map(MAPS / task)["labels"]
    assert set(labels) == set(table)
    assert all(vocab.resolve(labels[ts]) == labels[ts] for ts in table)
    assert labels.get("lung_upper_lobe_left", "left upper lung lobe") == "left upper lung lobe"
    # the map is what a user would get from the names alone: TS names are wordings of their classes
    assert all(vocab.resolve(ts) == labels[ts] for ts in table if not ts.startswith(("lung_", "iliac")))


def test_coarse_classes_come_out_of_the_fine_totalsegmentator_labels(vocab):
    labels = load_map(MAPS / "totalseg_total.yaml")["labels"]
    value = {ts: i for i, ts in enumerate(TS_TOTAL, 1)}
    got = class_values({ts: [v] for ts, v in value.items()}, labels, vocab, "total")
    assert got["left lung"] == sorted([value["lung_upper_lobe_left"], value["lung_lower_lobe_left"]])
    assert len(got["lung"]) == 5 and len(got["ribs"]) == 24 and len(got["left ribs"]) == 12
    assert got["lumbar spine"] == sorted(value[f"vertebrae_L{i}"] for i in range(1, 6))
    assert len(got["thoracic spine"]) == 12 and len(got["vertebrae"]) == 24 and len(got["spine"]) == 26
    assert got["sacrum"] == sorted([value["sacrum"], value["vertebrae_S1"]])
    assert got["kidney cyst"] == sorted([value["kidney_cyst_left"], value["kidney_cyst_right"]])
    assert got["left kidney"] == sorted([value["kidney_left"], value["kidney_cyst_left"]])
    assert value["atrial_appendage_left"] in got["heart"]
    mr = load_map(MAPS / "totalseg_total_mr.yaml")["labels"]
    got = class_values({ts: [i] for i, ts in enumerate(TS_TOTAL_MR, 1)}, mr, vocab, "total_mr")
    assert {"spine", "vertebrae", "intervertebral discs", "lung", "kidney"} <= set(got)
    assert "lumbar spine" not in got  # one "vertebrae" label cannot tell the regions apart


def test_anatomical_hierarchy(vocab):
    assert vocab.union_of["left lung"] == ["left upper lung lobe", "left lower lung lobe"]
    assert vocab.union_of["right lung"] == ["right upper lung lobe", "right middle lung lobe", "right lower lung lobe"]
    assert vocab.union_of["lung"] == ["right lung", "left lung"]
    assert vocab.union_of["cervical spine"] == [f"vertebra C{i}" for i in range(1, 8)]
    assert vocab.union_of["thoracic spine"] == [f"vertebra T{i}" for i in range(1, 13)]
    assert vocab.includes["thoracic spine"] == ["vertebra T13"] and vocab.includes["lumbar spine"] == ["vertebra L6"]
    assert vocab.union_of["lumbar spine"] == [f"vertebra L{i}" for i in range(1, 6)]
    assert "vertebra S1" in vocab.includes["sacrum"]
    assert vocab.union_of["vertebrae"] == ["cervical spine", "thoracic spine", "lumbar spine"]
    assert vocab.union_of["spine"] == ["vertebrae", "sacrum"]
    assert sorted(vocab.union_of["ribs"]) == sorted(f"{s} rib {i}" for s in SIDES for i in range(1, 13))
    assert set(vocab.parents("left rib 7")) == {"ribs", "left ribs", "rib 7"}
    assert len(vocab.union_of["intervertebral discs"]) == 23 and "intervertebral disc L5-S1" in vocab.names


def test_brats_nesting_and_lesions_in_their_organs(vocab):
    assert vocab.union_of["brain tumor"] == ["tumor core", "peritumoral edema"]
    assert vocab.union_of["tumor core"] == ["enhancing tumor", "non-enhancing tumor core"]
    assert "brain tumor" in vocab.includes["brain"] and "resection cavity" in vocab.names
    for organ, lesion in [("liver", "liver tumor"), ("kidney", "kidney tumor"), ("kidney", "kidney cyst"),
                          ("pancreas", "pancreas tumor"), ("lung", "lung tumor"), ("colon", "colon tumor"),
                          ("breast", "breast tumor"), ("adrenal gland", "adrenal tumor"),
                          ("prostate", "prostate tumor"), ("left kidney", "left kidney cyst")]:
        assert lesion in vocab.includes[organ], (organ, lesion)
    chambers = {"left ventricle", "right ventricle", "left ventricle myocardium", "left atrium", "right atrium"}
    assert chambers <= set(vocab.includes["heart"])
    assert vocab.parents("liver tumor") == ["liver"]  # lesion synthesis paints a lesion into exactly its organ


def test_benchmark_label_spellings_resolve(vocab):
    typed = {"postcava": "inferior vena cava", "IVC": "inferior vena cava", "prostate/uterus": "prostate or uterus",
             "edema": "peritumoral edema", "non-enhancing tumor": "non-enhancing tumor core",
             "NCR/NET": "non-enhancing tumor core", "SNFH": "peritumoral edema", "whole tumor": "brain tumor",
             "myocardium": "left ventricle myocardium", "head of left femur": "left femoral head",
             "intestine": "small bowel", "kidney_cyst_left": "left kidney cyst", "Vertebrae_L6": "vertebra L6",
             "peripheral zone": "prostate peripheral zone", "optic chiasma": "optic chiasm",
             "GTVnx": "nasopharyngeal tumor", "brain stem": "brainstem", "grey matter": "gray matter"}
    assert {t: vocab.resolve(t) for t in typed} == typed


# A sample of SAT's terminology (data/terminology_list.json, modality prefix removed) → the class covering it.
SAT = {"adrenal gland": "adrenal gland", "anterior eyeball": "anterior eyeball", "bronchie": "bronchi",
       "caudate lobe": "liver segment 1", "cervical vertebrae 1 (c1)": "vertebra C1", "colon cancer": "colon tumor",
       "covid-19 infection": "covid-19 infection", "enhancing brain tumor": "enhancing tumor",
       "head of femur": "femoral head", "heart ascending aorta": "ascending aorta", "iliac vena": "common iliac vein",
       "intervertebral disc between lumbar vertebrae 5 (l5) and sacrum": "intervertebral disc L5-S1",
       "intervertebral disc between thoracic vertebrae 9 (t9) and thoracic vertebrae 10 (t10)":
           "intervertebral disc T9-T10",
       "left auricle of heart": "left atrial appendage", "left heart atrium scar": "left atrium scar",
       "left insula posterior short gyrus": "left insula posterior short gyrus", "left lung upper lobe":
           "left upper lung lobe", "lumbar vertebrae 6 (l6)": "vertebra L6", "lung effusion": "pleural effusion",
       "lung nodule": "lung tumor", "necrotic brain tumor core": "non-enhancing tumor core",
       "peripheral zone of prostate": "prostate peripheral zone", "pharynx constrictor muscle":
           "pharyngeal constrictor muscles", "rib 7": "rib 7", "right lateral ventricle temporal horn":
           "right lateral ventricle temporal horn", "right vestibule semicircular canal":
           "right vestibule and semicircular canals", "sacral vertebrae 1 (s1)": "vertebra S1",
       "uterocervix": "cervix", "tumor": "tumor", "vestibular schwannoma": "vestibular schwannoma",
       "white matter hyperintensities": "white matter hyperintensities",
       "brainstem excluding substantia nigra": None}  # out of scope: the one SAT term left uncovered


def test_sat_terminology_resolves(vocab):
    assert {term: vocab.resolve(term) for term in SAT} == SAT
    assert all(vocab.resolve(term) in vocab.synonyms for term in SAT if SAT[term])


def test_search_matches_every_wording_ignoring_case_and_underscores(vocab):
    kidney = vocab.search("KIDNEY")
    assert {"kidney", "left kidney", "kidney tumor", "left kidney cyst", "renal artery"} <= set(kidney)
    assert "adrenal gland" not in kidney
    assert vocab.search("kidney_left") == ["left kidney"]
    assert vocab.search("sinistral kidney") == ["left kidney"]  # held-out wordings are searched too
    assert vocab.search("postcava") == ["inferior vena cava"]
    assert vocab.search("") == vocab.names


def _classes(*args):
    return subprocess.run([sys.executable, "-m", "vlseg.cli", "classes", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_classes_search_command():
    start = time.perf_counter()
    out = _classes("--search", "Lung Lobe")
    took = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "left upper lung lobe  [CT]" and lines[-1].startswith("7 of ")
    block = out.stdout.split("left lower lung lobe  [CT]")[0]
    assert "    within:    left lung, upper lung lobes" in block
    assert "    union of:  left upper lung lobe, right upper lung lobe" in out.stdout
    assert took < 30  # loose: the CPU is shared; `time vlseg classes --search kidney` is ~0.3 s alone
    mr = _classes("--search", "lung lobe", "--modality", "MR")
    assert mr.returncode == 2 and mr.stderr.startswith("error: no MR class matches 'lung lobe': 7 match it")
    none = _classes("--search", "kidny")
    assert none.returncode == 2 and none.stderr.strip() == (
        "error: no class matches 'kidny' (searched names, wordings and held-out paraphrases); "
        "did you mean 'kidney' or 'skin' or 'left kidney'?")


def test_classes_search_json():
    import json

    out = json.loads(_classes("--search", "tumor core", "--json").stdout)
    by_name = {c["name"]: c for c in out["classes"]}
    assert set(by_name) == {"tumor core", "non-enhancing tumor core"}
    assert by_name["tumor core"]["union_of"] == ["enhancing tumor", "non-enhancing tumor core"]  # not pruned
    assert by_name["non-enhancing tumor core"]["parents"] == ["tumor core"]
