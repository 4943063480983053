"""The preprocessing cache: each case brought once into the form the model trains on and stored as memory-mappable
arrays, so that a training crop reads only the voxels it needs instead of a whole NIfTI.

One module per job: ``plan`` (the spacing each dataset is cached at), ``keys`` (what an entry depends on, where it
lives, whether it is up to date), ``build`` (computing and writing entries: ``preprocess_corpus``), ``pool`` (the
worker processes), ``verify`` (``verify_corpus``), ``read`` (``open_cache``, ``CachedCase``).

Layout (``<cache>`` defaults to ``<manifest folder>/cache``)::

    <cache>/plan.json                       spacing per dataset and the settings of the last run
    <cache>/report.json                     the last run: written / skipped case ids, errors {case, file, problem}
    <cache>/<dataset>/<case_id>/image.npy       float16 [X, Y, Z], RAS-canonical, normalised, resampled
    <cache>/<dataset>/<case_id>/label.npy       uint8 [X, Y, Z] (uint16 when a label value exceeds 255), same grid
    <cache>/<dataset>/<case_id>/foreground.npz  per present class up to 20 000 voxel coordinates [N, 3]
    <cache>/<dataset>/<case_id>/meta.json       format, key, shape, spacing, classes, boxes, voxel counts ...
"""
