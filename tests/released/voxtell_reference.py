"""Reference VoxTell models built by VoxTell's own code (the ``voxtell`` package, a test-only dependency) and saved the
way VoxTell stores them: ``plans.json`` + ``fold_0/checkpoint_final.pth`` (nnU-Net's checkpoint dict), plus an
embedding bank.  Shared by the parity tests and ``benchmarks/voxtell_vs_vlseg.py``.

VoxTell's input is fixed at 192³ and its stage widths at 32…320 (its positions and decoder table are built for them);
a small model for CI keeps those and shrinks what VoxTell lets vary: blocks per stage, query width, text width and maps
per prompt.  ``full=True`` gives the released architecture (random weights, ~440 M parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FEATURES = [32, 64, 128, 256, 320, 320]
PATCH = [192, 192, 192]


def arch_kwargs(blocks) -> dict:
    """nnU-Net plans' ``arch_kwargs`` of a ResEnc network (operators as dotted names, as plans.json holds them)."""
    return {"n_stages": 6, "features_per_stage": FEATURES, "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": blocks,
            "n_conv_per_stage_decoder": [1] * 5, "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def build(seed: int = 0, full: bool = False, text_dim: int = 48, query_dim: int = 64, maps: int = 4):
    """``(VoxTellModel in eval mode, arch_kwargs)`` with random weights (biases and norms randomised too, so that
    every mapped tensor matters)."""
    from torch import nn
    from voxtell.model.voxtell_model import VoxTellModel

    blocks = [1, 3, 4, 6, 6, 6] if full else [1, 1, 1, 1, 1, 1]
    kwargs = arch_kwargs(blocks)
    if full:
        text_dim, query_dim, maps, hidden = 2560, 2048, 32, 2048
    else:
        hidden = 64
    torch.manual_seed(seed)
    model = VoxTellModel(input_channels=1, n_stages=6, features_per_stage=FEATURES, conv_op=nn.Conv3d,
                         kernel_sizes=3, strides=[1, 2, 2, 2, 2, 2], n_blocks_per_stage=blocks,
                         n_conv_per_stage_decoder=[1] * 5, conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False, num_maskformer_stages=5,
                         query_dim=query_dim, decoder_layer=4, text_embedding_dim=text_dim, num_heads=maps,
                         project_to_decoder_hidden_dim=hidden)
    if not full:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval(), kwargs


def save_folder(model, kwargs: dict, folder: Path) -> Path:
    """VoxTell's model folder: plans.json and fold_0/checkpoint_final.pth as nnU-Net's trainer writes it (weights,
    optimiser state, a training log of NumPy floats, init args)."""
    folder = Path(folder)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = {"dataset_name": "Dataset999_VoxTellTest", "plans_name": "nnUNetResEncUNetLPlans",
             "configurations": {"3d_fullres": {
                 "patch_size": PATCH, "spacing": [1.5, 1.5, 1.5],
                 "architecture": {"network_class_name":
                                  "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                                  "arch_kwargs": kwargs,
                                  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    checkpoint = {"network_weights": model.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
                  "grad_scaler_state": None,
                  "logging": {"train_losses": [np.float64(0.5), np.float64(0.4)], "ema_fg_dice": [np.float32(0.1)]},
                  "_best_ema": np.float64(0.1), "current_epoch": 2,
                  "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0},
                  "trainer_name": "VoxTellTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def save_bank(path: Path, labels: list[str], dim: int, seed: int = 1) -> dict[str, np.ndarray]:
    """A bank of random float16 prompt embeddings, in VoxTell's ``.npz`` layout; returns {label: vector}."""
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((len(labels), dim)).astype(np.float16)
    np.savez(path, labels=np.asarray(labels), embeddings=embeddings)
    return {label: embeddings[i] for i, label in enumerate(labels)}
