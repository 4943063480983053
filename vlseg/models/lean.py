"""Memory-lean inference for nnU-Net's network library's blocks (dynamic-network-architectures).

At a 192³ window a 32-channel feature map is 0.9 GB, and the library's blocks, run as written, hold several at once:
a conv's output beside its input, the norm's output beside the conv's, the decoder's up-sampled features and their
concatenation with the skip.  Without gradients the same numbers come from less:

* ``slab_conv``: a stride-1 conv a slab of planes at a time (no full-size workspace), written over its own input when
  that is no longer needed, or reading planes built on demand (the decoder's up-sampled, concatenated input);
* ``instance_norm_``: InstanceNorm in place, its statistics one channel at a time;
* ``lean_encoder_forward`` and ``lean_finest_stage``: an encoder's skips and the finest decoder step built from those.

Used by ``vlseg.models.encoders.nnunet`` and ``vlseg.models.fusions.prompt_decoder`` when gradients are off; tests
check each against the library's own forward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Planes = Callable[[int, int], torch.Tensor]  # (first, stop) → those planes of a conv's input, along its first axis


def instance_norm_(x: torch.Tensor, norm: nn.InstanceNorm3d) -> torch.Tensor:
    """``norm(x)`` computed in place (inference: no running statistics, affine InstanceNorm); the statistics are
    taken one channel at a time, so no temporary of ``x``'s size is made."""
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            var, mean = torch.var_mean(x[b, c], unbiased=False)
            scale = torch.rsqrt(var + norm.eps) * norm.weight[c]
            x[b, c].sub_(mean).mul_(scale).add_(norm.bias[c])
    return x


def _slabs_apply(conv: nn.Conv3d) -> bool:
    """A stride-1, ungrouped conv with odd kernels padded to keep the size: its output planes can be made a slab at a
    time from the input planes around them."""
    k, pad = conv.kernel_size, conv.padding
    return (tuple(conv.stride) == (1, 1, 1) and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1
            and not isinstance(pad, str) and all(p == n // 2 and n % 2 for p, n in zip(pad, k)))


def slab_conv(conv: nn.Conv3d, x: torch.Tensor | Planes, slab: int = 16, inplace: bool = False,
              depth: int | None = None) -> torch.Tensor:
    """``conv(x)`` a slab of planes at a time (see the module docstring).  ``x``: a tensor, or a function giving the
    input's planes on demand (then ``depth`` is their number).  ``inplace`` (a tensor ``x`` no longer needed, as many
    output channels as input ones): each slab's result is written over ``x`` once no later slab reads those planes."""
    planes = x if callable(x) else (lambda a, b: x[:, :, a:b])
    depth = int(depth) if callable(x) else x.shape[2]
    if not _slabs_apply(conv) or depth <= slab:
        return conv(planes(0, depth))
    inplace = inplace and not callable(x) and conv.in_channels == conv.out_channels
    halo, out = conv.kernel_size[0] // 2, x if inplace else None
    pending: list[tuple[int, int, torch.Tensor]] = []
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        a, b = max(z0 - halo, 0), min(z1 + halo, depth)
        part = F.pad(planes(a, b), (0, 0, 0, 0, halo - (z0 - a), halo - (b - z1)))
        result = F.conv3d(part, conv.weight, conv.bias, 1, (0, *conv.padding[1:]))
        if out is None:
            out = result.new_empty(result.shape[0], result.shape[1], depth, *result.shape[3:])
        pending.append((z0, z1, result))
        while pending and (not inplace or pending[0][1] <= z1 - halo):  # planes the next slabs no longer read
            p0, p1, done = pending.pop(0)
            out[:, :, p0:p1] = done
    for p0, p1, done in pending:
        out[:, :, p0:p1] = done
    return out


def lean_conv_block(block: nn.Module, x: torch.Tensor | Planes, inplace: bool = False, depth: int | None = None,
                    slab: int = 16) -> torch.Tensor:
    """The library's conv → (dropout) → norm → nonlinearity block, the conv by slabs (see ``slab_conv``) and the
    norm in place; a block with another norm runs as written."""
    norm = getattr(block, "norm", None)
    if not isinstance(norm, nn.InstanceNorm3d) or not norm.affine or norm.track_running_stats:
        return block(x(0, depth) if callable(x) else x)
    y = instance_norm_(slab_conv(block.conv, x, slab, inplace, depth), norm)
    nonlin = getattr(block, "nonlin", None)
    return nonlin(y) if nonlin is not None else y


def _lean_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One encoder part: conv stacks and residual blocks as ``lean_conv_block``s (a residual block adds its skip in
    place); anything else runs as written."""
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

    if isinstance(module, nn.Sequential) or isinstance(getattr(module, "blocks", None), nn.Sequential):
        for part in (module if isinstance(module, nn.Sequential) else module.blocks):
            x = _lean_module(part, x)
        return x
    if isinstance(module, StackedConvBlocks):  # the first conv reads the caller's tensor, later ones their own
        for i, block in enumerate(module.convs):
            x = lean_conv_block(block, x, inplace=i > 0)
        return x
    if isinstance(module, BasicBlockD) and not module.apply_stochastic_depth and not module.apply_se:
        out = lean_conv_block(module.conv2, lean_conv_block(module.conv1, x), inplace=True)
        out += module.skip(x)
        return module.nonlin2(out)
    return module(x)


def lean_encoder_forward(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The library encoder's skips: each full-resolution block holds two fewer full-size volumes at its peak."""
    stem = getattr(encoder, "stem", None)
    if stem is not None:
        x = _lean_module(stem, x)
    skips = []
    for stage in encoder.stages:
        x = _lean_module(stage, x)
        skips.append(x)
    return skips


def lean_stage_applies(up: nn.Module, stage: nn.Module) -> bool:
    """Whether ``lean_finest_stage`` can run this decoder step: a transposed conv whose kernel equals its stride (each
    output plane from one input plane), then a single conv block."""
    convs = getattr(stage, "convs", None)
    return convs is not None and len(convs) == 1 and tuple(up.kernel_size) == tuple(up.stride)


def lean_finest_stage(up: nn.Module, stage: nn.Module, below: torch.Tensor, skip: torch.Tensor,
                      slab: int = 16) -> torch.Tensor:
    """``stage(cat(up(below), skip))`` with the up-sampled features and the concatenation built a slab of planes at a
    time: at a 192³ window with 32 channels, three full-size volumes fewer per prompt."""
    s = up.stride[0]

    def planes(a: int, b: int) -> torch.Tensor:
        upsampled = up(below[:, :, a // s:-(-b // s)])[:, :, a - (a // s) * s:][:, :, :b - a]
        return torch.cat((upsampled, skip[:, :, a:b]), dim=1)

    return lean_conv_block(stage.convs[0], planes, depth=skip.shape[2], slab=slab)
