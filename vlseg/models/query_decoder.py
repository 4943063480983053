"""SAT-style query decoder: prompt embeddings become queries that cross-attend multi-scale image tokens.

Each decoded query yields a mask (its embedding dotted with the per-voxel embedding → logits) and a presence logit
(is the target in this crop at all).  Sigmoid per query, so overlapping targets are fine.  Written here rather than
taken from a library because the masked, variable-length query handling and the presence head are specific to it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlseg.models.unet import ImageFeatures
from vlseg.registry import FUSIONS


@functools.lru_cache(maxsize=64)
def _positions(shape: tuple[int, int, int], dim: int, device: str) -> torch.Tensor:
    return sinusoidal_positions_3d(shape, dim, device)


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


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, self_attention: bool, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if self_attention else None
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, q, keys, values, query_pad):
        if self.self_attn is not None:
            h = self.norm_self(q)
            q = q + self.self_attn(h, h, h, key_padding_mask=query_pad, need_weights=False)[0]
        h = self.norm_cross(q)
        q = q + self.cross_attn(h, keys, values, need_weights=False)[0]
        return q + self.ffn(self.norm_ffn(q))


@FUSIONS.register("query_decoder")
class QueryDecoder(nn.Module):
    def __init__(self, text_dim: int, feature_channels: list[int], embed_dim: int, dim: int = 128, layers: int = 2,
                 heads: int = 4, self_attention: bool = True, key_scales=(-1, -2), dropout: float = 0.0,
                 max_tokens_per_scale: int = 512):
        super().__init__()
        self.key_scales = [int(k) for k in key_scales]
        self.max_tokens = max_tokens_per_scale
        self.query_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.key_proj = nn.ModuleList(nn.Linear(feature_channels[k], dim) for k in self.key_scales)
        self.level_embed = nn.Parameter(torch.zeros(len(self.key_scales), dim))
        self.key_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, self_attention, dropout) for _ in range(layers))
        self.out_norm = nn.LayerNorm(dim)
        self.mask_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, embed_dim))
        self.presence_head = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 1))
        # One-element vectors rather than 0-d scalars: DeepSpeed broadcasts parameters as byte views, which 0-d
        # tensors cannot give.
        self.logit_scale = nn.Parameter(torch.full((1,), 1.0 / math.sqrt(embed_dim)))
        self.logit_bias = nn.Parameter(torch.full((1,), -2.0))  # targets are small: start from "mostly background"
        self.activation_checkpointing = False  # recompute each layer in backward (train.activation_checkpointing)

    def _tokens(self, features: ImageFeatures):
        keys, values = [], []
        for level, (k, proj) in enumerate(zip(self.key_scales, self.key_proj)):
            fmap = features.multiscale[k]
            while fmap.shape[2:].numel() > self.max_tokens:  # bound attention cost on fine scales
                # (torch has no bf16 3D average pooling on CPU, which a pure-bf16 DeepSpeed model would need)
                pooled = F.avg_pool3d(fmap.float() if fmap.device.type == "cpu" else fmap, kernel_size=2, stride=2,
                                      ceil_mode=True)
                fmap = pooled.to(fmap.dtype)
            tokens = proj(rearrange(fmap, "b c x y z -> b (x y z) c"))
            # The same grids recur every step and every window: the (fixed) encodings are computed once per shape.
            pos = _positions(tuple(fmap.shape[2:]), tokens.shape[-1], str(tokens.device)).to(tokens.dtype)
            values.append(tokens + self.level_embed[level])
            keys.append(tokens + self.level_embed[level] + pos)
        keys, values = torch.cat(keys, 1), torch.cat(values, 1)
        return self.key_norm(keys), self.key_norm(values)

    def forward(self, features: ImageFeatures, prompts: torch.Tensor, query_mask: torch.Tensor | None = None) -> dict:
        """``prompts`` ``[B, Q, text_dim]``; ``query_mask`` ``[B, Q]`` True for real (non-padding) queries.

        Returns ``mask_logits [B, Q, D, H, W]`` and ``presence_logits [B, Q]``.
        """
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
        mask_vec = self.mask_head(q)
        logits = torch.einsum("bqe,bexyz->bqxyz", mask_vec, features.voxel_embedding.to(mask_vec.dtype))
        logits = logits * self.logit_scale + self.logit_bias
        return {"mask_logits": logits, "presence_logits": self.presence_head(q).squeeze(-1)}
