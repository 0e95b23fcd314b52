"""Strict JSON in and out: every JSON document distckpt reads goes through :func:`loads`.

* duplicate keys are an error (the stdlib keeps the last one silently, so
  ``{"version": 99, "version": 1}`` would pass as version 1);
* ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON and are refused on input;
  on output (:func:`dumps`) non-finite floats become the strings ``"NaN"``,
  ``"Infinity"``, ``"-Infinity"`` so that what we print is always strict JSON;
* errors are raised as the caller's error class (default
  :class:`~distckpt.errors.FormatError`) naming ``where`` and the problem.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import DistCkptError, FormatError

__all__ = ["loads", "loads_lenient", "dumps", "finite"]


class _Duplicate(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(f"duplicate key {k!r} ({k!r} twice in one object; a key may appear only once)")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes | bytearray | memoryview | str, *, where: str, error: type[DistCkptError] = FormatError) -> Any:
    """Parse strict JSON; raise ``error`` naming ``where`` on anything else."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8-sig")
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except _Duplicate as exc:
        raise error(f"{where}: not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int-digit limits
        raise error(f"{where}: not valid JSON: {exc}") from None


def loads_lenient(data: bytes | bytearray | memoryview | str, *, where: str,
                  error: type[DistCkptError] = FormatError) -> Any:
    """:func:`loads` that also takes ``NaN``/``Infinity`` (files other programs write with them, e.g.
    MindFormers' ``common.json``); duplicate keys are still refused."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8-sig")
        return json.loads(text, object_pairs_hook=_pairs)
    except _Duplicate as exc:
        raise error(f"{where}: not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{where}: not valid JSON: {exc}") from None


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text (non-finite floats as strings, see :func:`finite`)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
