"""SAT-style query decoder: prompt embeddings become queries that cross-attend multi-scale image tokens.

Each decoded query yields a mask (its embedding dotted with the per-voxel embedding → logits) and a presence logit
(is the target in this crop at all).  Sigmoid per query, so overlapping targets are fine.  Written here rather than
taken from a library because the masked, variable-length query handling and the presence head are specific to it.

Switches that turn it into SAT's decoder exactly (``configs/released/sat-*.yaml``; imported weights map one to one):
SAT's positions (``positions: sat``: integer voxel indices, not normalised coordinates), keys and values left
unnormalised and without a level embedding, the text embedding used as the query as it is, a ReLU feed-forward,
Linear–GELU heads that end with a GELU as well, plain dot-product logits (no learned scale or bias) and, having no
presence head, the window's largest mask logit as the presence logit ("some voxel is positive").
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlseg.models.features import Fusion, FusionOutput, ImageFeatures, check_presence, max_logit_presence
from vlseg.registry import FUSIONS


@functools.lru_cache(maxsize=64)
def _positions(shape: tuple[int, int, int], dim: int, device: str) -> torch.Tensor:
    return sinusoidal_positions_3d(shape, dim, device)


@functools.lru_cache(maxsize=64)
def _index_positions(shape: tuple[int, int, int], dim: int, device: str) -> torch.Tensor:
    return index_positions_3d(shape, dim, device)


def index_positions_3d(shape, dim: int, device=None) -> torch.Tensor:
    """The fixed 3D encoding of the ``positional_encodings`` package's ``PositionalEncoding3D`` (6.0.1, as SAT uses
    it, and 6.0.3, as VoxTell does: the same numbers): ``[prod(shape), dim]``, tokens in x-major order.

    Each axis gets a block of ``c = 2 * ceil(dim / 6)`` channels: for frequencies ``f_k = 10000 ** (-2k / c)``, the
    pair ``sin(i * f_k), cos(i * f_k)`` side by side, ``i`` the integer voxel index along that axis.  The blocks of x,
    y and z follow one another and the result is cut to ``dim`` channels.  Unlike ``sinusoidal_positions_3d`` the
    encoding depends on the grid's size, not only on the place: it is right for the window size a model was trained on.
    """
    per_axis = 2 * math.ceil(dim / 6)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, per_axis, 2, device=device).float() / per_axis))
    blocks = []
    for axis, n in enumerate(shape):
        angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [n, c/2]
        block = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n, per_axis)
        view = [1, 1, 1, per_axis]
        view[axis] = n
        blocks.append(block.reshape(view).expand(*shape, per_axis))
    return torch.cat(blocks, dim=-1)[..., :dim].reshape(-1, dim)


def sinusoidal_positions_3d(shape, dim: int, device=None) -> torch.Tensor:
    """Fixed 3D sinusoidal encoding of normalised voxel-centre coordinates: ``[prod(shape), dim]``.

    Coordinates are in [0, 1] for every grid, so tokens at different scales that cover the same place agree.
    """
    per_axis = (dim // 6) * 2
    freqs = torch.exp(torch.arange(per_axis // 2, device=device) * (-math.log(1000.0) / max(per_axis // 2, 1)))
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [N, 3]
    angles = grid[:, :, None] * freqs[None, None, :] * 2 * math.pi * 16  # [N, 3, F]
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(grid.shape[0], -1)
    return F.pad(enc, (0, dim - enc.shape[1]))


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def mlp(sizes: list[int], last_activation: bool = False) -> nn.Sequential:
    """Linear layers with a GELU between them (indices 0, 2, …), and after the last one too if ``last_activation``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class DecoderLayer(nn.Module):
    """Pre-norm: (self-attention between the queries), cross-attention to the keys, a feed-forward.
    ``residual_dropout``: dropout on each branch before it is added back as well (DETR's layer, as VoxTell trains it).
    """

    def __init__(self, dim: int, heads: int, self_attention: bool, dropout: float, ffn_dim: int | None = None,
                 activation: str = "gelu", residual_dropout: bool = False):
        super().__init__()
        ffn_dim = ffn_dim or 4 * dim
        self.self_attn = (nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if self_attention
                          else None)
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), _ACTIVATIONS[activation](), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        branch = (lambda: nn.Dropout(dropout)) if residual_dropout else nn.Identity
        self.drop_cross, self.drop_ffn = branch(), branch()

    def forward(self, q, keys, values, query_pad):
        if self.self_attn is not None:
            h = self.norm_self(q)
            q = q + self.self_attn(h, h, h, key_padding_mask=query_pad, need_weights=False)[0]
        h = self.norm_cross(q)
        q = q + self.drop_cross(self.cross_attn(h, keys, values, need_weights=False)[0])
        return q + self.drop_ffn(self.ffn(self.norm_ffn(q)))


def _check_switches(text_dim: int, dim: int, positions: str, project_queries: bool, ffn_activation: str,
                    presence: str) -> None:
    if positions not in ("normalized", "sat"):
        raise ValueError(f"fusion.positions={positions!r}: use 'normalized' or 'sat'")
    if ffn_activation not in _ACTIVATIONS:
        raise ValueError(f"fusion.ffn_activation={ffn_activation!r}: use {' or '.join(map(repr, _ACTIVATIONS))}")
    check_presence(presence)
    if not project_queries and int(text_dim) != int(dim):
        raise ValueError(f"fusion.project_queries=false needs text embeddings as wide as fusion.dim ({text_dim} vs "
                         f"{dim})")


@FUSIONS.register("query_decoder")
class QueryDecoder(Fusion):
    """Settings beyond width and depth, each an ablation switch:

    * ``key_scales``: which feature maps the queries attend (indices into fine → coarse, -1 the bottleneck);
    * ``key_fusion``: ``tokens`` — each chosen scale is its own set of tokens (pooled to at most
      ``max_tokens_per_scale``), told apart by a learned level embedding; ``concat`` — SAT: every chosen scale is
      average-pooled to the coarsest one's grid, the maps are concatenated along channels and an MLP
      (``key_hidden`` wide) projects them to one set of tokens;
    * ``key_source``: ``decoder`` (the decoder's stages) or ``encoder`` (the encoder's skips, as SAT);
    * ``self_attention`` between queries, ``ffn_dim`` (default 4 × dim), ``mask_hidden`` (the mask head's width);
    * ``deep_supervision``: N > 0 adds mask heads on the next N finer decoder stages (1/2, 1/4 … resolution when the
      first stride is 1), as SAT does; their logits (training only) enter the loss with weights halving per level;
      ``aux_hidden``: those heads' widths, one per level (default ``mask_hidden``);
    * SAT's own choices (see the module's docstring): ``positions`` (``normalized`` or ``sat``), ``key_norm``,
      ``level_embedding``, ``project_queries`` (False: the text embedding is the query; needs ``text_dim == dim``),
      ``ffn_activation`` (``gelu`` or ``relu``), ``head_activation`` (a GELU after the heads' last layer too),
      ``logit_affine`` (a learned logit scale and bias), ``presence`` (``head`` or ``max_logit``).
    """

    def __init__(self, text_dim: int, feature_channels: list[int], embed_dim: int, dim: int = 128, layers: int = 2,
                 heads: int = 4, self_attention: bool = True, key_scales=(-1, -2), dropout: float = 0.0,
                 max_tokens_per_scale: int = 512, ffn_dim: int | None = None, key_fusion: str = "tokens",
                 key_source: str = "decoder", key_hidden: int | None = None, mask_hidden: int | None = None,
                 deep_supervision: int = 0, aux_hidden: list[int] | None = None, positions: str = "normalized",
                 key_norm: bool = True, level_embedding: bool = True, project_queries: bool = True,
                 ffn_activation: str = "gelu", head_activation: bool = False, logit_affine: bool = True,
                 presence: str = "head"):
        super().__init__()
        _check_switches(text_dim, dim, positions, project_queries, ffn_activation, presence)
        if key_fusion not in ("tokens", "concat"):
            raise ValueError(f"fusion.key_fusion={key_fusion!r}: use 'tokens' or 'concat'")
        if key_source not in ("decoder", "encoder"):
            raise ValueError(f"fusion.key_source={key_source!r}: use 'decoder' or 'encoder'")
        if not 0 <= int(deep_supervision) < len(feature_channels):
            raise ValueError(f"fusion.deep_supervision={deep_supervision}: between 0 and {len(feature_channels) - 1}")
        self.key_scales = [int(k) for k in key_scales]
        self.key_fusion, self.key_source = key_fusion, key_source
        self.max_tokens = max_tokens_per_scale
        self.positions, self.presence = positions, presence
        # (the encoder's skips, where used, have the same widths as the decoder stages at each scale)
        key_channels = [feature_channels[k] for k in self.key_scales]
        self.query_proj = mlp([text_dim, dim, dim], False) if project_queries else nn.Identity()
        if key_fusion == "tokens":
            self.key_proj = nn.ModuleList(nn.Linear(c, dim) for c in key_channels)
        else:
            self.key_proj = mlp([sum(key_channels), key_hidden or dim, dim], True)
        levels = len(self.key_scales) if key_fusion == "tokens" else 1
        self.level_embed = nn.Parameter(torch.zeros(levels, dim)) if level_embedding else None
        self.key_norm = nn.LayerNorm(dim) if key_norm else nn.Identity()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, self_attention, dropout, ffn_dim, ffn_activation)
                                    for _ in range(layers))
        self.out_norm = nn.LayerNorm(dim)
        mask_hidden = mask_hidden or dim
        self.mask_head = mlp([dim, mask_hidden, embed_dim], head_activation)
        self.presence_head = mlp([dim, dim // 2, 1], False) if presence == "head" else None
        # One-element vectors rather than 0-d scalars: DeepSpeed broadcasts parameters as byte views, which 0-d
        # tensors cannot give.
        self.logit_scale = nn.Parameter(torch.full((1,), 1.0 / math.sqrt(embed_dim))) if logit_affine else None
        # (targets are small: start from "mostly background")
        self.logit_bias = nn.Parameter(torch.full((1,), -2.0)) if logit_affine else None
        self._init_aux_heads(dim, feature_channels, int(deep_supervision), aux_hidden or mask_hidden, head_activation,
                             logit_affine)
        self.activation_checkpointing = False  # recompute each layer in backward (train.activation_checkpointing)

    def _init_aux_heads(self, dim: int, feature_channels: list[int], levels: int, hidden, activation: bool,
                        affine: bool) -> None:
        """Deep supervision: a mask head per finer decoder stage, dotted with that stage's own features."""
        self.aux_levels = list(range(1, levels + 1))
        widths = list(hidden) if isinstance(hidden, (list, tuple)) else [hidden] * levels
        if len(widths) != levels:
            raise ValueError(f"fusion.aux_hidden: {len(widths)} widths for deep_supervision={levels}")
        self.aux_heads = nn.ModuleList(mlp([dim, int(width), feature_channels[level]], activation)
                                       for level, width in zip(self.aux_levels, widths))
        self.aux_scales = nn.Parameter(torch.tensor([1.0 / math.sqrt(feature_channels[level])
                                                     for level in self.aux_levels])) if self.aux_levels and affine \
            else None

    @staticmethod
    def _pool(fmap: torch.Tensor, size=None) -> torch.Tensor:
        # (torch has no bf16 3D average pooling on CPU, which a pure-bf16 DeepSpeed model would need)
        x = fmap.float() if fmap.device.type == "cpu" else fmap
        x = F.adaptive_avg_pool3d(x, size) if size is not None else F.avg_pool3d(x, 2, stride=2, ceil_mode=True)
        return x.to(fmap.dtype)

    def _sources(self, features: ImageFeatures) -> list[torch.Tensor]:
        maps = features.skips if self.key_source == "encoder" else features.decoder
        return [maps[k] for k in self.key_scales]

    def _with_positions(self, tokens: torch.Tensor, shape, level: int):
        # The same grids recur every step and every window: the (fixed) encodings are computed once per shape.
        table = _index_positions if self.positions == "sat" else _positions
        pos = table(tuple(int(n) for n in shape), tokens.shape[-1], str(tokens.device)).to(tokens.dtype)
        value = tokens if self.level_embed is None else tokens + self.level_embed[level]
        return value + pos, value

    def _tokens(self, features: ImageFeatures):
        keys, values = [], []
        sources = self._sources(features)
        if self.key_fusion == "concat":
            grid = min((m.shape[2:] for m in sources), key=lambda s: s.numel())
            fmap = torch.cat([m if m.shape[2:] == grid else self._pool(m, tuple(grid)) for m in sources], dim=1)
            while fmap.shape[2:].numel() > self.max_tokens:
                fmap = self._pool(fmap)
            key, value = self._with_positions(self.key_proj(rearrange(fmap, "b c x y z -> b (x y z) c")),
                                              fmap.shape[2:], 0)
            keys.append(key)
            values.append(value)
        else:
            for level, (fmap, proj) in enumerate(zip(sources, self.key_proj)):
                while fmap.shape[2:].numel() > self.max_tokens:  # bound attention cost on fine scales
                    fmap = self._pool(fmap)
                key, value = self._with_positions(proj(rearrange(fmap, "b c x y z -> b (x y z) c")), fmap.shape[2:],
                                                  level)
                keys.append(key)
                values.append(value)
        keys, values = torch.cat(keys, 1), torch.cat(values, 1)
        return self.key_norm(keys), self.key_norm(values)

    def forward(self, features: ImageFeatures, prompts: torch.Tensor,
                query_mask: torch.Tensor | None = None) -> FusionOutput:
        """``prompts`` ``[B, Q, text_dim]``; ``query_mask`` ``[B, Q]`` True for real (non-padding) queries."""
        keys, values = self._tokens(features)
        q = self.query_proj(prompts.to(keys.dtype))
        pad = None if query_mask is None else ~query_mask.bool()
        if pad is not None and pad.all(dim=1).any():
            pad = pad.clone()
            pad[pad.all(dim=1), 0] = False  # an all-padding row would make attention NaN; its outputs are ignored
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                q = checkpoint(layer, q, keys, values, pad, use_reentrant=False)
            else:
                q = layer(q, keys, values, pad)
        q = self.out_norm(q)
        logits = self._dot(self.mask_head(q), features.voxel_embedding, None)
        if self.presence_head is not None:
            presence = self.presence_head(q).squeeze(-1)
        else:  # no presence head (SAT): "present" when some voxel of the window is positive
            presence = max_logit_presence(logits)
        if not (self.aux_levels and self.training):
            return FusionOutput(logits, presence)
        scales = self.aux_scales if self.aux_scales is not None else [None] * len(self.aux_levels)
        coarser = tuple(self._dot(head(q), features.decoder[level], scale)
                        for level, head, scale in zip(self.aux_levels, self.aux_heads, scales))
        return FusionOutput(logits, presence, coarser)

    def _dot(self, mask_vec: torch.Tensor, fmap: torch.Tensor, aux_scale) -> torch.Tensor:
        """Mask logits: each query's vector dotted with every voxel's features, then the learned scale and bias."""
        logits = torch.einsum("bqe,bexyz->bqxyz", mask_vec, fmap.to(mask_vec.dtype))
        if self.logit_bias is None:
            return logits
        return logits * (self.logit_scale if aux_scale is None else aux_scale) + self.logit_bias
