"""What a caller hands to ``save``: a mapping of names to arrays and plain values, or a framework object.

The core knows frameworks only by name: :data:`ADAPTERS` maps the top-level
module of a foreign object's class (``mindspore``) to the adapter function
that turns it into numpy, as an import string.  The adapter is imported only
when such an object is actually passed, so the core never imports an adapter
for its own sake.

* :func:`split_state` -- a state (mapping, or a model object an adapter knows,
  e.g. a MindSpore ``nn.Cell``) into ``arrays`` (numpy, any dtype distckpt
  supports) and ``values`` (``bool``/``int``/``float``/``str``);
* :func:`as_array` -- one entry as numpy, or None for a plain value.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from . import dtypes
from .errors import FormatError

__all__ = ["split_state", "as_array", "ADAPTERS", "PLAIN_TYPES"]

#: module prefix -> (converter of one array-like "module:function", converter of a model "module:function")
ADAPTERS: dict[str, tuple[str, str]] = {
    "mindspore": ("distckpt.mindspore.convert:to_numpy", "distckpt.mindspore.convert:cell_state"),
}

PLAIN_TYPES = (bool, int, float, str)


def _resolve(spec: str) -> Callable[..., Any]:
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _framework(v: Any) -> str | None:
    # a mindspore Parameter's class lives in module "abc"; look along the MRO
    for c in type(v).__mro__:
        top = (c.__module__ or "").split(".", 1)[0]
        if top in ADAPTERS:
            return top
    return None


def as_array(name: str, v: Any) -> np.ndarray | None:
    """numpy view of an array-like state entry; None for plain values."""
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, np.generic):
        return np.asarray(v)
    fw = _framework(v)
    if fw is not None:
        return _resolve(ADAPTERS[fw][0])(v, name=name)
    if isinstance(v, PLAIN_TYPES):
        return None
    raise FormatError(
        f"state entry {name!r} has unsupported type {type(v).__name__}; use numpy arrays, framework tensors "
        "or int/float/bool/str"
    )


def split_state(state: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, values)`` of a state mapping or a framework model (e.g. a MindSpore Cell)."""
    if not isinstance(state, Mapping):
        fw = _framework(state)
        if fw is None:
            raise FormatError(
                f"state must be a mapping of names to arrays and values (or a model object), got {type(state).__name__}"
            )
        state = _resolve(ADAPTERS[fw][1])(state)
    arrays: dict[str, np.ndarray] = {}
    values: dict[str, Any] = {}
    for name, v in state.items():
        if not isinstance(name, str) or not name:
            raise FormatError(f"state key {name!r} must be a non-empty string")
        arr = as_array(name, v)
        if arr is None:
            values[name] = v
        else:
            dtypes.name_of(arr.dtype)  # fails clearly on object / unsupported dtypes
            arrays[name] = arr
    return arrays, values
