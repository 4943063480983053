"""vlseg's own torch-file reading: weights_only with an allow-list, and a refusal before anything unpickles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlseg.checkpoint import check_pickle, load_torch_file
from vlseg.errors import VlsegError


class Payload:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_numpy_data_loads_with_weights_only(tmp_path):
    torch.save({"module": {"w": torch.ones(2)}, "loss": np.float64(0.5), "rng": np.arange(3)}, tmp_path / "ok.pt")
    loaded = load_torch_file(tmp_path / "ok.pt", mmap=True)
    assert torch.equal(loaded["module"]["w"], torch.ones(2)) and loaded["loss"] == 0.5
    assert np.array_equal(loaded["rng"], np.arange(3))


def test_code_in_a_pickle_is_refused_before_unpickling(tmp_path, capsys):
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(VlsegError, match="bad.pt: refused, unpickling it would need builtins.print"):
        check_pickle(tmp_path / "bad.pt")
    with pytest.raises(VlsegError):
        load_torch_file(tmp_path / "bad.pt")
    assert "arbitrary code" not in capsys.readouterr().out  # the payload never ran
