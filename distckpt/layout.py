"""Pure sharding math: boxes, MindSpore tensor layouts, strategies.

No I/O and no framework imports.  Everything here is a frozen value that
validates itself and names the bad value when it does not.

MindSpore semantics (DESIGN §2.2):

* ``tensor_map[i]`` names device axes counted **from the right** of
  ``dev_matrix``; ``-1`` means dim ``i`` is not split.  A nested entry splits
  one dim over several axes, the first listed being the outermost.
* a rank's coordinates are the row-major unravel of ``rank % prod(dev_matrix)``.
* the parallel optimizer splits dim 0 of the model-parallel slice again into
  ``opt_shard_size`` pieces; a rank holds piece
  ``(rank // opt_shard_step) % opt_shard_size``
  (``mindspore/parallel/_tensor.py: _construct_tensor_layout_for_opt_shard``).
* pipeline stage ``s`` owns ranks ``[s * stage_device_num, (s+1) * stage_device_num)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import LayoutError, StrategyError

#: Largest device count a strategy may describe (per stage and in total).  Planning
#: holds a few int64 arrays with one entry per rank, so a hostile or mistyped
#: strategy (``dev_matrix [100000, 100000]``) is refused instead of exhausting memory.
MAX_DEVICES = 1 << 24
#: Most dims a tensor (and most axes a dev_matrix) may have: numpy's limit.
MAX_NDIM = 32

__all__ = [
    "MAX_DEVICES",
    "MAX_NDIM",
    "Box",
    "TensorLayout",
    "ParamSpec",
    "Strategy",
    "check_tiling",
    "full_box",
    "box_of",
]


def _ints(values: Iterable, what: str) -> tuple[int, ...]:
    values = tuple(values)
    if all(type(v) is int for v in values):  # fast path: a million chunk boxes in an index
        return values
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise LayoutError(f"{what} must hold integers, got {v!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class Box:
    """An n-d rectangle of a tensor: ``offsets`` and ``sizes`` per dim."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "offsets", _ints(self.offsets, "Box.offsets"))
        object.__setattr__(self, "sizes", _ints(self.sizes, "Box.sizes"))
        if len(self.offsets) != len(self.sizes):
            raise LayoutError(f"Box offsets {self.offsets} and sizes {self.sizes} differ in rank")
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.sizes):
            raise LayoutError(f"Box offsets {self.offsets} / sizes {self.sizes} must be >= 0")

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def intersect(self, other: Box) -> Box | None:
        """The common part of two boxes, or None when they do not overlap."""
        if self.ndim != other.ndim:
            raise LayoutError(f"cannot intersect boxes of rank {self.ndim} and {other.ndim}")
        offs, sizes = [], []
        for a0, a1, b0, b1 in zip(self.offsets, self.ends, other.offsets, other.ends):
            lo, hi = max(a0, b0), min(a1, b1)
            if hi <= lo:
                return None
            offs.append(lo)
            sizes.append(hi - lo)
        if self.ndim == 0:
            return self
        return Box(tuple(offs), tuple(sizes))

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """Index of this box inside an array that holds ``outer``."""
        return tuple(
            slice(o - oo, o - oo + s) for o, s, oo in zip(self.offsets, self.sizes, outer.offsets)
        )

    def contains(self, other: Box) -> bool:
        return all(
            a0 <= b0 and b1 <= a1
            for a0, a1, b0, b1 in zip(self.offsets, self.ends, other.offsets, other.ends)
        )

    def to_json(self) -> dict:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes)}


def full_box(shape: Sequence[int]) -> Box:
    return Box((0,) * len(shape), tuple(shape))


def check_tiling(shape: Sequence[int], boxes: Iterable[Box], *, name: str = "tensor") -> None:
    """Raise unless ``boxes`` cover every element of ``shape`` exactly once.

    Works in O(C log C) for boxes that form a grid-aligned tiling and falls
    back to counting volume plus pairwise disjointness along sorted dim 0.
    """
    shape = tuple(shape)
    boxes = list(boxes)
    whole = full_box(shape)
    total = 0
    for b in boxes:
        if b.ndim != len(shape):
            raise LayoutError(f"{name}: chunk {b} has rank {b.ndim}, tensor has shape {shape}")
        if not whole.contains(b):
            raise LayoutError(f"{name}: chunk {b.offsets}+{b.sizes} lies outside shape {shape}")
        total += b.numel
    if total != whole.numel:
        raise LayoutError(
            f"{name}: chunks cover {total} elements but shape {shape} has {whole.numel}"
            " (missing or overlapping chunks)"
        )
    if len(shape) == 0 or len(boxes) <= 1:
        if len(shape) == 0 and len(boxes) != 1:
            raise LayoutError(f"{name}: scalar needs exactly one chunk, got {len(boxes)}")
        return
    # Volumes add up; any overlap would then imply a gap.  Sweep on dim 0 to
    # find overlaps: only boxes whose dim-0 ranges overlap can intersect.
    order = sorted(boxes, key=lambda b: b.offsets[0])
    active: list[Box] = []
    for b in order:
        active = [a for a in active if a.ends[0] > b.offsets[0]]
        for a in active:
            if a.intersect(b) is not None and a.numel and b.numel:
                raise LayoutError(f"{name}: chunks {a.offsets}+{a.sizes} and {b.offsets}+{b.sizes} overlap")
        active.append(b)


def _norm_tensor_map(tensor_map) -> tuple[tuple[int, ...], ...]:
    out = []
    for entry in tensor_map:
        if isinstance(entry, (list, tuple)):
            axes = _ints(entry, "tensor_map entry")
            axes = tuple(a for a in axes if a != -1)
        else:
            (a,) = _ints([entry], "tensor_map entry")
            axes = () if a == -1 else (a,)
        out.append(axes)
    return tuple(out)


@dataclass(frozen=True)
class TensorLayout:
    """How one tensor is cut over a device matrix (one pipeline stage)."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]
    opt_shard_step: int = 0
    opt_shard_size: int = 0
    _opt_axes: tuple[tuple[int, int], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        dm = _ints(self.dev_matrix, "dev_matrix")
        if not dm or any(d < 1 for d in dm):
            raise StrategyError(f"dev_matrix {list(dm)[:MAX_NDIM]} must be non-empty positive integers")
        if len(dm) > MAX_NDIM:
            raise StrategyError(f"dev_matrix has {len(dm)} axes; at most {MAX_NDIM} are supported")
        if math.prod(dm) > MAX_DEVICES:
            raise StrategyError(
                f"dev_matrix {list(dm)} describes {math.prod(dm)} devices; distckpt supports at most "
                f"{MAX_DEVICES} (2**24): the strategy file is corrupt or not a MindSpore strategy"
            )
        object.__setattr__(self, "dev_matrix", dm)
        tm = _norm_tensor_map(self.tensor_map)
        if len(tm) > MAX_NDIM:
            raise StrategyError(f"tensor_map has {len(tm)} dims; tensors have at most {MAX_NDIM}")
        object.__setattr__(self, "tensor_map", tm)
        seen: set[int] = set()
        for axes in tm:
            for a in axes:
                if not 0 <= a < len(dm):
                    raise StrategyError(
                        f"tensor_map {self.json_tensor_map()} names device axis {a}, "
                        f"but dev_matrix {list(dm)} has {len(dm)} axes"
                    )
                if a in seen:
                    raise StrategyError(f"tensor_map {self.json_tensor_map()} uses device axis {a} twice")
                seen.add(a)
        step, size = int(self.opt_shard_step), int(self.opt_shard_size)
        if step < 0 or size < -1:
            raise StrategyError(f"bad optimizer shard step {step} / size {size}")
        if size == -1:  # all replicated axes (MindSpore _extract_layout_item)
            size = math.prod(dm[i] for i in self._replicated_axes(dm, tm))
        if step == 0 or size <= 1:
            step, size = 0, 0
        object.__setattr__(self, "opt_shard_step", step)
        object.__setattr__(self, "opt_shard_size", size)
        object.__setattr__(self, "_opt_axes", self._resolve_opt_axes(dm, tm, step, size))

    @staticmethod
    def _replicated_axes(dm: tuple[int, ...], tm: tuple[tuple[int, ...], ...]) -> list[int]:
        """dev_matrix indices (from the left) that no tensor dim is split over, of size > 1."""
        sharded = {len(dm) - 1 - a for axes in tm for a in axes}
        return [i for i, n in enumerate(dm) if i not in sharded and n > 1]

    def _resolve_opt_axes(self, dm, tm, step: int, size: int) -> tuple[tuple[int, int], ...]:
        """The replicated axes the optimizer shard uses, taken from the right, as (index, modulus).

        Mirrors ``mindspore/parallel/_tensor.py: _construct_tensor_layout_for_opt_shard``
        and its helper: an axis larger than the remaining shard count is split and
        its fast-varying part (coordinate % remaining) is used.
        """
        if not size:
            return ()
        rep = self._replicated_axes(dm, tm)
        where = f"dev_matrix {list(dm)} tensor_map {self.json_tensor_map()}"
        if not rep:
            raise StrategyError(f"{where} has no replicated device axis for an optimizer shard of {size}")
        if len(rep) == 1 and math.prod(dm[rep[0] + 1 :]) != step:
            raise StrategyError(
                f"{where}: optimizer shard step {step} must equal the stride {math.prod(dm[rep[0] + 1:])} "
                "of the replicated device axis (MindSpore requires it)"
            )
        remaining, used = size, []
        for i in reversed(rep):
            n = dm[i]
            if remaining < n:
                if n % remaining:
                    raise StrategyError(f"{where}: device axis of size {n} cannot be divided by optimizer shard {remaining}")
                used.append((i, remaining))
                remaining = 1
            else:
                if remaining % n:
                    raise StrategyError(f"{where}: optimizer shard {remaining} is not divisible by device axis size {n}")
                used.append((i, n))
                remaining //= n
            if remaining == 1:
                break
        if remaining != 1:
            raise StrategyError(f"{where}: optimizer shard {size} exceeds the replicated devices")
        return tuple(sorted(used))

    def json_tensor_map(self) -> list:
        return [list(a) if len(a) > 1 else (a[0] if a else -1) for a in self.tensor_map]

    @property
    def device_num(self) -> int:
        return math.prod(self.dev_matrix)

    def axis_size(self, axis: int) -> int:
        return self.dev_matrix[len(self.dev_matrix) - 1 - axis]

    @property
    def splits(self) -> tuple[int, ...]:
        """Model-parallel split count per tensor dim."""
        return tuple(math.prod(self.axis_size(a) for a in axes) for axes in self.tensor_map)

    def full_splits(self) -> tuple[int, ...]:
        """Split count per dim including the optimizer shard on dim 0."""
        s = list(self.splits)
        if self.opt_shard_size and s:
            s[0] *= self.opt_shard_size
        return tuple(s)

    def validate(self, shape: Sequence[int], name: str = "tensor") -> None:
        shape = tuple(shape)
        if len(shape) != len(self.tensor_map):
            raise StrategyError(
                f"{name}: strategy tensor_map {self.json_tensor_map()} has {len(self.tensor_map)} dims "
                f"but the tensor has shape {list(shape)}"
            )
        for i, (n, k) in enumerate(zip(shape, self.full_splits())):
            if n % k:
                raise StrategyError(
                    f"{name}: dim {i} of shape {list(shape)} is not divisible by its split count {k} "
                    f"(dev_matrix {list(self.dev_matrix)}, tensor_map {self.json_tensor_map()}"
                    + (f", optimizer shard {self.opt_shard_size}" if self.opt_shard_size else "")
                    + ")"
                )

    def block_indices(self, ranks: np.ndarray) -> np.ndarray:
        """Block index per dim (including the optimizer shard) for many ranks: (R, ndim)."""
        ranks = np.asarray(ranks, dtype=np.int64) % self.device_num
        coords = np.stack(np.unravel_index(ranks, self.dev_matrix), axis=-1) if ranks.size else np.zeros((0, len(self.dev_matrix)), np.int64)
        nd = len(self.dev_matrix)
        out = np.zeros((ranks.shape[0], len(self.tensor_map)), dtype=np.int64)
        for i, axes in enumerate(self.tensor_map):
            idx = np.zeros(ranks.shape[0], dtype=np.int64)
            for a in axes:  # first listed axis is outermost
                idx = idx * self.axis_size(a) + coords[:, nd - 1 - a]
            out[:, i] = idx
        if self.opt_shard_size and out.shape[1]:
            opt = np.zeros(ranks.shape[0], dtype=np.int64)
            for i, mod in self._opt_axes:  # leftmost axis outermost
                opt = opt * mod + coords[:, i] % mod
            out[:, 0] = out[:, 0] * self.opt_shard_size + opt
        return out

    def replica_index(self, rank: int) -> tuple[int, int]:
        """``(g, j)``: ``rank``'s box is held by ``g`` ranks of its stage, and ``rank`` is the ``j``-th of them.

        Closed form (no enumeration of the world): the ranks holding one box
        differ only in their coordinates on the device axes that neither the
        tensor map nor the optimizer shard uses, and in the part of a
        partially used optimizer axis that the shard does not take
        (``coordinate // modulus``).  ``j`` is the mixed-radix number of those
        coordinates, so the ``g`` holders are numbered ``0..g-1`` in rank order.
        """
        dm = self.dev_matrix
        coords = np.unravel_index(int(rank) % self.device_num, dm)
        mapped = {len(dm) - 1 - a for axes in self.tensor_map for a in axes}
        opt = dict(self._opt_axes)
        g, j = 1, 0
        for i, n in enumerate(dm):
            if i in mapped:
                continue
            c = int(coords[i])
            if i in opt:
                n, c = n // opt[i], c // opt[i]
            g, j = g * n, j * n + c
        return g, j

    def box(self, rank: int, shape: Sequence[int]) -> Box:
        """The part of a tensor of global ``shape`` that ``rank`` holds."""
        shape = tuple(shape)
        splits = self.full_splits()
        blocks = self.block_indices(np.array([rank]))[0]
        sizes = tuple(n // k for n, k in zip(shape, splits))
        return Box(tuple(int(b) * s for b, s in zip(blocks, sizes)), sizes)

    def to_json(self) -> dict:
        return {
            "dev_matrix": list(self.dev_matrix),
            "tensor_map": self.json_tensor_map(),
            "opt_weight_shard_step": self.opt_shard_step,
            "opt_weight_shard_size": self.opt_shard_size,
        }


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a strategy: its layout, the stages that hold it, its global shape if known."""

    name: str
    layout: TensorLayout
    stages: tuple[int, ...] = (0,)
    shape: tuple[int, ...] | None = None
    field: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(sorted(set(_ints(self.stages, "stages")))))
        if self.shape is not None:
            object.__setattr__(self, "shape", _ints(self.shape, f"{self.name}: tensor_shape"))


@dataclass(frozen=True)
class Strategy:
    """What every rank of a job holds: parameter layouts over pipeline stages."""

    params: Mapping[str, ParamSpec]
    num_stages: int = 1
    stage_device_num: int = field(default=0)

    def __post_init__(self):
        params = dict(self.params)
        object.__setattr__(self, "params", params)
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, (int, np.integer)) or self.num_stages < 1:
            raise StrategyError(f"num_stages must be a positive integer, got {self.num_stages!r}")
        dn = {p.layout.device_num for p in params.values()}
        if self.stage_device_num == 0:
            if len(dn) > 1:
                raise StrategyError(f"layouts disagree on the device count per stage: {sorted(dn)}")
            object.__setattr__(self, "stage_device_num", dn.pop() if dn else 1)
        for p in params.values():
            if p.layout.device_num != self.stage_device_num:
                raise StrategyError(
                    f"{p.name}: dev_matrix {list(p.layout.dev_matrix)} covers {p.layout.device_num} devices, "
                    f"other parameters cover {self.stage_device_num}"
                )
            for s in p.stages:
                if not 0 <= s < self.num_stages:
                    raise StrategyError(f"{p.name}: stage {s} outside 0..{self.num_stages - 1}")
        if self.world_size > MAX_DEVICES:
            raise StrategyError(
                f"{self.num_stages} pipeline stage(s) x {self.stage_device_num} devices = {self.world_size} ranks; "
                f"distckpt supports at most {MAX_DEVICES} (2**24): the strategy file is corrupt"
            )

    @property
    def world_size(self) -> int:
        return self.num_stages * self.stage_device_num

    def stage_of(self, rank: int) -> int:
        return rank // self.stage_device_num

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def holds(self, name: str, rank: int) -> bool:
        return self.stage_of(rank) in self.params[name].stages

    def global_shape(self, name: str, local_shape: Sequence[int]) -> tuple[int, ...]:
        """Global shape from the slice one rank holds."""
        spec = self.params[name]
        if len(local_shape) != len(spec.layout.tensor_map):
            raise StrategyError(
                f"{name}: strategy tensor_map {spec.layout.json_tensor_map()} has "
                f"{len(spec.layout.tensor_map)} dims but the slice has shape {list(local_shape)}"
            )
        return tuple(int(n) * k for n, k in zip(local_shape, spec.layout.full_splits()))

    def box(self, name: str, rank: int, shape: Sequence[int]) -> Box | None:
        """The part of ``name`` that ``rank`` holds, None if its stage does not hold it."""
        spec = self.params[name]
        if not self.holds(name, rank):
            return None
        return spec.layout.box(rank, shape)

    def replica_index(self, name: str, rank: int) -> tuple[int, int]:
        """``(g, j)``: ``g`` ranks (over every stage holding ``name``) hold ``rank``'s box; ``rank`` is the ``j``-th."""
        spec = self.params[name]
        g, j = spec.layout.replica_index(rank)
        pos = spec.stages.index(self.stage_of(rank))
        return g * len(spec.stages), pos * g + j

    def replica_members(self, name: str, rank: int) -> np.ndarray:
        """The ranks holding ``rank``'s box of ``name``, numbered as :meth:`replica_index` numbers them.

        Closed form: ``rank``'s coordinates on the tensor-map axes (and the shard part of an optimizer
        axis) are kept, the others vary, in every stage holding ``name``.
        """
        spec = self.params[name]
        lay = spec.layout
        dm = lay.dev_matrix
        coords = np.unravel_index(int(rank) % lay.device_num, dm)
        mapped = {len(dm) - 1 - a for axes in lay.tensor_map for a in axes}
        opt = dict(lay._opt_axes)
        values = []
        for i, n in enumerate(dm):
            c = int(coords[i])
            if i in mapped:
                values.append(np.array([c]))
            elif i in opt:
                m = opt[i]
                values.append(c % m + m * np.arange(n // m))
            else:
                values.append(np.arange(n))
        grid = np.stack(np.meshgrid(*values, indexing="ij"), axis=-1).reshape(-1, len(dm))
        local = np.ravel_multi_index(tuple(grid.T), dm)
        return np.concatenate([s * self.stage_device_num + local for s in spec.stages]).astype(np.int64)

    def ranks_holding(self, name: str) -> np.ndarray:
        spec = self.params[name]
        return np.concatenate(
            [np.arange(s * self.stage_device_num, (s + 1) * self.stage_device_num) for s in spec.stages]
        ) if spec.stages else np.zeros(0, np.int64)

    def replica_groups(self, name: str, shape: Sequence[int]) -> list[tuple[Box, np.ndarray]]:
        """Distinct boxes of ``name`` with the ranks that hold each, in box order."""
        spec = self.params[name]
        spec.layout.validate(shape, name)
        sizes = tuple(int(n) // k for n, k in zip(shape, spec.layout.full_splits()))
        if not spec.layout.tensor_map:
            return [(Box((), ()), self.ranks_holding(name))]
        uniq, members = _block_groups(spec.layout, spec.stages, self.stage_device_num)
        return [
            (Box(tuple(int(b) * s for b, s in zip(row, sizes)), sizes), ranks)
            for row, ranks in zip(uniq.tolist(), members)
        ]

    def subset(self, names: Iterable[str]) -> Strategy:
        keep = set(names)
        return Strategy(
            {n: p for n, p in self.params.items() if n in keep},
            self.num_stages,
            self.stage_device_num,
        )


@functools.lru_cache(maxsize=1024)
def _block_groups(layout: TensorLayout, stages: tuple[int, ...], stage_device_num: int):
    """Distinct block indices of ``layout`` and the (sorted) ranks holding each.

    Depends only on the layout and stages, not on the tensor, so tensors that
    share a layout share the work (planning 10,000 ranks x 1,000 tensors).
    One integer key per rank (its row-major block number) makes this a 1-d
    unique, ~100x faster than ``np.unique(axis=0)``, in the same order.
    """
    ranks = (
        np.concatenate([np.arange(s * stage_device_num, (s + 1) * stage_device_num) for s in stages])
        if stages
        else np.zeros(0, np.int64)
    )
    blocks = layout.block_indices(ranks)
    splits = layout.full_splits()
    keys = np.ravel_multi_index(tuple(blocks.T), splits)
    ukeys, inverse = np.unique(keys, return_inverse=True)
    uniq = np.stack(np.unravel_index(ukeys, splits), axis=-1)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(ukeys) + 1))
    members = []
    for g in range(len(ukeys)):
        m = ranks[order[bounds[g] : bounds[g + 1]]]
        m.setflags(write=False)
        members.append(m)
    uniq.setflags(write=False)
    return uniq, tuple(members)


def box_of(strategy: Strategy | None, name: str, shape: Sequence[int], rank: int) -> Box | None:
    """The box of tensor ``name`` (global ``shape``) that ``rank`` holds: all of it when the strategy
    does not name it, None when the rank's pipeline stage does not hold it."""
    if strategy is None or name not in strategy:
        return full_box(shape)
    if not strategy.holds(name, rank):
        return None
    return strategy.params[name].layout.box(rank, shape)
