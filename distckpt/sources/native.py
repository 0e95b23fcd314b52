"""MindSpore distributed checkpoints: ``rank_*/`` directories of ``.ckpt`` or ``.safetensors`` files.

A rank directory holds that rank's slices; which slice is which comes from the
parallel strategy the job saved with (given, or a strategy file found inside
SRC).  Rules, as MindSpore's own loaders apply them:

* the file of a rank directory is the last ``.ckpt`` in sort order, else the
  ``.safetensors`` with the largest trailing number;
* parameters the strategy does not name are full tensors (taken from the first
  rank that has them), e.g. ``global_step``;
* a parameter held by another pipeline stage's ranks is ignored there;
* ``remove_redundancy`` checkpoints keep each replicated slice on one rank of
  its replica group only: a slice missing from one rank is taken from any
  replica that holds it, and only a slice that *no* replica holds is an error;
* a strategy parameter that no file holds at all is skipped, as
  ``transform_checkpoints`` skips it, and reported in ``info["missing"]`` so the
  verbs can warn (or fail with ``strict``).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np

from .. import naming
from ..errors import DistCkptError, FormatError, StrategyError
from ..index import Chunk, Index, TensorInfo
from ..layout import Strategy, check_tiling
from ..storage import Store
from .files import entry_value, file_entries, full_chunk

__all__ = ["pick_rank_file", "find_strategy", "index_of_rank_dirs"]

_TRAILING_NUM = re.compile(r"(\d+)(?!.*\d)")


def pick_rank_file(storage: Store, rank_dir: str) -> str:
    """The file MindSpore would load from ``rank_dir``."""
    try:
        names = [n for n in storage.listdir(rank_dir) if n.endswith((".ckpt", ".safetensors"))]
    except NotADirectoryError:
        raise FormatError(f"{storage.child_url(rank_dir)}: is a file; a rank directory must be a directory") from None
    ckpts = sorted(n for n in names if n.endswith(".ckpt"))
    if ckpts:  # MindSpore takes the last name in sort order
        return f"{rank_dir}/{ckpts[-1]}"
    sts = [n for n in names if n.endswith(".safetensors")]
    if sts:  # ... and the safetensors file with the largest trailing number

        def key(n: str):
            m = _TRAILING_NUM.search(n[: -len(".safetensors")])
            return (int(m.group(1)) if m else -1, n)

        return f"{rank_dir}/{max(sts, key=key)}"
    raise FormatError(f"{storage.child_url(rank_dir)}: no .ckpt or .safetensors file in this rank directory")


def find_strategy(storage: Store) -> str | None:
    """URL of the one strategy file (or ``strategy/`` directory) inside SRC, if any."""
    cands = [n for n in storage.listdir() if naming.STRATEGY_FILE.match(n) and not storage.isdir(n)]
    if not cands:
        if storage.isdir("strategy"):
            sub = [n for n in storage.listdir("strategy") if n.endswith((".ckpt", ".pb", ".json"))]
            if sub:
                return storage.child_url("strategy")
        return None
    if len(cands) > 1:
        raise StrategyError(
            f"{storage.url}: several strategy files ({', '.join(cands)}); pass the one this job saved with as --src-strategy"
        )
    return storage.child_url(cands[0])


def _check_world(storage: Store, rank_dirs: dict[int, str], strategy: Strategy) -> None:
    world = strategy.world_size
    have = sorted(rank_dirs)
    missing = list(itertools.islice((r for r in range(world) if r not in rank_dirs), 9))
    if missing:
        shown = f"rank_{have[0]}..rank_{have[-1]}" if have else "no rank directories"
        raise StrategyError(
            f"strategy has {world} ranks but {storage.url} has {shown} (missing "
            f"{', '.join(f'rank_{r}' for r in missing[:8])}{'...' if len(missing) > 8 else ''}): "
            "pass the strategy this job saved with"
        )
    extra = [r for r in have if r >= world]
    if extra:
        raise StrategyError(
            f"{storage.url} holds {len(have)} rank directories (rank_{have[0]}..rank_{have[-1]}) but the strategy "
            f"describes {world} ranks: it is not the strategy this checkpoint was saved with; pass the right "
            "--src-strategy"
        )


def index_of_rank_dirs(storage: Store, rank_dirs: dict[int, str], strategy: Strategy | None) -> tuple[Index, dict]:
    """The virtual index of a MindSpore distributed directory, and extra info (``missing``)."""
    if strategy is None:
        raise StrategyError(
            f"{storage.url}: a MindSpore distributed checkpoint ({len(rank_dirs)} rank directories) needs its "
            "parallel strategy: pass --src-strategy FILE (the strategy this job saved with)"
        )
    _check_world(storage, rank_dirs, strategy)
    tensors: dict[str, TensorInfo] = {}
    values: dict[str, Any] = {}
    chunks: dict[str, dict[tuple, Chunk]] = {}
    for r in range(strategy.world_size):
        fname = pick_rank_file(storage, rank_dirs[r])
        entries, meta = file_entries(storage, fname)
        if meta:  # strings distckpt keeps in a .safetensors __metadata__ (see distckpt.writers)
            from ..writers import decode_metadata_values

            for k, v in decode_metadata_values(meta, where=storage.child_url(fname)).items():
                values.setdefault(k, v)
        for e in entries:
            where = f"{storage.child_url(fname)}: tensor {e.name!r}"
            if e.dtype == "str":
                values.setdefault(e.name, entry_value(storage, fname, e))
                continue
            if e.name not in strategy:
                if e.name not in tensors:
                    tensors[e.name] = TensorInfo(e.name, e.dtype, tuple(e.shape), (full_chunk(fname, e),))
                continue
            if not strategy.holds(e.name, r):
                continue  # another stage's copy; MindSpore ignores it too
            try:
                shape = strategy.global_shape(e.name, e.shape)
                spec = strategy.params[e.name]
                if spec.shape is not None and tuple(spec.shape) != shape:
                    raise StrategyError(
                        f"strategy says global shape {list(spec.shape)} but rank {r} holds {list(e.shape)} "
                        f"(x splits {list(spec.layout.full_splits())} = {list(shape)})"
                    )
                spec.layout.validate(shape, e.name)
            except DistCkptError as exc:
                raise StrategyError(f"{where}: {exc}") from None
            prev = tensors.get(e.name)
            if prev is not None and (prev.shape != shape or prev.dtype != e.dtype):
                raise StrategyError(
                    f"{where}: rank {r} implies {e.dtype}{list(shape)}, other ranks {prev.dtype}{list(prev.shape)}"
                )
            tensors[e.name] = TensorInfo(e.name, e.dtype, shape)
            box = strategy.box(e.name, r, shape)
            assert box is not None
            if tuple(box.sizes) != tuple(e.shape):
                raise StrategyError(f"{where}: rank {r} holds shape {list(e.shape)}, the strategy gives it {list(box.sizes)}")
            chunks.setdefault(e.name, {}).setdefault(box.offsets, Chunk(box, fname, tuple(e.segments), rank=r))
    for name, info in list(tensors.items()):
        if name in chunks:
            got = chunks[name]
            _check_replicas_hold(storage, rank_dirs, strategy, name, info, got)
            cs = tuple(got.values())
            check_tiling(info.shape, [c.box for c in cs], name=name)
            tensors[name] = TensorInfo(name, info.dtype, info.shape, cs)
    missing = sorted(n for n in strategy.params if n not in tensors)
    return Index(tensors=tensors, values=values, world_size=strategy.world_size), {"missing": missing}


def _check_replicas_hold(
    storage: Store, rank_dirs: dict[int, str], strategy: Strategy, name: str, info: TensorInfo, got: dict
) -> None:
    """Every distinct slice must be held by at least one rank of its replica group."""
    for box, ranks in strategy.replica_groups(name, info.shape):
        if box.offsets not in got:
            rs = np.asarray(ranks).tolist()
            shown = ", ".join(f"rank_{r}" for r in rs[:8]) + ("..." if len(rs) > 8 else "")
            raise StrategyError(
                f"{storage.child_url(rank_dirs[rs[0]])}: parameter {name!r}: no rank of its replica group "
                f"({shown}) holds its slice at offsets {list(box.offsets)} sizes {list(box.sizes)}; with "
                "remove_redundancy one replica must keep it"
            )
