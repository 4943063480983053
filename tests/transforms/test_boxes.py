"""Bounding boxes: of a mask (the stitcher's, the metrics' crop) and of label classes (the manifest's, the cache's),
against the voxels listed one by one."""

import numpy as np
import pytest

from vlseg.transforms.boxes import class_boxes, mask_box


def listed_box(mask: np.ndarray):
    where = np.argwhere(mask)
    return None if not len(where) else [*map(int, where.min(0)), *map(int, where.max(0) + 1)]


@pytest.mark.parametrize("seed", range(5))
def test_mask_box_is_the_box_of_the_listed_voxels(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((17, 11, 9), bool)
    mask[tuple(rng.integers(0, n, size=4) for n in mask.shape)] = True
    starts, stops = mask_box(mask)
    assert [*starts.tolist(), *stops.tolist()] == listed_box(mask)


def test_mask_box_of_nothing_one_voxel_and_other_ranks():
    assert mask_box(np.zeros((4, 5, 6), bool)) is None
    one = np.zeros((4, 5, 6), bool)
    one[3, 0, 5] = True
    assert [v.tolist() for v in mask_box(one)] == [[3, 0, 5], [4, 1, 6]]
    flat = np.zeros((6, 7), bool)
    flat[1:3, 4:7] = True
    assert [v.tolist() for v in mask_box(flat)] == [[1, 4], [3, 7]]


def test_class_boxes_union_of_values_absent_classes_and_background():
    rng = np.random.default_rng(0)
    label = rng.choice([-1, 0, 0, 0, 1, 2, 5, 300], size=(21, 14, 9)).astype(np.int32)
    label[label == 5] = 0  # 5 listed by a class but absent
    classes = {"liver": [1, 2], "tumour": [2], "gone": [5], "big": [300], "beyond": [999]}
    boxes = class_boxes(label, classes)
    assert list(boxes) == ["liver", "tumour", "big"]  # in the classes' order, absent ones left out
    for name, box in boxes.items():
        assert box == listed_box(np.isin(label, classes[name]))
    assert class_boxes(np.zeros((3, 3, 3), np.uint8), classes) == {}
    assert class_boxes(np.full((3, 3, 3), -4, np.int32), {"x": [1]}) == {}
    small = np.zeros((5, 6, 7), np.uint8)
    small[1:3, 2:6, 0:1] = 3
    assert class_boxes(small, {"kidney": [3]}) == {"kidney": [1, 2, 0, 3, 6, 1]}
