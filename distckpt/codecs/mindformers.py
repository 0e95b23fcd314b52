"""MindFormers 1.9's own distributed checkpoint (``mindformers.checkpoint``): a pure codec.

Bytes and strings in, frozen values out, and back; no I/O and no MindSpore.
``docs/mindformers_format.md`` cites the MindFormers source for every rule here.

On storage::

    ROOT/latest_checkpointed_iteration.txt      decimal N, no newline: the only commit marker
    ROOT/iteration_{N:08d}/
        [prefix-]model-{i:07d}-{n:07d}.safetensors   MindSpore safetensors, network parameters
        [prefix-]opt-{i:07d}-{n:07d}.safetensors     optimizer state
        metadata.json                                only when the job had more than one rank
        common.json                                  epoch_num, step_num, global_step, ...

A reader calls, in order:

1. :func:`parse_tracker` on the tracker's bytes -> N, then :func:`iteration_dir` (N) names the
   directory (:func:`parse_iteration_dir` recognises one given directly or listed);
2. :func:`parse_metadata` on ``metadata.json`` -> :class:`MFMetadata`: per tensor its dtype,
   global shape, every chunk as an element :class:`~distckpt.layout.Box` and the file(s) holding
   it; the safetensors header of each file then gives byte offsets (the tensor is stored under
   its own name with the chunk's shape).  Without ``metadata.json`` every ``*.safetensors``
   file holds whole tensors: :func:`standalone_metadata` describes them from the headers;
3. :func:`parse_common` on ``common.json`` -> :class:`MFCommon`.

A writer calls :func:`is_optimizer_state` to pick ``model`` or ``opt`` and :func:`file_name`
for each writing rank, :func:`describe_tensor` per tensor, then :func:`dump_metadata`,
:func:`dump_common` and, last and atomically, :func:`dump_tracker` (the commit).

Everything read is data: ``storage_data`` keys (Python tuple reprs such as ``"('w', (0,))"``)
are parsed with a strict grammar, never evaluated; file names must be plain names; JSON with
duplicate keys is refused.  Hostile input raises :class:`~distckpt.errors.FormatError` naming
the file, the tensor and the problem.
"""

from __future__ import annotations

import functools
import json
import math
import re
import reprlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import numpy as np

from .. import jsonutil
from ..dtypes import DTYPES, ckpt_name, from_ckpt_name, itemsize
from ..errors import FormatError, LayoutError, StorageError, StrategyError
from ..layout import MAX_DEVICES, MAX_NDIM, Box, TensorLayout, check_tiling
from ..storage import safe_name

__all__ = [
    "TRACKER",
    "METADATA",
    "COMMON",
    "ITERATION_PREFIX",
    "KINDS",
    "MAX_ITERATION",
    "MS_DTYPES",
    "MFFileName",
    "MFStorage",
    "MFChunk",
    "MFLayout",
    "MFTensor",
    "MFMetadata",
    "MFCommon",
    "StoredChunk",
    "parse_tracker",
    "dump_tracker",
    "iteration_dir",
    "parse_iteration_dir",
    "file_name",
    "parse_file_name",
    "shard_id",
    "parse_shard_id",
    "ms_dtype_name",
    "dtype_from_ms",
    "parse_metadata",
    "dump_metadata",
    "describe_tensor",
    "standalone_metadata",
    "parse_common",
    "dump_common",
    "is_optimizer_state",
]

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
COMMON = "common.json"
ITERATION_PREFIX = "iteration_"
KINDS = ("model", "opt")
#: Largest iteration accepted (a signed 64-bit step counter).
MAX_ITERATION = (1 << 63) - 1
_MAX_TRACKER_BYTES = 64

#: ``str(dtype)`` of every ``mindspore.common.dtype.all_types`` (mindspore 2.9); MindFormers'
#: ``load_metadata`` matches them case-insensitively.
MS_DTYPES = (
    "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
    "Float16", "Float32", "Float64", "BFloat16", "Complex64", "Complex128", "Int4",
    "Float8E4M3FN", "Float8E5M2", "HiFloat8",
)  # fmt: skip
_MS_BY_LOWER = {n.lower(): n for n in MS_DTYPES}
_MS_EXTRA = {"Float8E4M3FN": "float8_e4m3fn", "Float8E5M2": "float8_e5m2"}
_EXTRA_MS = {v: k for k, v in _MS_EXTRA.items()}

# Names of optimizer state in MindFormers' optimizers (mindformers/core/optim/*.py) and the
# state MindSpore's Optimizer base class adds.  MindFormers' own rule is membership (see
# is_optimizer_state); this list reproduces it when only names are known.
_OPT_PREFIXES = (
    "adam_m.", "adam_v.",  # AdamW, Muon (adamw.py clone_state, muon.py)
    "exp_avg.", "exp_avg_sq.", "max_exp_avg_sq.",  # FusedAdamW, Came
    "muon_m.",  # Muon
    "pma_weight_",  # PmaAdamW, FusedPmaAdamW: pma_weight_{ema,sma}.
    "exp_avg_sq_row_", "exp_avg_sq_col_", "exp_avg_insta_row_", "exp_avg_insta_col_", "exp_avg_sq_",  # Came
)  # fmt: skip
_OPT_NAMES = frozenset({"global_step", "learning_rate", "afactor_step"})


# --------------------------------------------------------------------------- tracker, names


def parse_tracker(data: bytes, *, where: str = TRACKER) -> int:
    """The iteration a tracker file names.

    MindFormers writes ``str(N)`` and reads ``int(text.strip())``; this accepts ASCII digits
    with surrounding whitespace only (no sign, no ``_``), at most :data:`MAX_ITERATION`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"{where}: tracker must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > _MAX_TRACKER_BYTES:
        raise FormatError(f"{where}: tracker holds {len(raw)} bytes; it should hold one iteration number")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise FormatError(f"{where}: tracker is not ASCII text: {raw[:32]!r}") from None
    if text.startswith("-") and text[1:].isdigit():
        raise FormatError(f"{where}: tracker names a negative iteration {text}")
    if not text or not (text.isascii() and text.isdigit()):
        raise FormatError(f"{where}: tracker {text[:32]!r} is not an iteration number (decimal digits)")
    n = int(text)
    if n > MAX_ITERATION:
        raise FormatError(f"{where}: tracker iteration {text} exceeds {MAX_ITERATION}")
    return n


def _check_iteration(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_ITERATION:
        raise FormatError(f"iteration must be an integer in 0..{MAX_ITERATION}, got {n!r}")
    return int(n)


def dump_tracker(n: int) -> bytes:
    """The tracker's bytes for iteration ``n``: ``str(n)``, no newline, as MindFormers writes it."""
    return str(_check_iteration(n)).encode("ascii")


def iteration_dir(n: int) -> str:
    """``iteration_{n:08d}`` (``utils.get_checkpoint_iter_dir``)."""
    return f"{ITERATION_PREFIX}{_check_iteration(n):08d}"


_ITER_RE = re.compile(r"iteration_([0-9]{8,19})")


def parse_iteration_dir(name: str) -> int | None:
    """N for a directory named exactly ``iteration_dir(N)``, else None."""
    m = _ITER_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        return None
    n = int(m.group(1))
    return n if n <= MAX_ITERATION and iteration_dir(n) == name else None


class MFFileName(NamedTuple):
    """The parts of a data file name: ``[prefix-]kind-{file_index:07d}-{file_count:07d}.safetensors``."""

    prefix: str | None
    kind: str
    file_index: int
    file_count: int


def file_name(kind: str, i: int, n: int, prefix: str | None = None) -> str:
    """A data file name exactly as ``utils.get_checkpoint_name`` + ``.safetensors`` makes it.

    ``prefix=None`` writes no prefix (MindFormers' ``user_prefix=None``); a string, even
    ``""``, is written followed by ``-``, as MindFormers does.
    """
    if kind not in KINDS:
        raise FormatError(f"file kind must be one of {KINDS}, got {kind!r}")
    for v, what in ((i, "file index"), (n, "file count")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise FormatError(f"{what} must be a non-negative integer, got {v!r}")
    if not 0 <= i < n:
        raise FormatError(f"file index {i} must lie in 0..{n - 1} (file count {n})")
    if prefix is not None and (not isinstance(prefix, str) or "/" in prefix or "\\" in prefix):
        raise FormatError(f"file prefix must be a string without path separators, got {prefix!r}")
    stem = f"{kind}-{int(i):07d}-{int(n):07d}.safetensors"
    return stem if prefix is None else f"{prefix}-{stem}"


_FILE_RE = re.compile(r"(?:(?P<prefix>.*)-)?(?P<kind>model|opt)-(?P<i>[0-9]{7,})-(?P<n>[0-9]{7,})\.safetensors", re.S)


def parse_file_name(name: str) -> MFFileName | None:
    """The parts of a MindFormers data file name, or None if ``name`` is not one."""
    m = _FILE_RE.fullmatch(name) if isinstance(name, str) and len(name) < 4096 else None
    if m is None:
        return None
    parts = MFFileName(m.group("prefix"), m.group("kind"), int(m.group("i")), int(m.group("n")))
    try:
        canonical = file_name(parts.kind, parts.file_index, parts.file_count, parts.prefix)
    except FormatError:
        return None
    return parts if canonical == name else None


# --------------------------------------------------------------------------- shard ids


def shard_id(name: str, index: int) -> str:
    """The ``storage_data`` key of chunk ``index`` of ``name``: ``str((name, (index,)))``."""
    return str((str(name), (int(index),)))


_KEY_RE = re.compile(r"\((?P<q>['\"])(?P<body>.*)(?P=q), \((?P<ints>[-0-9, ]*)\)\)", re.S)
_INT_RE = re.compile(r"-?[0-9]{1,19}")
_SIMPLE_ESC = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_HEX_ESC = {"x": 2, "u": 4, "U": 8}


def _unescape(body: str) -> str | None:
    """Decode the body of a Python string literal (the escapes ``repr`` emits), None if malformed."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1 : i + 2]
        if e in _SIMPLE_ESC:
            out.append(_SIMPLE_ESC[e])
            i += 2
        elif e in _HEX_ESC:
            digits = body[i + 2 : i + 2 + _HEX_ESC[e]]
            if len(digits) != _HEX_ESC[e] or not all(ch in "0123456789abcdefABCDEF" for ch in digits):
                return None
            cp = int(digits, 16)
            if cp > 0x10FFFF:
                return None
            out.append(chr(cp))
            i += 2 + len(digits)
        else:
            return None
    return "".join(out)


def parse_shard_id(key: str, *, where: str = "storage_data") -> tuple[str, tuple[int, ...]]:
    """``(name, offsets)`` from a ``storage_data`` key, which must be ``str((name, offsets))``.

    Grammar: ``(`` a quoted Python string ``, (`` integers ``))``; the result must print back
    to exactly ``key`` (Python's canonical repr), so no two spellings name one chunk.
    Anything else -- code, another tuple shape, another quoting -- is a FormatError.
    """
    if not isinstance(key, str):
        raise FormatError(f"{where}: key {key!r} is not a string")
    m = _KEY_RE.fullmatch(key) if len(key) <= 65536 else None
    bad = f"{where}: key {key[:200]!r} is not a MindFormers shard id ('name', (index,))"
    if m is None:
        raise FormatError(bad)
    name = _unescape(m.group("body"))
    text = m.group("ints").strip()
    items = [t.strip() for t in text.split(",")] if text else []
    if items and items[-1] == "":
        items.pop()
    if name is None or not all(_INT_RE.fullmatch(t) for t in items):
        raise FormatError(bad)
    offsets = tuple(int(t) for t in items)
    if str((name, offsets)) != key:
        raise FormatError(f"{bad}: not in Python's canonical form {str((name, offsets))[:200]!r}")
    return name, offsets


# --------------------------------------------------------------------------- dtypes


def dtype_from_ms(ms_name: str, *, where: str = "") -> str:
    """distckpt's dtype name for a MindSpore dtype name (case-insensitive, as MindFormers reads it)."""
    canon = _MS_BY_LOWER.get(ms_name.lower()) if isinstance(ms_name, str) else None
    if canon is None:
        raise FormatError(f"{where}dtype {ms_name!r} is not a MindSpore dtype name ({', '.join(MS_DTYPES)})")
    if canon in _MS_EXTRA:
        return _MS_EXTRA[canon]
    try:
        return from_ckpt_name(canon)
    except FormatError:
        raise FormatError(f"{where}MindSpore dtype {canon} is not supported by distckpt") from None


def ms_dtype_name(dtype: str) -> str:
    """MindSpore's name (``str(mindspore.dtype)``) for a distckpt dtype name."""
    if dtype in _EXTRA_MS:
        return _EXTRA_MS[dtype]
    return ckpt_name(dtype)


# --------------------------------------------------------------------------- values


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _int_tuple(values: Any, what: str, *, lo: int = 0, max_len: int = MAX_NDIM) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not all(_is_int(v) and v >= lo for v in values):
        raise FormatError(f"{what} must be a list of integers >= {lo}, got {_short(values)}")
    if len(values) > max_len:
        raise FormatError(f"{what} has {len(values)} entries; at most {max_len} are allowed")
    return tuple(int(v) for v in values)


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8
_REPR.maxstring = _REPR.maxother = 80


def _short(v: Any) -> str:
    """A bounded repr of a value read from storage (a hostile list may hold millions of items)."""
    return _REPR.repr(v)


def _unravel(k: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        k, r = divmod(k, n)
        out.append(r)
    return tuple(reversed(out))


def _ravel(coords: Sequence[int], shape: Sequence[int]) -> int:
    k = 0
    for c, n in zip(coords, shape):
        k = k * n + c
    return k


@dataclass(frozen=True)
class MFStorage:
    """One file holding a chunk: an entry of a ``storage_data`` list."""

    file_name: str
    storage_rank: int
    rank_group: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            safe_name(self.file_name, what="file_name")
        except StorageError as exc:
            raise FormatError(str(exc)) from None
        if not _is_int(self.storage_rank) or self.storage_rank < 0:
            raise FormatError(f"storage_rank must be an integer >= 0, got {_short(self.storage_rank)}")
        object.__setattr__(self, "storage_rank", int(self.storage_rank))
        object.__setattr__(self, "rank_group", _int_tuple(self.rank_group, "rank_group", max_len=MAX_DEVICES))

    def to_json(self) -> dict:
        return {"file_name": self.file_name, "storage_rank": self.storage_rank, "rank_group": list(self.rank_group)}


@dataclass(frozen=True)
class MFChunk:
    """One distinct slice of a tensor: its linear slice index, element box and holders."""

    index: int
    box: Box
    storage: tuple[MFStorage, ...]

    def __post_init__(self) -> None:
        if not _is_int(self.index) or self.index < 0:
            raise FormatError(f"chunk index must be an integer >= 0, got {_short(self.index)}")
        if not isinstance(self.box, Box):
            raise FormatError(f"chunk {self.index}: box must be a Box, got {type(self.box).__name__}")
        object.__setattr__(self, "storage", tuple(self.storage))
        if not self.storage:
            raise FormatError(f"chunk {self.index} has no storage_data entry (no file holds it)")

    @property
    def file_name(self) -> str:
        """The first file listed for this chunk (any of them holds the same bytes)."""
        return self.storage[0].file_name


TensorMapEntry = Union[int, tuple[int, ...]]


@dataclass(frozen=True)
class MFLayout:
    """A ``mindspore.parallel.Layout`` as MindFormers stores it (``Layout.to_dict``).

    ``tensor_map`` counts device axes from the right of ``device_matrix``; -1 means not split;
    a tuple splits one dim over several axes, the first listed outermost.  The i-th entry of
    ``rank_list`` is the rank at row-major position i of the device matrix.
    """

    device_matrix: tuple[int, ...]
    tensor_map: tuple[TensorMapEntry, ...]
    alias_name: tuple[str, ...]
    rank_list: tuple[int, ...]
    interleaved_parallel: bool = False

    def __post_init__(self) -> None:
        dm = _int_tuple(self.device_matrix, "device_matrix", lo=1)
        if not dm or math.prod(dm) > MAX_DEVICES:
            raise FormatError(f"device_matrix {list(dm)} must be non-empty and cover at most {MAX_DEVICES} devices")
        object.__setattr__(self, "device_matrix", dm)
        names = self.alias_name
        if (
            not isinstance(names, (list, tuple))
            or len(names) != len(dm)
            or not all(isinstance(a, str) and a and a != "None" for a in names)
            or len(set(names)) != len(names)
        ):
            raise FormatError(
                f"alias_name {_short(names)} must be {len(dm)} distinct non-empty names (not 'None'), "
                "one per device_matrix axis"
            )
        object.__setattr__(self, "alias_name", tuple(names))
        if "interleaved_parallel" in names[:-1]:
            raise FormatError("alias 'interleaved_parallel' must name the last device axis (MindSpore's rule)")
        if not isinstance(self.interleaved_parallel, bool) or self.interleaved_parallel != (
            "interleaved_parallel" in names
        ):
            raise FormatError(
                f"interleaved_parallel {self.interleaved_parallel!r} must be true exactly when alias_name "
                "contains 'interleaved_parallel'"
            )
        ranks = _int_tuple(self.rank_list, "rank_list", max_len=MAX_DEVICES)
        if len(ranks) != math.prod(dm) or len(set(ranks)) != len(ranks):
            raise FormatError(f"rank_list must list {math.prod(dm)} distinct ranks (prod of device_matrix {list(dm)})")
        object.__setattr__(self, "rank_list", ranks)
        object.__setattr__(self, "tensor_map", self._check_tensor_map(self.tensor_map, len(dm)))

    @staticmethod
    def _check_tensor_map(tensor_map: Any, nd: int) -> tuple[TensorMapEntry, ...]:
        if not isinstance(tensor_map, (list, tuple)) or len(tensor_map) > MAX_NDIM:
            raise FormatError(f"tensor_map {_short(tensor_map)} must be a list of at most {MAX_NDIM} entries")
        out: list[TensorMapEntry] = []
        used: list[int] = []
        for entry in tensor_map:
            if isinstance(entry, (list, tuple)):
                axes = _int_tuple(entry, "tensor_map entry", lo=-1)
                out.append(axes)
            elif _is_int(entry) and entry >= -1:
                axes = (int(entry),)
                out.append(int(entry))
            else:
                raise FormatError(f"tensor_map entry {_short(entry)} must be an integer >= -1 or a list of them")
            used.extend(a for a in axes if a != -1)
        if any(a >= nd for a in used) or len(set(used)) != len(used):
            raise FormatError(
                f"tensor_map {_short(list(tensor_map))} must name each of the {nd} device axes (0..{nd - 1}) at most once"
            )
        return tuple(out)

    def _axes(self, entry: TensorMapEntry) -> tuple[int, ...]:
        return tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a != -1)

    def splits(self) -> tuple[int, ...]:
        """Slices per tensor dim (MindSpore's ``_DistributedTensorInfo.sharding_strategy``)."""
        dm = self.device_matrix
        return tuple(math.prod(dm[len(dm) - 1 - a] for a in self._axes(e)) for e in self.tensor_map)

    def to_tensor_layout(self) -> TensorLayout | None:
        """distckpt's layout for rank ``r`` (``r % device_num`` indexes the matrix), where representable.

        None for interleaved layouts and when ``rank_list`` is not the aligned block
        ``range(s * N, (s + 1) * N)`` (a permutation cannot be expressed by a TensorLayout).
        """
        n = len(self.rank_list)
        start = self.rank_list[0]
        if self.interleaved_parallel or start % n or self.rank_list != tuple(range(start, start + n)):
            return None
        return TensorLayout(self.device_matrix, tuple(self._axes(e) or (-1,) for e in self.tensor_map))

    def slice_indices(self) -> tuple[int, ...]:
        """The linear slice index held at each position of ``rank_list`` (MindFormers' ``global_offset``)."""
        if not self.tensor_map:
            return (0,) * len(self.rank_list)
        tl = TensorLayout(self.device_matrix, tuple(self._axes(e) or (-1,) for e in self.tensor_map))
        blocks = tl.block_indices(np.arange(len(self.rank_list)))
        splits = self.splits()
        return tuple(_ravel(row, splits) for row in blocks.tolist())

    def to_json(self) -> dict:
        """``Layout.to_dict()`` order; MindFormers' ``load_metadata`` unpacks the values positionally."""
        return {
            "device_matrix": list(self.device_matrix),
            "tensor_map": [list(e) if isinstance(e, tuple) else e for e in self.tensor_map],
            "interleaved_parallel": self.interleaved_parallel,
            "alias_name": list(self.alias_name),
            "rank_list": list(self.rank_list),
        }

    @classmethod
    def grid(cls, splits: Sequence[int]) -> MFLayout:
        """One virtual device per slice: rank ``k`` (position ``k``) holds slice ``k``."""
        split_dims = [d for d, f in enumerate(splits) if f > 1]
        dm = tuple(splits[d] for d in split_dims) or (1,)
        pos = {d: p for p, d in enumerate(split_dims)}
        tm = tuple(len(dm) - 1 - pos[d] if d in pos else -1 for d in range(len(splits)))
        return cls(dm, tm, tuple(f"d{i}" for i in range(len(dm))), tuple(range(math.prod(dm))))

    @classmethod
    def from_tensor_layout(cls, layout: TensorLayout, rank_list: Sequence[int] | None = None) -> MFLayout:
        """MindFormers' form of a distckpt layout; an optimizer shard becomes a nested dim-0 entry.

        Raises LayoutError when the optimizer shard uses part of a device axis (no Layout says that).
        """
        dm = layout.dev_matrix
        entries = [list(axes) for axes in layout.tensor_map]
        if layout.opt_shard_size:
            if not entries:
                raise LayoutError("a scalar cannot carry an optimizer shard")
            for i, mod in layout._opt_axes:  # leftmost device axis outermost, after the model-parallel axes
                if mod != dm[i]:
                    raise LayoutError(
                        f"optimizer shard {layout.opt_shard_size} uses {mod} of the {dm[i]} devices of axis {i}; "
                        "a MindSpore Layout cannot express that: pass the chunks without a layout"
                    )
                entries[0].append(len(dm) - 1 - i)
        tm = tuple(tuple(e) if len(e) > 1 else (e[0] if e else -1) for e in entries)
        ranks = tuple(range(math.prod(dm))) if rank_list is None else tuple(rank_list)
        return cls(dm, tm, tuple(f"d{i}" for i in range(len(dm))), ranks)


@dataclass(frozen=True)
class MFTensor:
    """One tensor of a MindFormers checkpoint: dtype, global shape, layout and every chunk.

    ``chunks`` tile the tensor exactly (checked); chunk ``k`` starts at
    ``unravel(k, axis_fragmentations) * (shape // axis_fragmentations)``.  ``replica_id`` is
    what MindFormers stores: one replica number per ``rank_list`` position (or 0).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    axis_fragmentations: tuple[int, ...]
    mf_layout: MFLayout
    chunks: tuple[MFChunk, ...]
    replica_id: int | tuple[int, ...] = 0
    allow_shape_mismatch: bool = False
    allow_to_save: bool = True
    layout: TensorLayout | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise FormatError(f"tensor name must be a non-empty string, got {_short(self.name)}")
        where = f"tensor {self.name!r}: "
        try:
            self._validate()
        except (FormatError, LayoutError, StrategyError) as exc:
            msg = str(exc)
            raise FormatError(msg if msg.startswith(where) else where + msg) from None

    def _validate(self) -> None:
        if self.dtype not in DTYPES:
            raise FormatError(f"unknown dtype {self.dtype!r}")
        ms_dtype_name(self.dtype)
        shape = _int_tuple(self.shape, "global_shape")
        frag = _int_tuple(self.axis_fragmentations, "axis_fragmentations", lo=1)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "axis_fragmentations", frag)
        if len(frag) != len(shape):
            raise FormatError(f"axis_fragmentations {list(frag)} do not match global_shape {list(shape)}")
        if not isinstance(self.mf_layout, MFLayout):
            raise FormatError(f"layout must be an MFLayout, got {type(self.mf_layout).__name__}")
        if len(self.mf_layout.tensor_map) != len(shape):
            raise FormatError(
                f"layout tensor_map {self.mf_layout.to_json()['tensor_map']} does not match global_shape {list(shape)}"
            )
        if self.mf_layout.splits() != frag:
            raise FormatError(
                f"layout splits the tensor into {list(self.mf_layout.splits())} slices per dim, "
                f"axis_fragmentations say {list(frag)}"
            )
        for flag, what in ((self.allow_shape_mismatch, "allow_shape_mismatch"), (self.allow_to_save, "allow_to_save")):
            if not isinstance(flag, bool):
                raise FormatError(f"{what} must be true or false, got {_short(flag)}")
        object.__setattr__(self, "replica_id", self._check_replicas(self.replica_id))
        self._check_chunks(shape, frag)
        object.__setattr__(self, "layout", self.mf_layout.to_tensor_layout())

    def _check_replicas(self, rid: Any) -> int | tuple[int, ...]:
        if _is_int(rid) and rid >= 0:
            return int(rid)
        n = len(self.mf_layout.rank_list)
        ids = _int_tuple(rid, "replica_id", max_len=MAX_DEVICES)
        if len(ids) != n:
            raise FormatError(f"replica_id lists {len(ids)} entries, rank_list has {n} ranks")
        return ids

    def _check_chunks(self, shape: tuple[int, ...], frag: tuple[int, ...]) -> None:
        chunks = tuple(self.chunks)
        object.__setattr__(self, "chunks", chunks)
        if not chunks:
            raise FormatError("lists no chunk")
        total = math.prod(frag)
        step = tuple(n // f for n, f in zip(shape, frag))
        seen: set[int] = set()
        files: dict[str, int] = {}
        for c in chunks:
            if not isinstance(c, MFChunk):
                raise FormatError(f"chunk must be an MFChunk, got {type(c).__name__}")
            if c.index >= total:
                raise FormatError(
                    f"chunk global_offset [{c.index}] is out of range: axis_fragmentations {list(frag)} "
                    f"have {total} slices (0..{total - 1})"
                )
            if c.index in seen:
                raise FormatError(f"chunk global_offset [{c.index}] is listed twice")
            seen.add(c.index)
            origin = tuple(i * s for i, s in zip(_unravel(c.index, frag), step))
            if c.box.offsets != origin:
                raise FormatError(
                    f"chunk {c.index} starts at {list(c.box.offsets)}, slice {c.index} starts at {list(origin)}"
                )
            for st in c.storage:
                if files.setdefault(st.file_name, c.index) != c.index:
                    raise FormatError(
                        f"file {st.file_name!r} is named for chunks {files[st.file_name]} and {c.index}; "
                        "a safetensors file holds a tensor once"
                    )
        uneven = [d for d, (n, f) in enumerate(zip(shape, frag)) if n % f]
        if uneven:
            d = uneven[0]
            raise FormatError(
                f"dim {d} of global_shape {list(shape)} does not divide into {frag[d]} slices: MindFormers floors the "
                f"slice size to {shape[d] // frag[d]} and loses the remaining {shape[d] % frag[d]}"
            )
        check_tiling(shape, [c.box for c in chunks], name=f"tensor {self.name!r}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    def to_json(self) -> dict:
        """The ``state_dict_metadata`` entry, in MindFormers' field order."""
        rid = list(self.replica_id) if isinstance(self.replica_id, tuple) else self.replica_id
        return {
            "properties": {
                "dtype": ms_dtype_name(self.dtype),
                "replica_id": rid,
                "allow_shape_mismatch": self.allow_shape_mismatch,
                "allow_to_save": self.allow_to_save,
            },
            "global_shape": list(self.shape),
            "axis_fragmentations": list(self.axis_fragmentations),
            "layout": self.mf_layout.to_json(),
            "chunk": [{"global_offset": [c.index], "local_shape": list(c.box.sizes)} for c in self.chunks],
        }


@dataclass(frozen=True)
class MFMetadata:
    """Every tensor of one iteration, in ``metadata.json`` order."""

    tensors: tuple[MFTensor, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise FormatError(f"tensor {dup!r} is described twice")

    @functools.cached_property
    def by_name(self) -> dict[str, MFTensor]:
        return {t.name: t for t in self.tensors}

    @property
    def files(self) -> tuple[str, ...]:
        """Every file name the metadata refers to, sorted."""
        return tuple(sorted({s.file_name for t in self.tensors for c in t.chunks for s in c.storage}))


# --------------------------------------------------------------------------- metadata.json


def _load_json(data: bytes, where: str, *, allow_nan: bool = False) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"{where}: expected bytes, got {type(data).__name__}")
    if allow_nan:  # MindFormers' common.json may hold a NaN loss scale
        return jsonutil.loads_lenient(data, where=where)
    return jsonutil.loads(data, where=where)


def _obj(value: Any, what: str, required: Iterable[str]) -> dict:
    if not isinstance(value, dict):
        raise FormatError(f"{what} must be a JSON object, got {type(value).__name__}")
    missing = [k for k in required if k not in value]
    if missing:
        raise FormatError(f"{what} lacks {', '.join(missing)}")
    return value


def _parse_storage(storage_data: Any, where: str, names: Collection[str]) -> dict[tuple[str, int], list[MFStorage]]:
    _obj(storage_data, f"{where}: storage_data", ())
    out: dict[tuple[str, int], list[MFStorage]] = {}
    for key, entries in storage_data.items():
        name, offsets = parse_shard_id(key, where=f"{where}: storage_data")
        ctx = f"{where}: storage_data {key[:200]!r}"
        if name not in names:
            raise FormatError(f"{ctx} names tensor {name!r}, which state_dict_metadata does not describe")
        if len(offsets) != 1 or offsets[0] < 0:
            raise FormatError(f"{ctx}: the offset must be one linear slice index >= 0, got {list(offsets)}")
        if not isinstance(entries, list) or not entries:
            raise FormatError(f"{ctx} must be a non-empty list of {{file_name, storage_rank, rank_group}}")
        parsed = []
        for e in entries:
            _obj(e, f"{ctx} entry", ("file_name", "storage_rank", "rank_group"))
            try:
                parsed.append(MFStorage(e["file_name"], e["storage_rank"], e["rank_group"]))
            except FormatError as exc:
                raise FormatError(f"{ctx}: {exc}") from None
        out[(name, offsets[0])] = parsed
    return out


def _parse_layout(value: Any) -> MFLayout:
    keys = ("device_matrix", "tensor_map", "interleaved_parallel", "alias_name", "rank_list")
    _obj(value, "layout", keys)
    return MFLayout(
        value["device_matrix"],
        value["tensor_map"],
        value["alias_name"],
        value["rank_list"],
        value["interleaved_parallel"],
    )


def _parse_tensor(name: str, meta: Any, storage: dict[tuple[str, int], list[MFStorage]]) -> MFTensor:
    _obj(meta, "entry", ("properties", "global_shape", "axis_fragmentations", "layout", "chunk"))
    props = _obj(meta["properties"], "properties", ("dtype",))
    dtype = dtype_from_ms(props["dtype"])
    shape = _int_tuple(meta["global_shape"], "global_shape")
    frag = _int_tuple(meta["axis_fragmentations"], "axis_fragmentations", lo=1)
    if len(frag) != len(shape):
        raise FormatError(f"axis_fragmentations {list(frag)} do not match global_shape {list(shape)}")
    layout = _parse_layout(meta["layout"])
    raw_chunks = meta["chunk"]
    if not isinstance(raw_chunks, list):
        raise FormatError(f"chunk must be a list, got {type(raw_chunks).__name__}")
    step = tuple(n // f for n, f in zip(shape, frag))
    chunks = []
    for c in raw_chunks:
        _obj(c, "chunk", ("global_offset", "local_shape"))
        off = _int_tuple(c["global_offset"], "chunk global_offset", max_len=1 << 20)
        if len(off) != 1:
            raise FormatError(f"chunk global_offset {_short(c['global_offset'])} must be one linear slice index")
        local = _int_tuple(c["local_shape"], "chunk local_shape")
        if len(local) != len(shape):
            raise FormatError(f"chunk local_shape {list(local)} does not match global_shape {list(shape)}")
        k = off[0]
        if k >= math.prod(frag):
            raise FormatError(
                f"chunk global_offset [{k}] is out of range: axis_fragmentations {list(frag)} "
                f"have {math.prod(frag)} slices (0..{math.prod(frag) - 1})"
            )
        origin = tuple(i * s for i, s in zip(_unravel(k, frag), step))
        held = storage.get((name, k))
        if held is None:
            raise FormatError(f"chunk global_offset [{k}] has no storage_data entry {shard_id(name, k)!r}")
        chunks.append(MFChunk(k, Box(origin, local), tuple(held)))
    return MFTensor(
        name,
        dtype,
        shape,
        frag,
        layout,
        tuple(chunks),
        props.get("replica_id", 0),
        props.get("allow_shape_mismatch", False),
        props.get("allow_to_save", True),
    )


def parse_metadata(data: bytes, *, where: str = METADATA) -> MFMetadata:
    """Parse and check a ``metadata.json``; ``where`` (its path) prefixes every error message.

    Checks that every chunk is described once, lies in range, tiles its tensor exactly, and is
    held by plain-named files; that layouts, dtypes and shapes agree; and that every
    ``storage_data`` key is a canonical shard id of a described chunk.  Unknown extra keys are
    ignored, as MindFormers ignores them.
    """
    top = _load_json(data, where)
    _obj(top, f"{where}: top level", ("state_dict_metadata", "storage_data"))
    sdm = top["state_dict_metadata"]
    _obj(sdm, f"{where}: state_dict_metadata", ())
    storage = _parse_storage(top["storage_data"], where, sdm)
    tensors = []
    for name, meta in sdm.items():
        try:
            tensors.append(_parse_tensor(name, meta, storage))
        except (FormatError, LayoutError, StrategyError) as exc:
            msg = str(exc)
            prefix = f"tensor {name!r}: "
            raise FormatError(f"{where}: {msg if msg.startswith(prefix) else prefix + msg}") from None
    described = {(t.name, c.index) for t in tensors for c in t.chunks}
    orphans = [key for key in storage if key not in described]
    if orphans:
        name, k = orphans[0]
        raise FormatError(
            f"{where}: storage_data names chunk global_offset [{k}] of tensor {name!r}, "
            "which state_dict_metadata does not list"
        )
    return MFMetadata(tuple(tensors))


def dump_metadata(tensors: MFMetadata | Iterable[MFTensor]) -> bytes:
    """``metadata.json`` in MindFormers' own form (``metadata.save_metadata``: UTF-8, indent 4)."""
    md = tensors if isinstance(tensors, MFMetadata) else MFMetadata(tuple(tensors))
    state = {t.name: t.to_json() for t in md.tensors}
    storage = {shard_id(t.name, c.index): [s.to_json() for s in c.storage] for t in md.tensors for c in t.chunks}
    text = json.dumps({"state_dict_metadata": state, "storage_data": storage}, ensure_ascii=False, indent=4)
    return text.encode("utf-8")


@dataclass(frozen=True)
class StoredChunk:
    """Writer input: one box of a tensor, written to ``file_name`` by ``storage_rank``.

    ``storage_rank`` None: the lowest rank the layout gives this box.  The same box may be
    listed several times (replicas written by several ranks).
    """

    box: Box
    file_name: str
    storage_rank: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.box, Box):
            raise FormatError(f"StoredChunk.box must be a Box, got {type(self.box).__name__}")
        if not isinstance(self.file_name, str):
            raise FormatError(f"StoredChunk.file_name must be a string, got {_short(self.file_name)}")
        if self.storage_rank is not None and (not _is_int(self.storage_rank) or self.storage_rank < 0):
            raise FormatError(
                f"StoredChunk.storage_rank must be None or an integer >= 0, got {_short(self.storage_rank)}"
            )


def _grid_of(shape: tuple[int, ...], boxes: Sequence[Box], name: str) -> tuple[int, ...]:
    """axis_fragmentations of boxes that form an even grid, else LayoutError."""
    frag = []
    for d, n in enumerate(shape):
        spans = {(b.offsets[d], b.sizes[d]) for b in boxes}
        sizes = {s for _, s in spans}
        size = sizes.pop() if len(sizes) == 1 else -1
        if size < 0 or (size == 0 and n != 0):
            raise LayoutError(
                f"{name}: chunks have sizes {sorted(sizes | {size})[:4]} along dim {d}; MindFormers needs even slices"
            )
        f = n // size if size else 1
        if (size and n % size) or {o for o, _ in spans} != {i * size for i in range(f)}:
            raise LayoutError(f"{name}: chunks along dim {d} do not cut {n} into equal slices of {size}")
        frag.append(f)
    return tuple(frag)


def describe_tensor(
    name: str,
    dtype: str,
    shape: Sequence[int],
    chunks: Iterable[StoredChunk],
    *,
    layout: MFLayout | TensorLayout | None = None,
    rank_list: Sequence[int] | None = None,
) -> MFTensor:
    """An :class:`MFTensor` from distckpt-style facts, ready for :func:`dump_metadata`.

    * ``layout`` None: the boxes must form an even grid; the layout written is
      :meth:`MFLayout.grid` (one virtual rank per slice, rank k holding slice k);
    * a :class:`~distckpt.layout.TensorLayout` (with ``rank_list``, default
      ``range(device_num)``) or an :class:`MFLayout`: each box must be one of its slices.

    A chunk's ``storage_rank``, when given, must be a rank whose slice is exactly that box
    (MindFormers' loader looks files up by rank); None picks the lowest rank holding the box.

    ``rank_group`` is every rank holding the slice; ``replica_id`` is computed as MindFormers
    does (the i-th holder of a slice in ``rank_list`` order gets i).
    """
    shape_t = _int_tuple(shape, f"tensor {name!r}: global_shape")
    stored = list(chunks)
    if not stored:
        raise FormatError(f"tensor {name!r}: no chunk given")
    for c in stored:
        if c.box.ndim != len(shape_t):
            raise FormatError(f"tensor {name!r}: chunk {list(c.box.offsets)} does not match shape {list(shape_t)}")
    try:
        if layout is None:
            mfl = MFLayout.grid(_grid_of(shape_t, [c.box for c in stored], f"tensor {name!r}"))
        elif isinstance(layout, TensorLayout):
            mfl = MFLayout.from_tensor_layout(layout, rank_list)
        else:
            mfl = layout
    except LayoutError as exc:
        msg = str(exc)
        raise FormatError(msg if msg.startswith("tensor") else f"tensor {name!r}: {msg}") from None
    if mfl.interleaved_parallel:
        raise FormatError(f"tensor {name!r}: interleaved layouts are not written")
    if len(mfl.tensor_map) != len(shape_t):
        raise FormatError(f"tensor {name!r}: layout has {len(mfl.tensor_map)} dims, shape {list(shape_t)}")
    frag = mfl.splits()
    slices = mfl.slice_indices()
    groups: dict[int, list[int]] = {}
    replica: list[int] = []
    for pos, k in enumerate(slices):
        replica.append(len(groups.setdefault(k, [])))
        groups[k].append(mfl.rank_list[pos])
    holds = dict(zip(mfl.rank_list, slices))
    step = tuple(n // f for n, f in zip(shape_t, frag))
    by_index: dict[int, list[MFStorage]] = {}
    for c in stored:
        if c.storage_rank is None:
            k = _slice_of(c.box, step, frag, name)
            rank = min(groups[k])
        else:
            rank = c.storage_rank
            if rank not in holds:
                raise FormatError(f"tensor {name!r}: storage_rank {rank} is not in the layout's rank_list")
            k = holds[rank]
            want = Box(tuple(i * s for i, s in zip(_unravel(k, frag), step)), step)
            if c.box != want:
                raise FormatError(
                    f"tensor {name!r}: chunk {list(c.box.offsets)}+{list(c.box.sizes)} is not the slice rank {rank} "
                    f"holds under the layout ({list(want.offsets)}+{list(want.sizes)}); "
                    "MindFormers would read the wrong file"
                )
        entry = MFStorage(c.file_name, rank, tuple(groups[k]))
        if entry in by_index.setdefault(k, []):
            raise FormatError(f"tensor {name!r}: slice {k} is listed twice in {c.file_name!r} by rank {rank}")
        by_index[k].append(entry)
    mf_chunks = tuple(MFChunk(k, Box(tuple(i * s for i, s in zip(_unravel(k, frag), step)), step), tuple(v))
                      for k, v in sorted(by_index.items()))  # fmt: skip
    return MFTensor(name, dtype, shape_t, frag, mfl, mf_chunks, tuple(replica))


def _slice_of(box: Box, step: tuple[int, ...], frag: tuple[int, ...], name: str) -> int:
    coords = []
    for o, s, st, f in zip(box.offsets, box.sizes, step, frag):
        c = o // st if st else 0
        if s != st or c * st != o or c >= f:
            raise FormatError(
                f"tensor {name!r}: chunk {list(box.offsets)}+{list(box.sizes)} is not a slice of the layout"
            )
        coords.append(c)
    return _ravel(coords, frag)


def standalone_metadata(
    files: Mapping[str, Iterable[tuple[str, str, Sequence[int]]]], *, where: str = ""
) -> MFMetadata:
    """Metadata of an iteration without ``metadata.json``: each file holds whole tensors.

    ``files``: file name -> ``(tensor name, distckpt dtype, shape)`` of every tensor in it (from
    its safetensors header), in the order to report.  As MindFormers'
    ``metadata.generate_default_metadata_from_checkpoint`` reads such a directory, every tensor
    is one chunk held by rank 0, and a tensor in two files is refused.
    """
    pre = f"{where}: " if where else ""
    seen: dict[str, str] = {}
    tensors = []
    for fname, entries in files.items():
        for name, dtype, shape in entries:
            if name in seen:
                raise FormatError(
                    f"{pre}tensor {name!r} appears in both {seen[name]!r} and {fname!r}; "
                    "without metadata.json each tensor must be in one file (a multi-rank iteration lost its metadata.json?)"
                )
            seen[name] = fname
            box = Box((0,) * len(shape), tuple(shape))
            try:
                tensors.append(describe_tensor(name, dtype, shape, [StoredChunk(box, fname, 0)]))
            except FormatError as exc:
                raise FormatError(f"{pre}{exc}") from None
    return MFMetadata(tuple(tensors))


# --------------------------------------------------------------------------- common.json

_COMMON_INT = ("epoch_num", "step_num", "global_step", "global_batch_size", "ckpt_status")


@dataclass(frozen=True)
class MFCommon:
    """``common.json`` (``checkpoint.CommonInfo``); MindFormers leaves unset fields null.

    ``ckpt_status``: 0 healthy, 1 not (``utils.CkptHealthStatus``); null without the health monitor.
    """

    epoch_num: int | None = None
    step_num: int | None = None
    global_step: int | None = None
    loss_scale: float | None = None
    global_batch_size: int | None = None
    ckpt_status: int | None = None

    def __post_init__(self) -> None:
        for f in _COMMON_INT:
            v = getattr(self, f)
            if v is not None and (not _is_int(v) or v < 0):
                raise FormatError(f"{f} must be an integer >= 0 or null, got {_short(v)}")
        if self.ckpt_status not in (None, 0, 1):
            raise FormatError(f"ckpt_status must be 0 (healthy), 1 (unhealthy) or null, got {self.ckpt_status!r}")
        ls = self.loss_scale
        if ls is not None and (isinstance(ls, bool) or not isinstance(ls, (int, float))):
            raise FormatError(f"loss_scale must be a number or null, got {_short(ls)}")


def parse_common(data: bytes, *, where: str = COMMON) -> MFCommon:
    """Parse ``common.json``.  Unknown keys are refused: MindFormers' ``CommonInfo(**data)`` fails on them."""
    obj = _load_json(data, where, allow_nan=True)
    _obj(obj, f"{where}: top level", ())
    unknown = sorted(set(obj) - set(MFCommon.__dataclass_fields__))
    if unknown:
        raise FormatError(f"{where}: unknown field(s) {', '.join(map(repr, unknown[:5]))}; MindFormers cannot load it")
    try:
        return MFCommon(**obj)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None


def dump_common(common: MFCommon) -> bytes:
    """``common.json`` as ``CommonInfo.save_common`` writes it (indent 4, no trailing newline)."""
    if not isinstance(common, MFCommon):
        raise FormatError(f"dump_common needs an MFCommon, got {type(common).__name__}")
    d = {f: getattr(common, f) for f in MFCommon.__dataclass_fields__}
    return json.dumps(d, ensure_ascii=False, indent=4).encode("utf-8")


# --------------------------------------------------------------------------- model vs opt


def is_optimizer_state(name: str, model_names: Collection[str] | None = None) -> bool:
    """True when ``name`` goes to an ``opt`` file.

    MindFormers' rule is membership: a parameter is optimizer state iff it is not one of the
    network's parameters (``checkpoint.save_checkpoint``: ``choice_func=lambda x: x not in
    model_keys``; ``metadata.get_total_params_file_mapping_info``).  Pass ``model_names`` to
    apply it exactly.  Without them, the names MindFormers' optimizers give their state decide:
    ``global_step``, ``learning_rate``, ``afactor_step`` and the prefixes ``adam_m.``,
    ``adam_v.``, ``exp_avg.``, ``exp_avg_sq.``, ``max_exp_avg_sq.``, ``muon_m.``,
    ``pma_weight_``, ``exp_avg_sq_``, ``exp_avg_sq_row_``, ``exp_avg_sq_col_``,
    ``exp_avg_insta_row_``, ``exp_avg_insta_col_``.
    """
    if model_names is not None:
        return name not in model_names
    return name in _OPT_NAMES or name.startswith(_OPT_PREFIXES)
