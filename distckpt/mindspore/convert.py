"""MindSpore Tensor / Parameter / Cell <-> numpy, bit for bit.

MindSpore is imported inside the functions, never at import time.  bf16 never
goes through ``asnumpy()`` on a bf16 tensor (mindspore 2.10 + numpy 2 cannot do
it, DESIGN §2.1):

* to numpy: cast to float32 inside MindSpore (exact: bf16 is the high half of an
  fp32), then keep the high 16 bits -> ``uint16`` -> ``ml_dtypes.bfloat16``;
* from numpy: the raw 2-byte patterns go through ``convert_bytes_to_tensor``,
  the same call ``mindspore.load_checkpoint`` uses for BFloat16 (exact, NaN
  payloads included); if that private call is missing, through float32 and a
  MindSpore cast (exact for every non-NaN value).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from .. import dtypes
from ..errors import FormatError, LayoutError, require

__all__ = ["to_numpy", "from_numpy", "cell_state", "load_into_cell", "is_mindspore_object"]

_BF16 = np.dtype(ml_dtypes.bfloat16)


def _ms():
    return require("mindspore", "mindspore")


def is_mindspore_object(x: Any) -> bool:
    """True for MindSpore Tensors and Parameters (whose class lives in module ``abc``)."""
    return any((c.__module__ or "").startswith("mindspore") for c in type(x).__mro__)


def _ms_dtype(ms, name: str, *, tensor: str = ""):
    ck = dtypes.ckpt_name(name, tensor=tensor)  # "Float32", "BFloat16", ...: MindSpore's own dtype names
    attr = "bool_" if name == "bool" else name
    dt = getattr(ms, attr, None)
    if dt is None or str(dt) != ck:
        raise FormatError(f"tensor {tensor!r}: this MindSpore has no {name} dtype")
    return dt


def _dtype_name(t, *, tensor: str = "") -> str:
    try:
        return dtypes.from_ckpt_name(str(t.dtype))
    except FormatError:
        raise FormatError(f"tensor {tensor!r}: MindSpore dtype {t.dtype} has no numpy equivalent distckpt supports") from None


def to_numpy(x: Any, *, name: str = "") -> np.ndarray:
    """A numpy array with ``x``'s exact dtype and bits (Tensor, Parameter or array-like).

    The result may share memory with the tensor; copy it before mutating.
    """
    if isinstance(x, np.ndarray):
        return x
    if not is_mindspore_object(x):
        return np.asarray(x)
    ms = _ms()
    if getattr(x, "has_init", False):  # a Parameter whose data is not materialised yet
        x = x.init_data()
    dt = _dtype_name(x, tensor=name or getattr(x, "name", ""))
    if dt == "bfloat16":
        f32 = x.astype(ms.float32).asnumpy()
        bits = (np.ascontiguousarray(f32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(_BF16).reshape(tuple(x.shape))
    arr = x.asnumpy()
    want = dtypes.to_numpy(dt)
    if arr.dtype != want:  # never expected; refuse rather than convert silently
        raise FormatError(f"tensor {name!r}: asnumpy() gave {arr.dtype} for a MindSpore {x.dtype} tensor")
    return arr


def from_numpy(arr: Any, *, name: str = ""):
    """A ``mindspore.Tensor`` with ``arr``'s exact dtype and bits."""
    ms = _ms()
    a = np.asarray(arr)
    dt = dtypes.name_of(a.dtype)
    if dt != "bfloat16":
        _ms_dtype(ms, dt, tensor=name)  # fails clearly for float8
        return ms.Tensor(np.ascontiguousarray(a))
    bf = _ms_dtype(ms, "bfloat16", tensor=name)
    try:
        from mindspore._c_expression import TensorPy as _TensorPy  # type: ignore[import-not-found]

        convert = _TensorPy.convert_bytes_to_tensor
    except (ImportError, AttributeError):
        convert = None
    if convert is not None:
        raw = np.ascontiguousarray(a).view(np.uint16).tobytes()
        return ms.Tensor(convert(raw, tuple(int(d) for d in a.shape), bf))
    return ms.Tensor(a.astype(np.float32)).astype(bf)


def cell_state(cell: Any) -> dict[str, np.ndarray]:
    """``{parameter name: numpy array}`` of a Cell (``parameters_dict()``), exact dtypes.

    A Cell of a parallel job holds its slices; the arrays have the sliced shapes.
    """
    if isinstance(cell, Mapping):
        return {str(k): to_numpy(v, name=str(k)) for k, v in cell.items()}
    params = cell.parameters_dict()
    return {name: to_numpy(p, name=name) for name, p in params.items()}


def _convertible(src: str, dst: str) -> bool:
    floats = {"float16", "float32", "float64", "bfloat16"}
    return src in floats and dst in floats


def load_into_cell(cell: Any, state: Mapping[str, Any], strict: bool = False) -> tuple[list[str], list[str]]:
    """Copy ``state`` into ``cell``'s Parameters, like ``mindspore.load_param_into_net``.

    Returns ``(missing, unexpected)``: parameters of the cell absent from
    ``state``, and entries of ``state`` the cell has no parameter for.  Shapes
    must match exactly (a parallel job's Parameters have their slices' shapes).
    A float dtype differing from the parameter's is cast unless ``strict``;
    with ``strict`` missing or unexpected names raise too.
    """
    _ms()
    params = cell.parameters_dict()
    missing = [n for n in params if n not in state]
    unexpected = [n for n in state if n not in params]
    if strict and (missing or unexpected):
        raise FormatError(
            f"strict load into {type(cell).__name__}: {len(missing)} parameter(s) missing from the checkpoint "
            f"{missing[:5]}, {len(unexpected)} unexpected entr(y/ies) {unexpected[:5]}"
        )
    for pname, p in params.items():
        if pname not in state:
            continue
        v = state[pname]
        arr = to_numpy(v, name=pname) if not isinstance(v, np.ndarray) else v
        if not isinstance(arr, np.ndarray) or arr.dtype.kind in "OUS":
            raise FormatError(f"checkpoint entry {pname!r} is a {type(v).__name__}, not an array; cannot load into a Parameter")
        if tuple(arr.shape) != tuple(p.shape):
            raise LayoutError(
                f"parameter {pname!r}: the checkpoint gives shape {list(arr.shape)} but the cell holds {list(p.shape)} "
                "(a parallel job's parameters have their slices' shapes: pass the job's strategy and rank)"
            )
        have = dtypes.name_of(arr.dtype)
        want = _dtype_name(p, tensor=pname)
        if have != want:
            if strict or not _convertible(have, want):
                raise FormatError(f"parameter {pname!r}: the checkpoint holds {have}, the cell {want}")
            arr = arr.astype(dtypes.to_numpy(want))
        p.set_data(from_numpy(arr, name=pname))
    return missing, unexpected
