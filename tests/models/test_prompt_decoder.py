"""The prompt-conditioned decoder's lean finest stage: the same numbers as the plain stage, without its
full-resolution temporaries."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn

from vlseg.models.lean import lean_finest_stage, lean_stage_applies


def _stage(convs: int = 1):
    return StackedConvBlocks(convs, nn.Conv3d, 16, 8, 3, 1, True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
                             None, None, nn.LeakyReLU, {"inplace": True})


@pytest.mark.parametrize("slab", [1, 4, 5, 40])
def test_lean_finest_stage_equals_the_plain_one(slab):
    torch.manual_seed(0)
    up, stage = nn.ConvTranspose3d(12, 8, 2, 2), _stage()
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(0.3 * torch.randn_like(p))
        below, skip = torch.randn(2, 12, 9, 7, 5), torch.randn(2, 8, 18, 14, 10)
        expected = stage(torch.cat((up(below), skip), 1))
        got = lean_finest_stage(up, stage, below, skip, slab=slab)
    assert torch.allclose(got, expected, atol=1e-5)


def test_lean_stage_only_where_it_applies():
    assert lean_stage_applies(nn.ConvTranspose3d(12, 8, 2, 2), _stage())
    assert not lean_stage_applies(nn.ConvTranspose3d(12, 8, 2, 2), _stage(convs=2))
    assert not lean_stage_applies(nn.ConvTranspose3d(12, 8, 3, 2), _stage())
