"""Reference outputs of SAT (github zhaoziheng/SAT) for vlseg's importer tests, made with SAT's own code.

Run in a virtualenv of its own, never in vlseg's: SAT bundles a modified dynamic-network-architectures (v0.2, whose
U-Net returns ``(skips, outs)``) that installs under the same name as the pip package vlseg uses.  That environment
needs torch, positional_encodings==6.0.1, einops, monai, transformers, numpy and safetensors::

    python3 -m venv /tmp/satenv
    /tmp/satenv/bin/pip install -c .ci/constraints-cpu.txt torch==2.13.0 positional_encodings==6.0.1 einops monai \
        transformers numpy safetensors
    /tmp/satenv/bin/python benchmarks/parity/make_sat_fixtures.py --sat /path/to/SAT --out tests/released/fixtures/sat

What it writes (a few MB in all):

* ``vision.pth``: a small ``Maskformer`` (6-stage plain U-Net 8…32 wide, query width 32, deep-supervision heads) in
  SAT's checkpoint layout ``{'model_state_dict': {'module.' + key: tensor}, 'optimizer_state_dict', 'step'}``;
  ``vision.json`` its sizes; ``vision_io.safetensors`` the input crop (1 channel; SAT is fed it repeated to 3), the
  queries and SAT's logits in eval mode (inference path, and the training path's deep-supervision logits).
* ``text.pth``: SAT's ``Knowledge_Encoder`` over a tiny random MPNet (``text_hf/``: config, WordPiece vocabulary laid
  out like BioLORD's, random weights), with ``atlas_tower.*`` and ``temperature`` entries as in the released file;
  ``text_io.json`` prompts, modalities and SAT's embeddings of them.
* ``positions.safetensors``: the fixed key positions of SAT's full-size models (``PositionalEncoding3D(768)`` over
  the 9 × 9 × 3 token grid of a 288 × 288 × 96 window, tokens in SAT's ``(h w d)`` order; float16);
* ``nano_shapes.json``, ``pro_shapes.json``: key → shape of the full-size SAT-Nano / SAT-Pro vision state dicts, as
  the released checkpoints name them (``module.`` prefix, deep-supervision heads included), built on the meta device.

SAT's modules are imported from the checkout; this script only builds them at a small size and records what they do.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 20260315
IMAGE_SHAPE = (32, 64, 96)  # multiples of 32; a token grid of 1 × 2 × 3 tells the three axes apart
FEATURES = (8, 8, 16, 16, 32, 32)
QUERY_DIM = 32
FFN_DIM = 64
HEADS = 8
LAYERS = 6
MASK_HIDDEN = 16
MID_HIDDEN = (12, 16, 20)
TEXT_HIDDEN = 32
TEXT_PROJ_HIDDEN = 48
PROMPTS = [("liver", "ct"), ("left kidney", "ct"), ("liver tumor", "mri"), ("brain lesions", "pet"),
           ("spleen", "us")]


def import_sat(sat: Path) -> dict:
    """SAT's modules, with its bundled network package first on the path."""
    sys.path.insert(0, str(sat / "model" / "dynamic-network-architectures-main"))
    sys.path.insert(0, str(sat))
    import dynamic_network_architectures
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He
    from model.knowledge_encoder import Knowledge_Encoder
    from model.maskformer import Maskformer
    from model.transformer_decoder import TransformerDecoder, TransformerDecoderLayer
    from positional_encodings.torch_encodings import PositionalEncoding3D

    where = Path(dynamic_network_architectures.__file__).resolve()
    if sat.resolve() not in where.parents:
        raise SystemExit(f"dynamic_network_architectures comes from {where}, not from SAT's bundled copy")
    return {"PlainConvUNet": PlainConvUNet, "InitWeights_He": InitWeights_He, "Maskformer": Maskformer,
            "PositionalEncoding3D": PositionalEncoding3D, "TransformerDecoder": TransformerDecoder,
            "TransformerDecoderLayer": TransformerDecoderLayer, "Knowledge_Encoder": Knowledge_Encoder}


def mlp(sizes: list[int], last_gelu: bool) -> nn.Sequential:
    """Linear–GELU stacks laid out as SAT's projection heads (indices 0, 2, …)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_gelu or i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def small_unet(sat: dict) -> nn.Module:
    return sat["PlainConvUNet"](
        input_channels=3, n_stages=6, features_per_stage=FEATURES, conv_op=nn.Conv3d, kernel_sizes=3,
        strides=(1, 2, 2, 2, 2, 2), n_conv_per_stage=(2, 2, 2, 2, 2, 2), n_conv_per_stage_decoder=(2, 2, 2, 2, 2),
        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
        dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs=None, deep_supervision=True, nonlin_first=False)


def small_maskformer(sat: dict) -> nn.Module:
    """SAT's ``Maskformer`` with its attributes set at a small size (its constructor hard-codes the 768-wide ones and
    builds all three full-size backbones); its forward methods run unchanged."""
    model = sat["Maskformer"].__new__(sat["Maskformer"])
    nn.Module.__init__(model)
    model.hw_patch_size, model.frame_patch_size, model.deep_supervision = 32, 32, True
    model.backbone = small_unet(sat)
    model.backbone.apply(sat["InitWeights_He"](1e-2))
    model.avg_pool_ls = [nn.AvgPool3d(k, k) for k in (32, 16, 8, 4, 2)]
    model.projection_layer = mlp([sum(FEATURES), 48, QUERY_DIM], last_gelu=True)
    grid = [n // 32 for n in IMAGE_SHAPE]
    pos = sat["PositionalEncoding3D"](QUERY_DIM)(torch.zeros(1, *grid, QUERY_DIM))
    model.pos_embedding = pos.reshape(1, -1, QUERY_DIM).permute(1, 0, 2)  # (h w d) b c, as SAT's rearrange
    layer = sat["TransformerDecoderLayer"](d_model=QUERY_DIM, nhead=HEADS, dim_feedforward=FFN_DIM,
                                           normalize_before=True)
    model.transformer_decoder = sat["TransformerDecoder"](decoder_layer=layer, num_layers=LAYERS,
                                                          norm=nn.LayerNorm(QUERY_DIM))
    model.query_proj = nn.Identity()
    model.mid_mask_embed_proj = nn.ModuleList(mlp([QUERY_DIM, h, c], last_gelu=True)
                                              for h, c in zip(MID_HIDDEN, FEATURES[1:4]))
    model.mask_embed_proj = mlp([QUERY_DIM, MASK_HIDDEN, FEATURES[0]], last_gelu=True)
    return model


@torch.no_grad()
def jitter_(model: nn.Module, generator: torch.Generator) -> None:
    """Move every norm away from its identity initialisation and every bias away from zero, so that a weight mapped to
    the wrong place shows in the outputs."""
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("bias"):
            param.copy_(0.1 * noise)
        elif param.ndim == 1:  # norm scales
            param.copy_(1.0 + 0.2 * noise)


def test_image(generator: torch.Generator) -> torch.Tensor:
    """A blob on smoothed noise, z-scored as SAT's preprocessing leaves it; values exact in float16."""
    noise = torch.randn((1, 1, *IMAGE_SHAPE), generator=generator)
    noise = nn.functional.avg_pool3d(noise, 3, stride=1, padding=1)
    axes = [torch.linspace(-1, 1, n) for n in IMAGE_SHAPE]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    blob = ((grid - torch.tensor([0.2, -0.3, 0.1])[:, None, None, None]) ** 2).sum(0) < 0.25
    image = noise * 2 + 3 * blob.float()
    image = (image - image.mean()) / image.std()
    return image.half().float()


def sat_checkpoint(state: dict, extra: dict | None = None) -> dict:
    model_state = {"module." + k: v.detach() for k, v in state.items()}  # shared storage kept, as SAT saves it
    model_state.update(extra or {})
    return {"model_state_dict": model_state, "optimizer_state_dict": {"state": {}, "param_groups": []}, "step": 1}


def make_vision(sat: dict, out: Path, queries: torch.Tensor) -> None:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = small_maskformer(sat)
    jitter_(model, generator)
    model.eval()
    image = test_image(generator)
    sat_input = image.repeat(1, 3, 1, 1, 1)  # SAT's inference repeats single-channel scans to 3 channels
    with torch.no_grad():
        logits = model([queries], sat_input)  # a list of queries: SAT's inference path
        train_logits = model(queries[None], sat_input)  # a [B, N, d] tensor: its training path (deep supervision)
    torch.save(sat_checkpoint(model.state_dict()), out / "vision.pth")
    from safetensors.torch import save_file

    tensors = {"image": image.half(), "queries": queries.contiguous(), "logits": logits.contiguous()}
    for i, level in enumerate(train_logits[1:4]):
        tensors[f"deep_supervision_{i + 1}"] = level.contiguous()
    save_file(tensors, str(out / "vision_io.safetensors"))
    config = {"features_per_stage": FEATURES, "n_conv_per_stage": 2, "n_conv_per_stage_decoder": 2,
              "strides": [1, 2, 2, 2, 2, 2], "query_dim": QUERY_DIM, "heads": HEADS, "layers": LAYERS,
              "dim_feedforward": FFN_DIM, "key_hidden": 48, "mask_hidden": MASK_HIDDEN, "mid_hidden": MID_HIDDEN,
              "image_shape": IMAGE_SHAPE, "seed": SEED,
              "logits_max_abs": float(logits.abs().max()), "logits_std": float(logits.std())}
    (out / "vision.json").write_text(json.dumps(config, indent=1))
    print("vision: logits", tuple(logits.shape), "max |logit|", config["logits_max_abs"], "std", config["logits_std"])


VOCAB_WORDS = ["liver", "kidney", "left", "right", "tumor", "lesion", "brain", "spleen", "lung", "aorta", "heart",
               "of", "the", "and", "upper", "lobe", "vertebra", "gall", "##bladder", "##s", "##al", "##ic", "##e",
               "pan", "##cre", "##as", "cyst", "bone", "ct", "mri"]


def write_tiny_mpnet(folder: Path) -> None:
    """A random 2-layer MPNet with a WordPiece vocabulary laid out like BioLORD's (MPNet's own special tokens first,
    BERT's ``[PAD] [UNK] [CLS] [SEP] [MASK]`` after them as ordinary entries, ``<mask>`` last)."""
    from transformers import MPNetConfig, MPNetModel

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = (["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters
             + ["##" + c for c in letters] + VOCAB_WORDS + ["<mask>"])
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer_config = {"tokenizer_class": "MPNetTokenizer", "do_lower_case": True, "bos_token": "<s>",
                        "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>",
                        "unk_token": "[UNK]", "mask_token": "<mask>", "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    config = MPNetConfig(vocab_size=len(vocab), hidden_size=TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2)
    torch.manual_seed(SEED + 1)
    MPNetModel(config).save_pretrained(folder)


def make_text(sat: dict, out: Path) -> torch.Tensor:
    """SAT's text tower on the tiny MPNet; returns its embeddings of the CT prompts (the vision fixture's queries)."""
    folder = out / "text_hf"
    write_tiny_mpnet(folder)
    torch.cuda.current_device = lambda: "cpu"  # SAT's Text_Tower moves tokens to the current CUDA device
    torch.manual_seed(SEED + 2)
    encoder = sat["Knowledge_Encoder"](biolord_checkpoint=str(folder))
    # Its 768-wide head, at the tiny tower's width (the modality embedding is added to the tower's output too)
    encoder.projection_layer = mlp([TEXT_HIDDEN, TEXT_PROJ_HIDDEN, TEXT_HIDDEN], last_gelu=False)
    encoder.modality_embed = nn.Embedding(4, TEXT_HIDDEN)
    jitter_(encoder, torch.Generator().manual_seed(SEED + 3))
    encoder.eval()
    codes = {"ct": 0, "mri": 1, "us": 2, "pet": 3}  # SAT's Text_Encoder's table
    texts = [t for t, _ in PROMPTS]
    with torch.no_grad():
        emb = encoder(texts, torch.tensor([codes[m] for _, m in PROMPTS]))
        tokens = encoder.text_tower.tokenizer.tokenize(texts)
    extra = {"module.atlas_tower.encoder.stages.0.weight": torch.randn(4, 3), "module.temperature": torch.tensor(0.07)}
    torch.save(sat_checkpoint(encoder.state_dict(), extra), out / "text.pth")
    record = {"prompts": texts, "modalities": [m for _, m in PROMPTS], "embeddings": emb.tolist(),
              "input_ids": tokens["input_ids"].tolist(), "hidden": TEXT_HIDDEN, "seed": SEED}
    (out / "text_io.json").write_text(json.dumps(record, indent=1))
    print("text: embeddings", tuple(emb.shape), "input ids", tokens["input_ids"].tolist())
    ct = [i for i, (_, m) in enumerate(PROMPTS) if m == "ct"]
    return emb[ct]


def full_size_shapes(sat: dict, backbone: str, positional_stub: type) -> dict:
    """Key → shape of SAT's full-size vision model as its checkpoints store it (deep supervision as trained)."""
    import model.maskformer as maskformer_module

    maskformer_module.PositionalEncoding3D = positional_stub  # fixed values, no weights: not needed for shapes
    with torch.device("meta"):
        model = sat["Maskformer"](backbone, [288, 288, 96], [32, 32, 32], deep_supervision=True)
    return {"module." + k: list(v.shape) for k, v in model.state_dict().items()}


def make_positions(sat: dict, out: Path) -> None:
    from safetensors.torch import save_file

    grid = (288 // 32, 288 // 32, 96 // 32)
    pos = sat["PositionalEncoding3D"](768)(torch.zeros(1, *grid, 768)).reshape(-1, 768)
    save_file({"positions": pos.half().contiguous()}, str(out / "positions.safetensors"), metadata={"grid": str(grid)})


class _ZeroPositions(nn.Module):
    def __init__(self, channels: int):
        super().__init__()

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(tensor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sat", type=Path, required=True, help="a checkout of github.com/zhaoziheng/SAT")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-full-size", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    sat = import_sat(args.sat)
    queries = make_text(sat, args.out)
    make_vision(sat, args.out, queries)
    make_positions(sat, args.out)
    if not args.skip_full_size:
        for name, backbone in (("nano", "UNET"), ("pro", "UNET-L")):
            shapes = full_size_shapes(sat, backbone, _ZeroPositions)
            lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
            (args.out / f"{name}_shapes.json").write_text("{\n" + lines + "\n}\n")
            print(name, len(shapes), "keys,", sum(int(np.prod(s)) for s in shapes.values()) / 1e6, "M values")


if __name__ == "__main__":
    main()
