"""Plans are data: who writes which chunk, and which bytes a read needs.

Everything here is pure (no I/O).  :mod:`distckpt.execute` carries plans out;
the verbs in :mod:`distckpt.api` make them.  Decisions made here, once:

* :func:`check_fit` -- does a strategy fit a checkpoint's tensors (dims,
  divisibility, its own ``tensor_shape``), and which of its parameters the
  checkpoint lacks;
* :func:`plan_writes` -- which boxes *this* rank writes, in closed form from the
  layout (no enumeration of the world): each distinct box is written once, by
  one of the ranks holding it, chosen so that bytes (not counts) balance;
* :func:`plan_save` -- the same decision for every rank at once (offline
  writers, tests);
* :func:`plan_load` -- the boxes a rank needs from a checkpoint;
* :func:`plan_shared_reads` -- for a cooperative load, which rank of each replica
  group reads each box from storage (the others receive it).
* :func:`overlapping_chunks` -- the chunks of a tensor a target box touches,
  by binary search on dim 0: O((L + C) log C) over a whole load.
* :func:`plan_box_reads` -- for one (chunk, box) pair, the byte requests to
  issue, picked by a cost model (requests versus bytes).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import dtypes
from .errors import DistCkptError, LayoutError, StrategyError
from .layout import Box, Strategy, box_of, full_box

__all__ = [
    "WriteItem",
    "plan_writes",
    "plan_save",
    "check_fit",
    "LoadItem",
    "plan_load",
    "SharedRead",
    "plan_shared_reads",
    "ChunkLookup",
    "ReadRequest",
    "BoxRead",
    "plan_box_reads",
    "CostModel",
    "LOCAL_COST",
    "c_strides",
    "REMOTE_COST",
]


@dataclass(frozen=True)
class WriteItem:
    """Rank ``writer`` writes ``box`` of tensor ``name`` (global ``shape``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    box: Box
    writer: int


def _class_key(strategy: Strategy | None, name: str, world_size: int) -> tuple:
    if strategy is not None and name in strategy:
        return ("stages", strategy.params[name].stages)
    return ("all",)


def _replica(strategy: Strategy | None, name: str, rank: int, world_size: int) -> tuple[int, int]:
    if strategy is not None and name in strategy:
        return strategy.replica_index(name, rank)
    return world_size, rank


def _assign(items: list[tuple[str, int, int]], key: tuple) -> dict[str, int]:
    """Greedy by bytes within one replica class: ``items`` are (name, box bytes, group size g);
    each box goes to the least-loaded replica index; largest first (LPT), ties rotated by class.

    O(n log n) for n items whatever the group sizes: replica indices are tried in rotated order
    (``(j - rot) % g``); untouched ones all have load 0, so the next untouched index in that order
    is the best of them, and only touched ones need a heap.
    """
    heaps: dict[int, list[tuple[int, int, int]]] = {}  # g -> [(load, rotated position, index)]
    fresh: dict[int, int] = {}  # g -> rotated positions handed out so far
    out: dict[str, int] = {}
    rot = sum(map(ord, repr(key))) if items else 0
    for name, nbytes, g in sorted(items, key=lambda x: (-x[1], x[0])):
        heap = heaps.setdefault(g, [])
        k = fresh.get(g, 0)
        load = max(nbytes, 1)
        if k < g:  # an untouched index (load 0) beats every touched one (load >= 1)
            fresh[g] = k + 1
            j = (k + rot) % g
            heapq.heappush(heap, (load, k, j))
        else:
            old, pos, j = heap[0]
            heapq.heapreplace(heap, (old + load, pos, j))
        out[name] = j
    return out


def plan_writes(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    strategy: Strategy | None,
    world_size: int,
    rank: int,
) -> list[WriteItem]:
    """The boxes ``rank`` writes, from the layout alone, without enumerating the world.

    ``tensors`` maps name -> (dtype, global shape) of the tensors this rank holds
    (tensors the strategy does not name are full replicas on every rank).  The
    ranks holding one box form its replica group; every member numbers the group
    in closed form (:meth:`Strategy.replica_index`).  Within a replica class --
    the tensors held by the same pipeline stages (or by every rank) -- boxes are
    handed to replica indices greedily by bytes, so every member of a group,
    which holds every tensor of the class, computes the same assignment.
    """
    classes: dict[tuple, list[tuple[str, int, int]]] = {}
    mine: dict[str, tuple[int, Box]] = {}
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        box = box_of(strategy, name, shape, rank)
        if box is None:
            continue
        g, j = _replica(strategy, name, rank, world_size)
        key = _class_key(strategy, name, world_size)
        classes.setdefault(key, []).append((name, box.numel * dtypes.itemsize(dtype), g))
        mine[name] = (j, box)
    picks: dict[str, int] = {}
    for key, items in classes.items():
        picks.update(_assign(items, key))
    out = []
    for name, (j, box) in mine.items():
        if picks[name] == j:
            dtype, shape = tensors[name]
            out.append(WriteItem(name, dtype, tuple(shape), box, rank))
    return out


def plan_save(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    strategy: Strategy | None,
    world_size: int,
) -> list[WriteItem]:
    """Every rank's :func:`plan_writes` at once (offline writers and tests): each distinct box once.

    The same decisions, made vectorised: the class assignment gives each tensor a replica index,
    and in every replica group (its ranks sorted, which is replica-index order) that member writes.
    """
    classes: dict[tuple, list[tuple[str, int, int]]] = {}
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        if strategy is not None and name in strategy:
            spec = strategy.params[name]
            g = spec.layout.replica_index(spec.stages[0] * strategy.stage_device_num)[0] * len(spec.stages)
            box_bytes = math.prod(n // k for n, k in zip(shape, spec.layout.full_splits())) * dtypes.itemsize(dtype)
        else:
            g, box_bytes = world_size, math.prod(shape) * dtypes.itemsize(dtype)
        classes.setdefault(_class_key(strategy, name, world_size), []).append((name, box_bytes, g))
    picks: dict[str, int] = {}
    for key, items in classes.items():
        picks.update(_assign(items, key))
    out: list[WriteItem] = []
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        if strategy is not None and name in strategy:
            for box, ranks in strategy.replica_groups(name, shape):
                out.append(WriteItem(name, dtype, tuple(shape), box, int(ranks[picks[name]])))
        else:
            out.append(WriteItem(name, dtype, tuple(shape), full_box(shape), picks[name]))
    return out


def check_fit(strategy: Strategy, shapes: Mapping[str, tuple[int, ...]], *, what: str = "strategy") -> list[str]:
    """Check every parameter of ``strategy`` that ``shapes`` holds fits it; return the parameters ``shapes`` lacks.

    A parameter fits when it has as many dims as the layout's tensor map, every
    dim divides by its split count, and the strategy's own ``tensor_shape`` (if
    any) is the tensor's shape.
    """
    missing = []
    for name, spec in strategy.params.items():
        shape = shapes.get(name)
        if shape is None:
            missing.append(name)
            continue
        if spec.shape is not None and tuple(spec.shape) != tuple(shape):
            raise StrategyError(
                f"{what} does not fit the checkpoint: tensor {name!r} has shape {list(shape)} but the strategy's "
                f"tensor_shape says {list(spec.shape)}"
            )
        try:
            spec.layout.validate(shape, name)
        except DistCkptError as exc:
            raise StrategyError(f"{what} does not fit the checkpoint: {exc}") from None
    return missing


@dataclass(frozen=True)
class SharedRead:
    """Box ``box`` of tensor ``name``: read from storage by ``reader`` and sent to the other ``members``."""

    name: str
    box: Box
    reader: int
    members: tuple[int, ...]


def plan_shared_reads(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    strategy: Strategy | None,
    world_size: int,
    rank: int,
) -> list[SharedRead]:
    """Cooperative load: for every box ``rank`` needs, which member of its replica group reads it.

    The ranks that need one box (its replica group, closed form:
    :meth:`Strategy.replica_members`) agree without talking: within a replica
    class, boxes go to members greedily by bytes (the rule :func:`plan_writes`
    uses), so the job pulls every needed byte from storage once and readers are
    spread by bytes.  In name order, so that every pair of ranks posts its
    transfers in the same order.
    """
    classes: dict[tuple, list[tuple[str, int, int]]] = {}
    mine: dict[str, tuple[Box, tuple[int, ...], tuple]] = {}
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        box = box_of(strategy, name, shape, rank)
        if box is None:
            continue
        if strategy is not None and name in strategy:
            members = tuple(int(r) for r in strategy.replica_members(name, rank))
        else:
            members = tuple(range(world_size))
        key = _class_key(strategy, name, world_size)
        classes.setdefault(key, []).append((name, box.numel * dtypes.itemsize(dtype), len(members)))
        mine[name] = (box, members, key)
    picks: dict[str, int] = {}
    for key, items in classes.items():
        picks.update(_assign(items, key))
    return [SharedRead(name, box, members[picks[name]], members) for name, (box, members, _key) in mine.items()]


@dataclass(frozen=True)
class LoadItem:
    """Read ``box`` of tensor ``name`` (global ``shape``)."""

    name: str
    shape: tuple[int, ...]
    box: Box


def plan_load(
    shapes: Mapping[str, tuple[int, ...]], strategy: Strategy | None, rank: int, names=None
) -> list[LoadItem]:
    """The boxes ``rank`` holds under ``strategy`` (checked with :func:`check_fit` first), in ``shapes`` order."""
    want = set(names) if names is not None else None
    out = []
    for name, shape in shapes.items():
        if want is not None and name not in want:
            continue
        box = box_of(strategy, name, shape, rank)
        if box is not None:
            out.append(LoadItem(name, tuple(shape), box))
    return out


class ChunkLookup:
    """Find the chunks a box touches: chunks sorted by dim-0 start, binary search."""

    def __init__(self, boxes: Sequence[Box]):
        self.boxes = list(boxes)
        if self.boxes and self.boxes[0].ndim:
            self.order = sorted(range(len(self.boxes)), key=lambda i: self.boxes[i].offsets[0])
            self.starts = [self.boxes[i].offsets[0] for i in self.order]
            self.max_len = max(b.sizes[0] for b in self.boxes)
        else:
            self.order = list(range(len(self.boxes)))
            self.starts = []
            self.max_len = 0

    def overlapping(self, target: Box) -> list[tuple[int, Box]]:
        """(chunk index, intersection) for every chunk overlapping ``target``."""
        if not self.boxes:
            return []
        if target.ndim == 0:
            return [(i, b) for i, b in enumerate(self.boxes)][:1]
        lo = bisect.bisect_left(self.starts, target.offsets[0] - self.max_len + 1)
        hi = bisect.bisect_left(self.starts, target.ends[0])
        out = []
        for j in range(lo, hi):
            i = self.order[j]
            inter = self.boxes[i].intersect(target)
            if inter is not None and inter.numel:
                out.append((i, inter))
        return out


@dataclass(frozen=True)
class CostModel:
    """Seconds per request and per byte; the reader minimises their sum."""

    per_request: float
    per_byte: float


LOCAL_COST = CostModel(per_request=20e-6, per_byte=1 / 2e9)
REMOTE_COST = CostModel(per_request=5e-3, per_byte=1 / 2e8)


@dataclass(frozen=True)
class ReadRequest:
    """Read ``length`` chunk bytes from chunk byte ``start``; view them with the box's strides."""

    start: int
    length: int
    outer: tuple[int, ...]  # index of this request among the grouped outer dims


@dataclass(frozen=True)
class BoxRead:
    """How to fetch ``inter`` (a box inside ``chunk``): ``depth`` outer dims are iterated."""

    chunk: Box
    inter: Box
    depth: int
    requests: tuple[ReadRequest, ...]
    itemsize: int

    @property
    def bytes_needed(self) -> int:
        return self.inter.numel * self.itemsize

    @property
    def bytes_read(self) -> int:
        return sum(r.length for r in self.requests)


def c_strides(sizes: Sequence[int], itemsize: int) -> list[int]:
    """Byte strides of a C-order array."""
    out = [itemsize] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        out[d] = out[d + 1] * sizes[d + 1]
    return out


def plan_box_reads(chunk: Box, inter: Box, itemsize: int, cost: CostModel = LOCAL_COST, *, max_requests: int = 1 << 16) -> BoxRead:
    """Pick the byte requests that fetch ``inter`` from a C-order ``chunk`` at least cost.

    At depth ``g`` one request is issued per index of the first ``g`` dims of
    ``inter``, each covering the span from its first to its last needed byte.
    ``g = 0`` is one covering read; the largest useful ``g`` reads only needed
    bytes.  The cheapest depth by the cost model wins.
    """
    if not chunk.contains(inter):
        raise LayoutError(f"box {inter.offsets}+{inter.sizes} is not inside chunk {chunk.offsets}+{chunk.sizes}")
    nd = chunk.ndim
    rel = [o - c for o, c in zip(inter.offsets, chunk.offsets)]
    strides = c_strides(chunk.sizes, itemsize)
    if nd == 0 or inter.numel == 0:
        return BoxRead(chunk, inter, 0, (ReadRequest(0, itemsize if nd == 0 else 0, ()),), itemsize)
    # innermost dim from which the needed region is one contiguous run
    k = nd - 1
    while k > 0 and inter.sizes[k] == chunk.sizes[k]:
        k -= 1
    best = None
    for g in range(0, k + 1):
        nreq = math.prod(inter.sizes[:g])
        if nreq > max_requests and g > 0:
            break
        span = itemsize + sum((s - 1) * st for s, st in zip(inter.sizes[g:], strides[g:]))
        c = nreq * cost.per_request + nreq * span * cost.per_byte
        if best is None or c < best[0]:
            best = (c, g, span)
    assert best is not None
    _, g, span = best
    base = sum(r * st for r, st in zip(rel, strides))
    if g == 0:
        reqs: tuple[ReadRequest, ...] = (ReadRequest(base, span, ()),)
    else:
        grids = np.indices(inter.sizes[:g]).reshape(g, -1).T
        starts = base + grids @ np.asarray(strides[:g], dtype=np.int64)
        reqs = tuple(ReadRequest(int(s), span, tuple(int(x) for x in idx)) for s, idx in zip(starts, grids))
    return BoxRead(chunk, inter, g, reqs, itemsize)
