"""Dtype names shared by every format distckpt speaks.

The canonical name is numpy's (``ml_dtypes`` for bfloat16 and float8).  Bytes
are never converted: a dtype only tells how many bytes an element has and what
to call it in each format.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import FormatError

__all__ = [
    "DTYPES",
    "to_numpy",
    "name_of",
    "itemsize",
    "ckpt_name",
    "from_ckpt_name",
    "safetensors_name",
    "from_safetensors_name",
    "byteview",
]

# canonical name -> (numpy dtype, MindSpore .ckpt tensor_type or None, safetensors dtype)
_TABLE: dict[str, tuple[np.dtype, str | None, str]] = {
    "bool": (np.dtype(np.bool_), "Bool", "BOOL"),
    "int8": (np.dtype(np.int8), "Int8", "I8"),
    "uint8": (np.dtype(np.uint8), "UInt8", "U8"),
    "int16": (np.dtype(np.int16), "Int16", "I16"),
    "uint16": (np.dtype(np.uint16), "UInt16", "U16"),
    "int32": (np.dtype(np.int32), "Int32", "I32"),
    "uint32": (np.dtype(np.uint32), "UInt32", "U32"),
    "int64": (np.dtype(np.int64), "Int64", "I64"),
    "uint64": (np.dtype(np.uint64), "UInt64", "U64"),
    "float16": (np.dtype(np.float16), "Float16", "F16"),
    "float32": (np.dtype(np.float32), "Float32", "F32"),
    "float64": (np.dtype(np.float64), "Float64", "F64"),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BFloat16", "BF16"),
    "float8_e4m3fn": (np.dtype(ml_dtypes.float8_e4m3fn), None, "F8_E4M3"),
    "float8_e5m2": (np.dtype(ml_dtypes.float8_e5m2), None, "F8_E5M2"),
}
DTYPES = tuple(_TABLE)
_BY_NUMPY = {dt: name for name, (dt, _, _) in _TABLE.items()}
_BY_CKPT = {ck: name for name, (_, ck, _) in _TABLE.items() if ck}
_BY_ST = {st: name for name, (_, _, st) in _TABLE.items()}


def _check(name: str, where: str = "") -> str:
    if name not in _TABLE:
        raise FormatError(f"unknown dtype {name!r}{where}; known: {', '.join(DTYPES)}")
    return name


def to_numpy(name: str) -> np.dtype:
    return _TABLE[_check(name)][0]


def name_of(dtype) -> str:
    dt = np.dtype(dtype)
    try:
        return _BY_NUMPY[dt.newbyteorder("=") if dt.byteorder == ">" else dt]
    except KeyError:
        raise FormatError(f"unsupported dtype {dt}; supported: {', '.join(DTYPES)}") from None


def itemsize(name: str) -> int:
    return to_numpy(name).itemsize


def ckpt_name(name: str, *, tensor: str = "") -> str:
    ck = _TABLE[_check(name)][1]
    if ck is None:
        raise FormatError(
            f"tensor {tensor!r}: MindSpore .ckpt has no {name} type; "
            "write --format safetensors or distckpt instead"
        )
    return ck


def from_ckpt_name(ck: str, *, where: str = "") -> str:
    try:
        return _BY_CKPT[ck]
    except KeyError:
        raise FormatError(f"unsupported MindSpore tensor_type {ck!r}{where}") from None


def safetensors_name(name: str) -> str:
    return _TABLE[_check(name)][2]


def from_safetensors_name(st: str, *, where: str = "") -> str:
    try:
        return _BY_ST[st]
    except KeyError:
        raise FormatError(f"unsupported safetensors dtype {st!r}{where}") from None


def byteview(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array as a flat memoryview, without a copy (empty arrays too)."""
    if not arr.size:
        return memoryview(b"")
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
