"""Per-class dynamic heads: a controller turns (image context, class code) into the weights of a small per-voxel
network, as in the CLIP-Driven Universal Model (text embedding as the class code) and DoDNet (a one-hot task code).

For each query: ``controller([global image vector ⊕ code]) → θ`` (153 numbers for the default 8-channel, 3-layer
head: 8·8+8 + 8·8+8 + 8+1), then ``head_θ`` runs as a stack of 1×1×1 convolutions over an 8-channel projection of
the decoder's last features.  Written here because neither MONAI nor the original repositories expose the head as a
reusable module; the batched einsum evaluates every query's head in one pass instead of a grouped convolution loop.

vlseg adds a presence logit per query (a linear read-out of the controller input), so the head fits the same
interface and losses as the query decoder; ``loss.presence_weight=0`` leaves it untrained.  ``presence:
max_logit`` has no such read-out and gives the largest mask logit of the window instead ("present" = some voxel is
positive), the only reading a released model without a presence head allows.

The released CLIP-Universal head, exactly (``configs/released/clip-universal-*.yaml``): ``code_relu: true`` (its
text projection 512→256 is followed by a ReLU), ``param_order: weights_first`` (its controller's 153 outputs hold
the three layers' weights, then the three biases; vlseg's default keeps each layer's weights and bias together),
``presence: max_logit``.  The controller is a ``Linear`` here, a 1×1×1 ``Conv3d`` there: the same weights.

Mind the learning rate.  Every generated weight is a sum over the controller's 512 inputs, so one Adam step of size
``lr`` on each controller weight can move a generated bias by about ``lr × 512 × |input|``.  At the 2e-3 that trains
the query decoder, the generated first layer's ReLUs ended up dead (the mask is a constant per window) and the head
never fitted even the brain, which the query decoder fits within a few hundred steps (docs/results/README.md, fusion
study).  CLIP-Universal trains at 1e-4; the fusion study's ``dynamic_head_low_lr`` variant uses 2e-4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlseg.models.features import Fusion, FusionOutput, ImageFeatures, check_presence, max_logit_presence
from vlseg.registry import FUSIONS


@FUSIONS.register("dynamic_head")
class DynamicHead(Fusion):
    """CLIP-Driven Universal Model: projected text embedding ⊕ global image vector → controller → dynamic head."""

    def __init__(self, text_dim: int, feature_channels: list[int], embed_dim: int, head_channels: int = 8,
                 head_layers: int = 3, code_dim: int | None = 256, global_dim: int = 256, code_relu: bool = False,
                 param_order: str = "per_layer", presence: str = "head"):
        super().__init__()
        if head_layers < 1:
            raise ValueError("fusion.head_layers must be at least 1")
        if param_order not in ("per_layer", "weights_first"):
            raise ValueError(f"fusion.param_order={param_order!r}: choose 'per_layer' or 'weights_first'")
        check_presence(presence)
        self.head_channels, self.head_layers = head_channels, head_layers
        self.code_relu, self.param_order = bool(code_relu), param_order
        # The global image vector: normalised, rectified bottleneck features, averaged, projected.
        bottleneck = feature_channels[-1]
        self.global_proj = nn.Sequential(nn.GroupNorm(min(16, bottleneck), bottleneck), nn.ReLU(inplace=True),
                                         nn.AdaptiveAvgPool3d(1), nn.Conv3d(bottleneck, global_dim, 1))
        # The class code: a projected text embedding (CLIP-Universal), or the raw code (DoDNet: code_dim=None).
        self.code_proj = nn.Linear(text_dim, code_dim) if code_dim else None
        controller_in = global_dim + (code_dim or text_dim)
        self.shapes = [(head_channels, head_channels)] * (head_layers - 1) + [(1, head_channels)]
        self.n_params = sum(o * i + o for o, i in self.shapes)
        self.controller = nn.Linear(controller_in, self.n_params)
        self.presence = nn.Linear(controller_in, 1) if presence == "head" else None
        self.voxel_proj = nn.Sequential(nn.GroupNorm(min(16, embed_dim), embed_dim), nn.ReLU(inplace=True),
                                        nn.Conv3d(embed_dim, head_channels, 1))

    def _head_params(self, theta: torch.Tensor):
        """Split ``[B, Q, n_params]`` into per-layer weights ``[B, Q, out, in]`` and biases ``[B, Q, out]``."""
        if self.param_order == "weights_first":
            return self._head_params_weights_first(theta)
        out, i = [], 0
        for o, c in self.shapes:
            w = theta[..., i:i + o * c].unflatten(-1, (o, c))
            i += o * c
            b = theta[..., i:i + o]
            i += o
            out.append((w, b))
        return out

    def _head_params_weights_first(self, theta: torch.Tensor):
        sizes = [o * c for o, c in self.shapes] + [o for o, _ in self.shapes]
        parts = torch.split(theta, sizes, dim=-1)
        n = len(self.shapes)
        return [(parts[k].unflatten(-1, self.shapes[k]), parts[n + k]) for k in range(n)]

    def forward(self, features: ImageFeatures, prompts: torch.Tensor,
                query_mask: torch.Tensor | None = None) -> FusionOutput:
        """``prompts`` ``[B, Q, text_dim]``; every query has its own head, so ``query_mask`` changes nothing."""
        g = self.global_proj(features.decoder[-1]).flatten(1)  # [B, G]
        code = self.code_proj(prompts.to(g.dtype)) if self.code_proj is not None else prompts.to(g.dtype)
        code = F.relu(code) if self.code_relu else code
        ctrl_in = torch.cat([g[:, None].expand(-1, code.shape[1], -1), code], dim=-1)  # [B, Q, G + C]
        theta = self.controller(ctrl_in)
        x = self.voxel_proj(features.voxel_embedding.to(g.dtype))  # [B, 8, D, H, W]
        params = self._head_params(theta)
        w, b = params[0]
        h = torch.einsum("bqoc,bcxyz->bqoxyz", w, x) + b[..., None, None, None]
        for w, b in params[1:]:
            h = torch.einsum("bqoc,bqcxyz->bqoxyz", w, F.relu(h)) + b[..., None, None, None]
        logits = h[:, :, 0]
        if self.presence is None:
            return FusionOutput(logits, max_logit_presence(logits))
        return FusionOutput(logits, self.presence(ctrl_in).squeeze(-1))


@FUSIONS.register("dodnet")
class DoDNetHead(DynamicHead):
    """DoDNet: the class code enters the controller as it is — pair it with ``text_encoder: {name: onehot,
    fixed: true}`` for DoDNet's one-hot task encoding (no text)."""

    def __init__(self, text_dim: int, feature_channels: list[int], embed_dim: int, head_channels: int = 8,
                 head_layers: int = 3, global_dim: int = 256):
        super().__init__(text_dim, feature_channels, embed_dim, head_channels, head_layers, None, global_dim)
