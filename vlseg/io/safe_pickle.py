"""Pickled data read without running code: only the globals an object array of plain values needs are allowed.

NumPy stores an array of Python objects (``dtype=object``) in a ``.npy``/``.npz`` member as a pickle of the array,
and ``np.load`` refuses it unless ``allow_pickle=True`` — which would also run whatever a malicious file asks for
(``os.system``, ...).  ``load_plain_pickle`` unpickles with an allow-list instead: rebuilding an ndarray and its
dtype, NumPy scalars, and the builtin containers (dicts, lists, strings and numbers need no global at all).  Any
other global is refused, before anything is called, with one ``VlsegError`` line naming it.
"""

from __future__ import annotations

import io
import pickle

from vlseg.errors import VlsegError, first_line

# (module, name) pairs a pickled object array of plain values refers to, under NumPy 1.x and 2.x module names.
ALLOWED = frozenset({
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *(("numpy.dtypes", f"{t}DType") for t in ("Object", "Int64", "Int32", "Float64", "Float32", "Bool", "Str")),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "tuple"), ("builtins", "str"), ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"),
    ("_codecs", "encode"),  # protocol 2 pickles spell bytes through it
})


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(Exception):
    pass


def load_plain_pickle(raw: bytes, name: str):
    """The object pickled in ``raw`` (``name``: how messages refer to it), or a one-line error when it needs any
    global outside ``ALLOWED`` (nothing it names is called first) or is not a readable pickle."""
    try:
        return _PlainUnpickler(io.BytesIO(raw)).load()
    except _Refused as exc:
        raise VlsegError(f"{name}: refused, unpickling it would call {exc} (only plain data is read: arrays, "
                         f"dicts, lists, strings, numbers)") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is bad input
        raise VlsegError(f"{name}: unreadable pickled data ({first_line(exc)})") from None
