"""The canonical vocabulary: data integrity, hierarchy, held-out paraphrases, subsets and `vlseg classes`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlseg.errors import VlsegError
from vlseg.vocab.vocabulary import Vocabulary, normalize_text

REPO = Path(__file__).resolve().parents[2]


def test_bundled_vocabulary_is_consistent():
    v = Vocabulary.load()
    assert {"liver", "liver tumor", "spleen", "left kidney", "right kidney", "lung tumor", "heart"} <= set(v.names)
    training = {normalize_text(t) for t in v.all_texts()}
    for name in v.names:
        assert v.synonyms[name][0] == name and v.modalities[name]
        assert v.heldout[name], name  # every class can be asked in words it was never trained on
        assert not training & {normalize_text(t) for t in v.heldout[name]}
        assert v.resolve(v.heldout[name][0]) == name
    assert v.union_of["kidney"] == ["right kidney", "left kidney"]
    assert v.includes["liver"] == ["liver tumor"] and v.parents("liver tumor") == ["liver"]
    assert set(v.parents("left kidney")) == {"kidney"}


@pytest.mark.parametrize("classes,problem", [
    ([{"name": "a"}, {"name": "a"}], "class 'a' is listed twice"),
    ([{"name": "a", "includes": ["b"]}], "class 'a' includes unknown class 'b'"),
    ([{"name": "a", "union_of": ["x"]}], "class 'a' union_of unknown class 'x'"),
    ([{"name": "a", "synonyms": ["a", "blob"]}, {"name": "b", "heldout": ["Blob"]}],
     "held-out paraphrase 'Blob' of 'b' is also a training wording of 'a'"),
])
def test_bad_vocabulary_files(tmp_path, classes, problem):
    path = tmp_path / "vocab.yaml"
    path.write_text(yaml.safe_dump({"classes": classes}))
    with pytest.raises(VlsegError) as err:
        Vocabulary.load(path)
    assert str(err.value) == f"{path}: {problem}"


def test_subset_keeps_canonical_order_and_prunes_links():
    v = Vocabulary.load().subset(["left kidney", "kidney", "liver"])
    assert v.names == ["liver", "left kidney", "kidney"]
    assert v.union_of["kidney"] == ["left kidney"] and v.includes["liver"] == []
    assert Vocabulary.from_dict(v.to_dict()).to_dict() == v.to_dict()  # what checkpoints store round-trips
    with pytest.raises(VlsegError, match="m.jsonl: class 'pancreatic cyst' is not in the vocabulary"):
        Vocabulary.load().subset(["liver", "pancreatic cyst"], source="m.jsonl")


def test_a_trained_model_knows_the_classes_its_corpus_annotates(tiny_run):
    from vlseg.checkpoint import read_checkpoint

    _, meta, _ = read_checkpoint(tiny_run)
    names = [c["name"] for c in meta["vocabulary"]["classes"]]
    assert names == ["liver", "liver tumor", "spleen", "right kidney", "left kidney"]
    assert meta["vocabulary"]["classes"][0]["includes"] == ["liver tumor"]


def test_unknown_class_in_the_manifest_stops_training(tmp_path, phantom_corpus, tiny_bert_dir):
    from tests.conftest import tiny_overrides
    from vlseg.config import load_config
    from vlseg.prepare.manifest import read_manifest, write_manifest
    from vlseg.train.loop import train

    cases = read_manifest(phantom_corpus, split="train")
    cases[0].classes["liver cyst"] = [9]
    cases[0].present["liver cyst"] = False
    manifest = write_manifest(tmp_path / "m.jsonl", cases)
    cfg = load_config(None, tiny_overrides(tmp_path, manifest, tiny_bert_dir))
    with pytest.raises(VlsegError, match="m.jsonl: class 'liver cyst' is not in the vocabulary"):
        train(cfg, progress=False)


def test_classes_command():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vlseg.cli", "classes", *args], capture_output=True, text=True,
                              timeout=120, cwd=REPO)

    text = run()
    assert text.returncode == 0 and text.stdout.splitlines()[0].startswith("liver ")
    assert f"{len(Vocabulary.load())} classes" in text.stdout
    mr = json.loads(run("--json", "--modality", "mri").stdout)
    names = [c["name"] for c in mr["classes"]]
    assert "gray matter" in names and "lung tumor" not in names
    bad = run("--modality", "PET")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: modality 'PET': unknown; use one of CT, MR"
