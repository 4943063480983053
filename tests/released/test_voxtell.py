"""VoxTell imported into vlseg, against VoxTell's own code (the ``voxtell`` package): the same logits from the same
weights, the same masks from its own predictor on a real CT, strict and safe loading."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from vlseg.errors import VlsegError

pytest.importorskip("voxtell")
sys.path.insert(0, str(Path(__file__).parent))
import voxtell_reference as ref  # noqa: E402

REAL = Path(__file__).resolve().parents[1] / "data" / "real" / "patient_b"
PROMPTS = ["liver", "spleen"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A small VoxTell built by VoxTell's code, saved as VoxTell stores it, and imported by ``vlseg import``."""
    from vlseg.cli import main

    root = tmp_path_factory.mktemp("voxtell")
    model, kwargs = ref.build(seed=0)
    ref.save_folder(model, kwargs, root / "voxtell_model")
    bank = ref.save_bank(root / "text_embeddings.npz", ["Liver", "spleen", "left kidney"], dim=48)
    assert main(["import", "voxtell", "--model-dir", str(root / "voxtell_model"), "--bank",
                 str(root / "text_embeddings.npz"), "-o", str(root / "imported")]) == 0
    return {"root": root, "model": model, "bank": bank, "out": root / "imported"}


def test_imported_logits_equal_voxtells_own(released):
    """The same 192³ window through VoxTell's network and vlseg's: fp32 logits within 1e-4."""
    from vlseg.models.network import network_from_checkpoint

    net, text_encoder, _, cfg, meta = network_from_checkpoint(released["out"])
    assert meta["provenance"]["licence"].startswith("CC-BY-NC-SA-4.0")
    assert cfg["data"]["axis_order"] == "zyx" and cfg["fusion"]["channels_per_prompt"] == 4
    torch.manual_seed(1)
    x = torch.randn(1, 1, 192, 192, 192)
    emb = text_encoder.encode(PROMPTS[:1])[None]  # one prompt: VoxTell decodes each prompt alone anyway
    assert torch.equal(emb[0, 0], torch.from_numpy(released["bank"]["Liver"].astype(np.float32)))  # case-insensitive
    with torch.no_grad():
        theirs = released["model"](x, emb[:, :, None])
        mine = net.eval()(x.permute(0, 1, 4, 3, 2), emb).mask_logits.permute(0, 1, 4, 3, 2)
    delta = float((mine - theirs).abs().max())
    print(f"voxtell parity: max |logit difference| {delta:.2e} (logits up to {float(theirs.abs().max()):.2f})")
    assert delta <= 1e-4


def _real_ct_nifti(folder: Path) -> Path:
    from vlseg.io.scan import load_scan

    scan = load_scan(REAL / "dicom")
    path = folder / "patient_b.nii.gz"
    nib.save(nib.Nifti1Image(scan.data.astype(np.int16), scan.affine), path)
    return path


def _voxtells_predictor(model, bank: dict, prompts: list[str]):
    """VoxTell's own predictor around the small network (its constructor hard-codes the released widths and loads
    from the hub, so it is assembled from its parts; every step of prediction is VoxTell's code)."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    from voxtell.inference.predictor import VoxTellPredictor

    predictor = VoxTellPredictor.__new__(VoxTellPredictor)
    predictor.device, predictor.network, predictor.patch_size = torch.device("cpu"), model, ref.PATCH
    predictor.normalization = ZScoreNormalization(intensityproperties={})
    predictor.tile_step_size, predictor.perform_everything_on_device = 0.5, True
    predictor.embedding_bank = {k.lower(): v for k, v in bank.items()}
    predictor.tokenizer = predictor.text_backbone = None
    return predictor, predictor.embed_text_prompts(prompts)


def test_masks_equal_voxtells_predictor_on_a_real_ct(released, tmp_path):
    """VoxTell's predictor (its reader, crop, z-score, windows, logit blending) and vlseg's Segmenter on the same real
    CT with the same weights: the masks agree on all but 0.1% of voxels, in the input's geometry."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient

    from vlseg.infer.segmenter import Segmenter

    nifti = _real_ct_nifti(tmp_path)
    data, _ = NibabelIOWithReorient().read_images([str(nifti)])
    predictor, embeddings = _voxtells_predictor(released["model"], released["bank"], PROMPTS)
    theirs = predictor.predict_single_image(data, text_embeddings=embeddings)  # [prompts, Z, Y, X], RAS
    result = Segmenter.from_pretrained(released["out"], device="cpu").segment(str(nifti), PROMPTS)
    for q, prompt in enumerate(PROMPTS):
        mine = np.asarray(result.results[q].mask)  # [X, Y, Z] on the scan's canonical grid
        assert mine.shape == theirs[q].T.shape
        disagree = float(np.mean(mine != theirs[q].T))
        print(f"{prompt}: {disagree:.5%} of voxels differ; VoxTell positive {theirs[q].mean():.3f}")
        assert disagree <= 1e-3
    assert any(0 < theirs[q].mean() < 1 for q in range(len(PROMPTS)))  # masks that can disagree


def test_unknown_prompt_without_text_tower_is_refused(released):
    from vlseg.infer.segmenter import Segmenter

    segmenter = Segmenter.from_pretrained(released["out"], device="cpu")
    with pytest.raises(VlsegError, match="not in this model's embedding bank.*known prompts: Liver, spleen"):
        segmenter.embed(["pancreatic duct"])


def _checkpoint(folder: Path) -> Path:
    return folder / "fold_0" / "checkpoint_final.pth"


@pytest.mark.parametrize("damage, message", [
    ("extra", "key 'stray.weight' .* has no place"),
    ("shape", "key 'transformer_decoder.layers.0.linear2.weight' has shape \\(64, 2047\\)"),
    ("missing", "no weights for the vlseg network's 'fusion.norm.weight'"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_key(released, tmp_path, damage, message):
    from vlseg.released.voxtell import VoxTell

    folder = tmp_path / "model"
    ref.save_folder(released["model"], ref.arch_kwargs([1] * 6), folder)
    ckpt = torch.load(_checkpoint(folder), weights_only=False)
    weights = ckpt["network_weights"]
    if damage == "extra":
        weights["stray.weight"] = torch.zeros(3)
    elif damage == "shape":
        weights["transformer_decoder.layers.0.linear2.weight"] = torch.zeros(64, 2047)
    else:
        del weights["transformer_decoder.norm.weight"]
    torch.save(ckpt, _checkpoint(folder))
    args = type("Args", (), {"model_dir": str(folder), "bank": str(released["root"] / "text_embeddings.npz"),
                             "text_model": None})()
    with pytest.raises(VlsegError, match=message):
        VoxTell().convert(args, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half written


class Payload:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    from vlseg.released.base import read_torch_file

    torch.save({"network_weights": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "bad.pth")
    with pytest.raises(VlsegError, match="bad.pth: refused, unpickling it would need builtins.print"):
        read_torch_file(tmp_path / "bad.pth")


def test_positions_follow_the_positional_encodings_package():
    from positional_encodings.torch_encodings import PositionalEncoding3D

    from vlseg.models.fusions.query_decoder import index_positions_3d

    for shape, dim in [((12, 12, 12), 64), ((3, 5, 4), 70)]:
        theirs = PositionalEncoding3D(dim)(torch.zeros(1, *shape, dim)).reshape(-1, dim)
        assert torch.allclose(index_positions_3d(shape, dim), theirs, atol=1e-5)


def test_prompts_decoded_together_equal_prompts_decoded_alone():
    """prompts_per_pass only trades memory for speed: three prompts in one pass give each prompt's own logits."""
    from vlseg.config import load_config
    from vlseg.models.network import build_fusion
    from vlseg.registry import IMAGE_ENCODERS

    cfg = load_config("released/voxtell", ["image_encoder.n_blocks_per_stage=1", "fusion.query_dim=32",
                                           "fusion.text_hidden=32", "fusion.stage_hidden=32", "fusion.ffn_dim=64",
                                           "fusion.channels_per_prompt=2", "fusion.layers=1", "fusion.dropout=0"])
    torch.manual_seed(0)
    encoder = IMAGE_ENCODERS.build(cfg["image_encoder"])
    fusion = build_fusion(cfg, encoder, 24).eval()
    features = encoder.eval()(torch.randn(1, 1, 64, 64, 64))
    prompts = torch.randn(1, 3, 24)
    with torch.no_grad():
        alone = fusion(features, prompts).mask_logits
        fusion.prompts_per_pass = 3
        together = fusion(features, prompts)
    assert torch.allclose(alone, together.mask_logits, atol=1e-5)
    assert torch.equal(together.presence_logits, together.mask_logits.flatten(2).amax(2))
