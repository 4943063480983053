"""Many-prompt sliding-window stitching: same probabilities as MONAI's, memory only for prompts that are found,
masks brought to the scan's grid box by box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from vlseg.config import load_config
from vlseg.infer.stitching import BoxMask, PromptStitcher, stitch, upsample_box, window_starts
from vlseg.models.network import build_network
from vlseg.vocab.vocabulary import Vocabulary


@pytest.mark.parametrize("size,roi,overlap", [(50, 32, 0.5), (45, 32, 0.5), (32, 32, 0.5), (100, 24, 0.25),
                                              (70, 16, 0.75)])
def test_window_starts_are_monais(size, roi, overlap):
    step = max(int(roi * (1 - overlap)), 1) if size > roi else roi
    monai = sorted({s[0].start for s in dense_patch_slices((size,), (roi,), (step,))})
    assert window_starts(size, roi, overlap) == monai


@pytest.fixture(scope="module")
def tiny_net():
    vocab = Vocabulary.load("default").subset({"liver", "spleen", "liver tumor"}, source="test")
    cfg = load_config(None, ["text_encoder.name=onehot", "image_encoder.widths=[8,16,32]",
                             "image_encoder.strides=[1,2,2]", "image_encoder.embed_dim=8", "fusion.dim=32",
                             "fusion.heads=2", "fusion.layers=1", "fusion.self_attention=false"])
    torch.manual_seed(0)
    net, text = build_network(cfg, vocab)
    return net.eval(), text.encode(["liver", "spleen", "liver tumor"])[None]


def _run(net, emb, image, chunk):
    def decode(features, a, b):
        out = net.decode(features, emb[:, a:b].expand(features.batch_size, -1, -1))
        return torch.sigmoid(out.mask_logits), torch.sigmoid(out.presence_logits)

    with torch.no_grad():
        return stitch(image, (32, 32, 16), 0.5, emb.shape[1], net.encode_image, decode, batch_size=2,
                      prompt_chunk=chunk)


def _monai(net, emb, image):
    """The same windows through MONAI's sliding_window_inference (edge-replicating its padding, as vlseg does)."""
    with torch.no_grad():
        return sliding_window_inference(image, (32, 32, 16), 2, lambda w: torch.sigmoid(net(w, emb.expand(
            w.shape[0], -1, -1)).mask_logits), overlap=0.5, mode="gaussian", padding_mode="replicate")[0]


# (50, 45, 30): several windows per axis; (40, 20, 10): short axes, padded on both sides as MONAI does, so a thin scan
# sits in the middle of its windows (padding at one end only would put it at a window's edge).
@pytest.mark.parametrize("shape", [(50, 45, 30), (40, 20, 10)])
def test_stitching_matches_monai_sliding_window(tiny_net, shape):
    net, emb = tiny_net
    image = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    stitcher, presence = _run(net, emb, image, chunk=2)
    ref = _monai(net, emb, image)
    for k in range(3):
        assert stitcher.probability(k).shape == shape
        assert np.abs(stitcher.probability(k) - ref[k].numpy()).max() < 3e-4
    assert presence.shape == (3,) and ((presence > 0) & (presence < 1)).all()


def test_prompt_chunks_do_not_change_the_answer(tiny_net):
    net, emb = tiny_net
    image = torch.randn(1, 1, 50, 45, 30, generator=torch.Generator().manual_seed(1))
    together, presence = _run(net, emb, image, chunk=16)
    one_by_one, presence_1 = _run(net, emb, image, chunk=1)
    for k in range(3):  # (to float rounding)
        assert np.abs(one_by_one.probability(k) - together.probability(k)).max() < 1e-4
    torch.testing.assert_close(presence_1, presence)


def test_prompts_below_the_floor_hold_no_memory():
    stitcher = PromptStitcher((40, 40, 20), (32, 32, 16), 0.5, n_prompts=100)
    probs = torch.zeros(100, 32, 32, 16)
    probs[3, 10:20, 10:20, 5:10] = 0.9
    probs[7] = 0.0005  # below the 1e-3 floor everywhere
    for corner in stitcher.corners:
        stitcher.add(corner, probs)
    assert stitcher.allocated == 1 and stitcher.probability(7) is None
    assert stitcher.probability(3).max() == pytest.approx(0.9, abs=1e-4)
    assert stitcher.sums[3].dtype == np.uint16  # 2 bytes a voxel for a prompt that is found


@pytest.mark.parametrize("out_shape", [(37, 40, 20), (11, 13, 7), (30, 9, 21), (90, 100, 40)])
def test_box_upsampling_equals_full_upsampling(out_shape):
    g = torch.Generator().manual_seed(0)
    prob = F.avg_pool3d(torch.rand(1, 1, 11, 13, 7, generator=g), 3, 1, 1)[0, 0].numpy() * 1.4
    full = F.interpolate(torch.from_numpy(prob)[None, None], size=out_shape, mode="trilinear",
                         align_corners=False)[0, 0].numpy() >= 0.5
    offset, crop = upsample_box(prob, out_shape, 0.5)
    assert full.any() and np.array_equal(np.asarray(BoxMask(out_shape, offset, crop)), full)
    assert crop.shape == tuple(np.ptp(np.argwhere(full), axis=0) + 1)  # trimmed to the positive voxels
    assert upsample_box(prob * 0.1, out_shape, 0.5)[1].size == 0
    slabbed = upsample_box(prob, out_shape, 0.5, slab=3)  # slab by slab: the same answer
    assert slabbed[0] == offset and np.array_equal(slabbed[1], crop)


def test_box_mask_behaves_like_its_array():
    crop = (np.random.default_rng(0).random((3, 4, 2)) > 0.4).astype(np.uint8)
    m = BoxMask((6, 7, 5), (2, 1, 3), crop)
    dense = np.asarray(m)
    assert dense.shape == (6, 7, 5) and dense.dtype == np.uint8 and dense.sum() == crop.sum() == m.sum()
    assert m.any() and not BoxMask((6, 7, 5)).any() and np.asarray(BoxMask((6, 7, 5))).sum() == 0
    for key in [(slice(None), slice(None), 3), (2,), (slice(None), 4, slice(None)), (slice(1, 5), slice(None), 4),
                (5, 5, slice(None)), (0, slice(None), slice(None))]:
        assert np.array_equal(m[key], dense[key]), key
    assert np.array_equal(m.astype(bool), dense.astype(bool))
    assert np.array_equal(np.sort(m.argwhere(), axis=0), np.sort(np.argwhere(dense), axis=0))
