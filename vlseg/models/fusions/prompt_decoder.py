"""A prompt-conditioned U-Net decoder (VoxTell's multi-stage fusion).

The prompts first read the image: projected text embeddings are the queries of a pre-norm transformer decoder whose
memory is one encoder stage (with fixed 3D sinusoidal positions on the keys).  Each decoded query is then projected,
once per decoder stage, into channel weights; at every fused stage the decoder's features are contracted with those
weights into ``channels_per_prompt`` extra maps that are concatenated to the features and carried up to the next stage.
The finest stage's features are contracted with the last projection into the mask logits.

Because the extra channels depend on the prompt, the decoder runs once per prompt (the encoder once per window).
``prompts_per_pass`` prompts share one pass as a batch: more is faster, one is leanest.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from vlseg.errors import VlsegError
from vlseg.models.features import Fusion, FusionOutput, ImageFeatures, max_logit_presence
from vlseg.models.fusions.query_decoder import DecoderLayer, index_positions_3d, mlp
from vlseg.models.lean import lean_finest_stage, lean_stage_applies
from vlseg.registry import FUSIONS


@FUSIONS.register("prompt_decoder")
class PromptDecoder(Fusion):
    """Arguments: ``query_dim`` (transformer width), ``heads``, ``layers``, ``ffn_dim``, ``text_hidden`` (hidden width
    of the text projection), ``stage_hidden`` (of the per-stage projections), ``memory_stage`` (the encoder scale the
    queries read), ``memory_grid`` (its token grid for a full window: the stored positions; other grids get the same
    formula), ``fused_stages`` (decoder stages conditioned, counted from the finest), ``channels_per_prompt`` (maps
    added per fused stage), ``n_conv_per_stage`` (convs per decoder stage), ``prompts_per_pass``, ``dropout``.

    No presence head: the presence logit is the window's highest mask logit ("some voxel is positive").
    """

    needs_decoder = False

    def __init__(self, text_dim: int, feature_channels: list[int], embed_dim, strides, query_dim: int = 2048,
                 heads: int = 8, layers: int = 6, ffn_dim: int = 2048, text_hidden: int = 2048,
                 stage_hidden: int = 2048, memory_stage: int = 4, memory_grid=(12, 12, 12), fused_stages: int = 5,
                 channels_per_prompt: int = 32, n_conv_per_stage=1, prompts_per_pass: int = 1, dropout: float = 0.1):
        super().__init__()
        n = len(feature_channels)
        if not 1 <= fused_stages <= n - 1:
            raise VlsegError(f"fusion.fused_stages={fused_stages}: must be 1..{n - 1} for {n} encoder stages")
        if not 0 <= memory_stage < n:
            raise VlsegError(f"fusion.memory_stage={memory_stage}: must be 0..{n - 1}")
        self.channels_per_prompt, self.fused_stages = int(channels_per_prompt), int(fused_stages)
        self.memory_stage, self.prompts_per_pass = int(memory_stage), max(1, int(prompts_per_pass))
        self.memory_proj = mlp([feature_channels[memory_stage], query_dim, query_dim])
        self.text_proj = mlp([text_dim, text_hidden, query_dim])
        # stage_proj[i] conditions the decoder's output at scale i (0: input resolution, where it gives the mask).
        self.stage_proj = nn.ModuleList(
            mlp([query_dim, stage_hidden, feature_channels[i] * (1 if i == 0 else self.channels_per_prompt)])
            for i in range(self.fused_stages))
        # [tokens, 1, dim], as VoxTell stores it; the cross-attention-only pre-norm layers with a ReLU feed-forward
        # are SAT's too
        self.register_buffer("pos_embed", index_positions_3d(tuple(memory_grid), query_dim)[:, None])
        self.layers = nn.ModuleList(DecoderLayer(query_dim, heads, False, dropout, ffn_dim, "relu",
                                                 residual_dropout=True) for _ in range(layers))
        self.norm = nn.LayerNorm(query_dim)
        self._build_decoder(feature_channels, strides, n_conv_per_stage)

    def _build_decoder(self, channels: list[int], strides, n_conv_per_stage) -> None:
        """Per step up from scale s+1 to s: a transposed conv, a conv stack over [up-sampled, skip] and (for deep
        supervision) a 1×1×1 head; the input below a fused scale carries the prompt's extra channels."""
        from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

        n = len(channels)
        convs = list(n_conv_per_stage) if isinstance(n_conv_per_stage, (list, tuple)) else [n_conv_per_stage] * (n - 1)
        norm = {"norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                "dropout_op_kwargs": None, "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}
        self.transpconvs, self.stages, self.seg_layers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for k in range(n - 1):  # k = 0 is the coarsest step (bottleneck → scale n-2)
            below, scale = n - 1 - k, n - 2 - k
            extra = self.channels_per_prompt if below < self.fused_stages else 0
            stride = tuple(int(v) for v in strides[below])
            self.transpconvs.append(nn.ConvTranspose3d(channels[below] + extra, channels[scale], stride, stride,
                                                       bias=True))
            self.stages.append(StackedConvBlocks(int(convs[k]), nn.Conv3d, 2 * channels[scale], channels[scale], 3, 1,
                                                 True, **norm))
            self.seg_layers.append(nn.Conv3d(channels[scale] + self.channels_per_prompt, 1, 1, 1, 0, bias=True))

    def _positions(self, grid) -> torch.Tensor:
        if self.pos_embed.shape[0] == math.prod(grid):
            return self.pos_embed
        return index_positions_3d(grid, self.pos_embed.shape[-1])[:, None].to(self.pos_embed)

    def decode_queries(self, memory_feature: torch.Tensor, prompts: torch.Tensor) -> list[torch.Tensor]:
        """Per fused scale (finest first), each prompt's channel weights ``[B, Q, C_scale · channels]``."""
        grid = tuple(memory_feature.shape[2:])
        # Tokens ordered as VoxTell orders them: the array's second, third, then first spatial axis.
        memory = self.memory_proj(rearrange(memory_feature, "b c d h w -> b (h w d) c"))
        keys = memory + self._positions((grid[1], grid[2], grid[0])).transpose(0, 1)
        q = self.text_proj(prompts)
        for layer in self.layers:
            q = layer(q, keys, memory, None)
        q = self.norm(q)
        return [proj(q) for proj in self.stage_proj]

    def run_decoder(self, skips: list[torch.Tensor], weights: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """The decoder for ``P`` prompts at once: ``skips`` of batch B, ``weights[i]`` ``[B, P, ...]``.  Returns the
        mask logits ``[B, P, *grid]`` and the deep-supervision logits (coarse heads, finest first) when training."""
        b, p = weights[0].shape[:2]
        below = skips[-1].repeat_interleave(p, dim=0) if p > 1 else skips[-1]
        heads = []
        for k, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            scale = len(skips) - 2 - k
            skip = skips[scale].repeat_interleave(p, dim=0) if p > 1 else skips[scale]
            if scale == 0 and lean_stage_applies(up, stage) and not torch.is_grad_enabled():
                x = lean_finest_stage(up, stage, below, skip)
            else:
                x = stage(torch.cat((up(below), skip), dim=1))
            w = weights[scale].reshape(b * p, -1, x.shape[1]) if scale < self.fused_stages else None
            if scale == 0:
                logits = torch.einsum("bcxyz,bkc->bkxyz", x, w).reshape(b, p, *x.shape[2:])
                return logits, heads[::-1]
            if w is not None:
                x = torch.cat((x, torch.einsum("bcxyz,bkc->bkxyz", x, w)), dim=1)
                if self.training:
                    heads.append(self.seg_layers[k](x).reshape(b, p, *x.shape[2:]))
            below = x
        raise AssertionError("unreachable: the finest scale returns")

    def forward(self, features: ImageFeatures, prompts: torch.Tensor,
                query_mask: torch.Tensor | None = None) -> FusionOutput:
        skips = features.skips
        weights = self.decode_queries(skips[self.memory_stage], prompts)
        masks, supervision = [], []
        for start in range(0, prompts.shape[1], self.prompts_per_pass):
            logits, heads = self.run_decoder(skips, [w[:, start:start + self.prompts_per_pass] for w in weights])
            masks.append(logits)
            supervision.append(heads)
        mask_logits = torch.cat(masks, dim=1)
        deep = tuple(torch.cat(level, dim=1) for level in zip(*supervision)) if self.training else ()
        return FusionOutput(mask_logits, max_logit_presence(mask_logits), deep)
