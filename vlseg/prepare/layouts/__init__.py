"""Dataset layouts ``vlseg prepare convert`` reads: one registered entry per layout (``base.dataset_layout``)."""
