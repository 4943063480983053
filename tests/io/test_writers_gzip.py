"""Masks written as multi-member gzip: every reader sees the same voxels, whatever part of the volume is set."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from vlseg.io.writers import write_nifti_gz


@pytest.mark.parametrize("box", [None, (slice(3, 9), slice(0, 40), slice(0, 1)), (slice(0, 20), slice(5, 7),
                                                                                   slice(10, 33))])
def test_multi_member_gzip_reads_back_in_nibabel_simpleitk_and_gzip(tmp_path, box):
    import SimpleITK as sitk

    data = np.zeros((20, 40, 33), np.uint8)
    if box is not None:
        data[box] = 1
        data[box[0].start, box[1].start, box[2].start] = 0
    img = nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.5, 1.0]))
    img.set_data_dtype(np.uint8)
    path = tmp_path / "mask.nii.gz"
    write_nifti_gz(img, data, path, member_bytes=1000)  # many members
    back = nib.load(path)
    assert np.array_equal(np.asarray(back.dataobj), data) and np.allclose(back.affine, img.affine)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0), data)
    raw = gzip.decompress(path.read_bytes())
    assert len(raw) == 352 + data.size and raw[352:] == data.tobytes(order="F")
