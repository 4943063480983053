"""SAT imported through ``vlseg import sat-nano`` against outputs of SAT's own code.

The fixtures (``fixtures/sat``, made by ``benchmarks/parity/make_sat_fixtures.py`` in an environment with SAT's
checkout) hold a small random ``Maskformer`` and ``Knowledge_Encoder`` in SAT's checkpoint layout, an input crop, the
logits and embeddings SAT computed, and the key → shape lists of the full-size SAT-Nano and SAT-Pro vision models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlseg.cli.import_ import main as import_main
from vlseg.config import load_config
from vlseg.errors import VlsegError
from vlseg.models.network import build_vision_network, network_from_checkpoint
from vlseg.released.base import RELEASED
from vlseg.released.sat import fill_sizes, vision_key, vision_sizes

FIXTURES = Path(__file__).parent / "fixtures" / "sat"
TOLERANCE_LOGITS = 1e-4
TOLERANCE_TEXT = 1e-5


def import_args(out: Path, checkpoint: Path = FIXTURES / "vision.pth", other_widths: bool = True) -> list[str]:
    args = ["sat-nano", "--checkpoint", str(checkpoint), "--text-checkpoint", str(FIXTURES / "text.pth"),
            "--biolord", str(FIXTURES / "text_hf"), "-o", str(out)]
    return args + ["--other-widths"] if other_widths else args


def convert(out: Path, checkpoint: Path, other_widths: bool = True) -> Path:
    family = RELEASED.get("sat-nano")()
    args = argparse.Namespace(checkpoint=checkpoint, text_checkpoint=FIXTURES / "text.pth",
                              biolord=FIXTURES / "text_hf", modality="ct", other_widths=other_widths)
    return family.convert(args, out)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sat") / "model"
    assert import_main(import_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "vision_io.safetensors"))


def test_vision_logits_match_sat(imported, reference):
    net, _, _, cfg, meta = network_from_checkpoint(imported)
    net.eval()
    with torch.no_grad():
        out = net(reference["image"].float(), reference["queries"][None])
    assert out.mask_logits.shape == reference["logits"].shape
    assert (out.mask_logits - reference["logits"]).abs().max() <= TOLERANCE_LOGITS
    # no presence head: the presence logit is the window's largest mask logit
    assert torch.allclose(out.presence_logits, reference["logits"].flatten(2).amax(-1), atol=TOLERANCE_LOGITS)
    assert meta["provenance"]["family"] == "sat-nano" and cfg["fusion"]["positions"] == "sat"


def test_deep_supervision_heads_match_sat(imported, reference):
    net, *_ = network_from_checkpoint(imported)
    net.train()  # SAT's training path: logits at 1/2, 1/4, 1/8 from mid_mask_embed_proj
    with torch.no_grad():
        out = net(reference["image"].float(), reference["queries"][None])
    assert len(out.deep_supervision) == 3
    for level, logits in enumerate(out.deep_supervision, start=1):
        assert (logits - reference[f"deep_supervision_{level}"]).abs().max() <= TOLERANCE_LOGITS


def test_text_embeddings_match_sat(imported):
    from vlseg.models.text.sat import SatTextEncoder

    record = json.loads((FIXTURES / "text_io.json").read_text())
    expected = torch.tensor(record["embeddings"])
    text = imported / "text"
    for modality in ("ct", "mri", "us", "pet"):
        encoder = SatTextEncoder(path=str(text), weights=str(text / "sat_head.safetensors"), modality=modality)
        rows = [i for i, m in enumerate(record["modalities"]) if m == modality]
        got = encoder.embed([record["prompts"][i] for i in rows])
        assert (got - expected[rows]).abs().max() <= TOLERANCE_TEXT, modality
    ids = encoder.tokenize(record["prompts"])["input_ids"]
    assert ids.tolist() == record["input_ids"]  # literal [CLS]/[SEP] entries, padded with 0


def test_standard_tokenisation_would_differ(imported):
    """The quirk matters: MPNet's own <s> … </s> framing gives other ids, hence other embeddings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(imported / "text", local_files_only=True)
    record = json.loads((FIXTURES / "text_io.json").read_text())
    standard = tokenizer(record["prompts"][0])["input_ids"]
    assert standard != [i for i in record["input_ids"][0] if i > 0]


def test_imported_text_encoder_is_the_models(imported, reference):
    _, text_encoder, _, cfg, meta = network_from_checkpoint(imported)
    assert cfg["text_encoder"]["name"] == "sat" and meta["text_encoder"]["path"] == "text"
    got = text_encoder.encode(["liver", "left kidney"])  # the queries the vision fixture was given
    assert (got - reference["queries"]).abs().max() <= TOLERANCE_TEXT


@pytest.mark.parametrize("family", ["sat-nano", "sat-pro"])
def test_full_size_keys_map_one_to_one(family):
    shapes = json.loads((FIXTURES / f"{family.split('-')[1]}_shapes.json").read_text())
    cfg = load_config(f"released/{family}")
    with torch.device("meta"):
        sizes = vision_sizes({k.removeprefix("module."): torch.empty(v) for k, v in shapes.items()}, Path(family))
        cfg = fill_sizes(cfg, sizes, Path(family), other_widths=False, family=family)  # the published widths
        net = build_vision_network(cfg, 768)
    target = {k: list(v.shape) for k, v in net.state_dict().items() if k not in ("prompt_center", "prompt_scale")}
    mapped, dropped = {}, []
    for key, shape in shapes.items():
        new = vision_key(key)
        if new is None:
            dropped.append(key)
        else:
            assert mapped.setdefault(new, shape) == shape, key
    assert mapped == target
    assert dropped and all(".norm1." in key for key in dropped)  # SAT's pre-norm layers never use norm1


def test_full_size_positions_are_sats():
    """SAT-Nano/Pro's key positions (768 channels over the 9 × 9 × 3 grid of a 288 × 288 × 96 window) as
    positional_encodings 6.0.1 makes them (stored in float16)."""
    from vlseg.models.fusions.query_decoder import index_positions_3d

    expected = load_file(str(FIXTURES / "positions.safetensors"))["positions"].float()
    assert (index_positions_3d((9, 9, 3), 768) - expected).abs().max() < 1e-3


def rewritten(tmp_path: Path, change) -> Path:
    ckpt = torch.load(FIXTURES / "vision.pth", map_location="cpu", weights_only=True)
    change(ckpt["model_state_dict"])
    path = tmp_path / "changed.pth"
    torch.save(ckpt, path)
    return path


def one_line_error(tmp_path: Path, checkpoint: Path) -> str:
    with pytest.raises(VlsegError) as info:
        convert(tmp_path / "out", checkpoint)
    message = str(info.value)
    assert "\n" not in message and not (tmp_path / "out").exists()
    return message


def test_wrong_shape_is_refused(tmp_path):
    key = "module.transformer_decoder.layers.2.linear1.weight"
    path = rewritten(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(65, 32)))
    message = one_line_error(tmp_path, path)
    assert key in message and "(65, 32)" in message


def test_extra_key_is_refused(tmp_path):
    key = "module.transformer_decoder.layers.0.self_attn.in_proj_weight"
    path = rewritten(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(96, 32)))
    assert key in one_line_error(tmp_path, path)


def test_missing_key_is_refused(tmp_path):
    path = rewritten(tmp_path, lambda sd: sd.pop("module.mask_embed_proj.2.bias"))
    assert "fusion.mask_head.2.bias" in one_line_error(tmp_path, path)


def test_checkpoint_without_deep_supervision_heads(tmp_path):
    def drop(state):
        for key in [k for k in state if "mid_mask_embed_proj" in k]:
            del state[key]

    out = convert(tmp_path / "out", rewritten(tmp_path, drop))
    net, _, _, cfg, _ = network_from_checkpoint(out)
    assert cfg["fusion"]["deep_supervision"] == 0 and not any("aux_heads" in k for k in net.state_dict())


def test_other_widths_need_the_flag(tmp_path):
    with pytest.raises(VlsegError, match="features_per_stage"):
        convert(tmp_path / "out", FIXTURES / "vision.pth", other_widths=False)


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model_state_dict": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(VlsegError, match="arbitrary code"):
        convert(tmp_path / "out", path)
