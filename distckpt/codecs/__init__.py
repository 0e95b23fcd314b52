"""File formats distckpt reads and writes without loading tensor data.

A file is described by a list of :class:`Entry`: a tensor's name, dtype, shape
and the byte ranges (``segments``) of the file whose concatenation is the
tensor's C-order little-endian bytes.  Scanners never read tensor bytes; readers
fetch exactly the segments they need; writers stream.

- :mod:`distckpt.codecs.ckpt`: MindSpore ``.ckpt`` (protobuf ``Checkpoint``).
- :mod:`distckpt.codecs.safetensors`: the safetensors format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError

__all__ = [
    "Entry",
    "STR_DTYPE",
    "scan_ckpt",
    "CkptWriter",
    "read_entry",
    "read_safetensors_header",
    "SafetensorsWriter",
]

STR_DTYPE = "str"
"""Dtype name of a MindSpore string value (bytes are UTF-32LE, numpy ``<U`` style)."""


@dataclass(frozen=True)
class Entry:
    """One tensor (or string) in a file, located but not loaded.

    ``segments`` are ``(absolute byte offset, length)`` pairs; concatenated they
    are the tensor's C-order little-endian bytes (for ``dtype == "str"``: the
    UTF-32LE bytes of the string, possibly NUL-padded).  Scanners never emit
    zero-length segments, so an empty tensor has ``segments == ()``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    segments: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise FormatError(f"Entry name must be a str, got {type(self.name).__name__}")
        shape = self.shape
        if type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape):
            shape = tuple(shape)
            for d in shape:
                if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
                    raise FormatError(f"tensor {self.name!r}: shape {shape!r} must be non-negative integers")
            object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        segs = self.segments
        if type(segs) is not tuple or not all(type(s) is tuple and len(s) == 2 for s in segs):
            segs = tuple((int(o), int(n)) for o, n in segs)
            object.__setattr__(self, "segments", segs)
        for o, n in segs:
            if o < 0 or n < 0:
                raise FormatError(f"tensor {self.name!r}: negative offset or length in segments {segs!r}")

    @property
    def nbytes(self) -> int:
        """Total bytes of the tensor (sum of segment lengths)."""
        return sum(n for _, n in self.segments)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# Imported after Entry is defined: the submodules import Entry from here.
from .ckpt import CkptWriter, read_entry, scan_ckpt  # noqa: E402
from .safetensors import SafetensorsWriter, read_safetensors_header  # noqa: E402
