"""Released models of the field (SAT, the CLIP-Driven Universal Model, VoxTell) imported as vlseg checkpoints: one
module per family, each registered in ``vlseg.released.base.RELEASED`` and run by ``vlseg import <family>``."""
