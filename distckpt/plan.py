"""Plans are data: who writes which chunk, and which bytes a read needs.

Everything here is pure (no I/O).  The executors in ``distckpt.io`` and
``distckpt.api`` carry plans out.

* :func:`plan_save` -- from the layout alone, which rank writes each distinct
  box of each tensor; replicas are written once, spread round-robin over each
  replica set, deterministically, without moving tensor data between ranks.
* :func:`overlapping_chunks` -- the chunks of a tensor a target box touches,
  by binary search on dim 0: O((L + C) log C) over a whole load.
* :func:`plan_box_reads` -- for one (chunk, box) pair, the byte requests to
  issue, picked by a cost model (requests versus bytes).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import LayoutError
from .layout import Box, Strategy, full_box

__all__ = [
    "WriteItem",
    "plan_save",
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


def plan_save(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    strategy: Strategy | None,
    world_size: int,
) -> list[WriteItem]:
    """Assign every distinct box to one writer.

    ``tensors`` maps name -> (dtype, global shape).  Tensors absent from the
    strategy (or all tensors, without one) are full replicas on every rank.
    Each replica set (the ranks holding one box) hands its boxes out in turn,
    in name order, so writes spread evenly and every rank computes the same
    plan from the layout alone.
    """
    turn: dict[tuple[bytes, int], int] = {}
    everyone = np.arange(world_size, dtype=np.int64)
    items: list[WriteItem] = []

    def pick(ranks: np.ndarray) -> int:
        key = (np.ascontiguousarray(ranks[:64], dtype=np.int64).tobytes(), len(ranks))
        k = turn.get(key, 0)
        turn[key] = k + 1
        return int(ranks[k % len(ranks)])

    for name in sorted(tensors):
        dtype, shape = tensors[name]
        if strategy is not None and name in strategy:
            for box, ranks in strategy.replica_groups(name, shape):
                items.append(WriteItem(name, dtype, tuple(shape), box, pick(np.sort(ranks))))
        else:
            items.append(WriteItem(name, dtype, tuple(shape), full_box(shape), pick(everyone)))
    return items


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
