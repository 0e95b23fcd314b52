"""Write MindFormers 1.9's own distributed checkpoint (``mindformers.checkpoint``).

Two entry points, one on-disk result (``docs/mindformers_format.md`` has the format)::

    DST/latest_checkpointed_iteration.txt          N, written last and atomically: the commit
    DST/iteration_{N:08d}/model-{i:07d}-{n:07d}.safetensors
    DST/iteration_{N:08d}/opt-{i:07d}-{n:07d}.safetensors
    DST/iteration_{N:08d}/metadata.json            when the target has more than one rank
    DST/iteration_{N:08d}/common.json

* :func:`write` -- the ``--format mindformers`` output of ``merge`` (one rank: no
  ``metadata.json``, as MindFormers' own standalone save) and ``split``/``reshard`` (the target
  strategy's ranks).  Called by :mod:`distckpt.api` with an :class:`~distckpt.writers.OutputJob`
  whose store is a staging area.  Order: place every tensor (:func:`place`), pick the files
  (balanced by default: :func:`balanced_assignment`, MindFormers' own rule, files numbered over
  the ranks that write; ``plain``: one file per rank, replicas included, ``i`` = rank), describe
  the metadata (refusing what MindFormers cannot load before a byte is written), stream each file
  one tensor box at a time (``job.read``), then ``metadata.json``, ``common.json`` and the tracker.
* :func:`save_distributed` -- every rank of a job saves its part (``CheckpointManager(...,
  layout="mindformers")``).  The protocol is :func:`distckpt.api.save`'s: each rank prepares
  locally (:func:`distckpt.plan.plan_writes`: each distinct box once, by one of its holders, bytes
  balanced, closed form); the coordinator clears the iteration directory; every rank writes its
  ``model``/``opt`` files; the reports are gathered; the coordinator writes ``metadata.json``,
  ``common.json`` and last the tracker.  An error on any rank, at any step, becomes the same error
  on every rank, the files written are removed and no tracker is written.  Files are named
  ``{kind}-{rank:07d}-{world:07d}`` (MindFormers' plain numbering) whether balanced or not, so a
  rank needs no one else's plan to name its file; MindFormers' own balanced save numbers only the
  ranks that write, but its loader finds files through ``metadata.json``'s storage entries, so
  both load the same.

Which parameters go to ``opt`` files: MindFormers' rule is membership (a parameter of the
optimizer that is not a network parameter).  Without the network, :func:`distckpt.codecs.mindformers.is_optimizer_state`
decides by the names MindFormers' optimizers give their state (``adam_m.``, ``adam_v.``,
``exp_avg.``, ..., ``global_step``, ``learning_rate``); a MindFormers source keeps the split of its
own files.

Layouts in ``metadata.json``: a strategy parameter held by one pipeline stage is written with its
real layout (``rank_list`` = the stage's ranks); parameters the strategy does not name are
replicated over every rank; what a MindSpore ``Layout`` cannot say (a parameter held by several
stages, an optimizer shard over part of a device axis) is written as an even grid of virtual
ranks (one per slice), which MindFormers' loader reads the same way.  Plain values become 0-d
tensors (``int64``/``float64``/``bool``) in the ``model`` files; strings go into each data file's
``__metadata__`` (:data:`distckpt.writers.VALUES_KEY`), which MindSpore ignores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import dtypes
from ..codecs import mindformers as mf
from ..comm import Communicator, format_ranks, get_comm
from ..errors import ConfigError, DistCkptError, DistributedError, FormatError, LayoutError, UsageError
from ..layout import Box, Strategy, TensorLayout, box_of, full_box
from ..plan import WriteItem
from ..storage import Store, open_storage
from . import OutItem, OutputJob, constant, value_array, write_safetensors_file

__all__ = [
    "write",
    "save_distributed",
    "default_common",
    "balanced_assignment",
    "shard_bits",
    "Placement",
    "place",
    "describe_all",
    "remove_iteration",
]

# MindFormers' utils.MS_TYPE_TO_SIZE (bits per element; other dtypes count 16)
_MS_BITS = {"Int8": 8, "UInt8": 8, "Int16": 16, "UInt16": 16, "Int32": 32, "UInt32": 32, "Int64": 64, "UInt64": 64,
            "Float16": 16, "Float32": 32, "Float64": 64, "Bool": 1, "BFloat16": 16, "Int4": 4}


def default_common(iteration: int) -> mf.MFCommon:
    """``common.json`` of a checkpoint not made by MindFormers: ``step_num`` = ``global_step`` = N, the rest 0."""
    return mf.MFCommon(epoch_num=0, step_num=iteration, global_step=iteration, loss_scale=1.0, global_batch_size=0,
                       ckpt_status=0)


def shard_bits(dtype: str, numel: int) -> int:
    """A shard's size as MindFormers' balanced save counts it (``utils._get_shard_size``: bits)."""
    return numel * _MS_BITS.get(mf.ms_dtype_name(dtype), 16)


def balanced_assignment(shards: Mapping[str, tuple[int, Sequence[int]]], world: int) -> dict[str, int]:
    """Which rank writes each shard: MindFormers' ``fully_parallel.distribute_shards``.

    ``shards``: shard id (``str((name, (k,)))``) -> (size, holder ranks).  Shards with fewer
    holders first, then larger, then by id; each goes to its least-loaded holder (ties: the lowest
    rank), whose load grows by the shard's size.
    """
    loads = dict.fromkeys(range(world), 0)
    out: dict[str, int] = {}
    order = sorted(shards.items(), key=lambda kv: (len(kv[1][1]), -kv[1][0], kv[0]))
    for sid, (size, holders) in order:
        ranks = sorted(holders)
        pick = min(ranks, key=lambda r: loads.get(r, 0))
        out[sid] = pick
        loads[pick] = loads.get(pick, 0) + size
    return out


# --------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """One tensor of the target: its file kind, MindFormers layout, and each distinct slice with its holders.

    ``layout`` None: written as an even grid of virtual ranks (``storage_rank`` = slice index).
    ``slices``: ``(linear slice index, box, holder ranks)``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    layout: mf.MFLayout | None
    slices: tuple[tuple[int, Box, tuple[int, ...]], ...]


def _mf_layout(strategy: Strategy | None, name: str, ndim: int, world: int) -> mf.MFLayout | None:
    if strategy is None or name not in strategy:
        if world == 1:
            return None
        return mf.MFLayout.from_tensor_layout(TensorLayout((world,), ((-1,),) * ndim))
    spec = strategy.params[name]
    if len(spec.stages) != 1:
        return None  # one Layout covers one rank_list: several stages are written as a grid
    first = spec.stages[0] * strategy.stage_device_num
    try:
        return mf.MFLayout.from_tensor_layout(spec.layout, range(first, first + strategy.stage_device_num))
    except LayoutError:
        return None  # an optimizer shard over part of a device axis


def _slice_index(box: Box, shape: Sequence[int], splits: Sequence[int]) -> int:
    k = 0
    for o, n, f in zip(box.offsets, shape, splits):
        step = n // f if f else 0
        k = k * f + (o // step if step else 0)
    return k


def place(name: str, dtype: str, shape: Sequence[int], strategy: Strategy | None, world: int, kind: str) -> Placement:
    """Where tensor ``name`` goes under ``strategy`` (None: one rank holds it whole)."""
    shape = tuple(shape)
    if strategy is not None and name in strategy:
        splits = strategy.params[name].layout.full_splits()
        groups = [(box, tuple(int(r) for r in ranks)) for box, ranks in strategy.replica_groups(name, shape)]
    else:
        splits = (1,) * len(shape)
        groups = [(full_box(shape), tuple(range(world)))]
    slices = tuple((_slice_index(box, shape, splits), box, ranks) for box, ranks in groups)
    return Placement(name, dtype, shape, kind, _mf_layout(strategy, name, len(shape), world), slices)


def _files(placements: Sequence[Placement], world: int, plain: bool) -> dict[str, list[tuple[Placement, Box, int]]]:
    """file name -> [(tensor, box, writing rank)], in tensor order; which rank writes what, and the names."""
    writes: dict[tuple[str, int], list[tuple[Placement, Box, int]]] = {}
    if plain:
        for p in placements:
            for _, box, ranks in p.slices:
                for r in ranks:
                    writes.setdefault((p.kind, r), []).append((p, box, r))
        return {mf.file_name(kind, r, world): v for (kind, r), v in sorted(writes.items())}
    for kind in mf.KINDS:
        ours = [p for p in placements if p.kind == kind]
        shards = {mf.shard_id(p.name, k): (shard_bits(p.dtype, box.numel), ranks) for p in ours for k, box, ranks in p.slices}
        pick = balanced_assignment(shards, world)
        for p in ours:
            for k, box, _ in p.slices:
                r = pick[mf.shard_id(p.name, k)]
                writes.setdefault((kind, r), []).append((p, box, r))
    out = {}
    for kind in mf.KINDS:
        writers = sorted(r for k, r in writes if k == kind)
        out.update({mf.file_name(kind, i, len(writers)): writes[kind, r] for i, r in enumerate(writers)})
    return out


def describe_all(placements: Iterable[Placement], stored: Mapping[str, list[tuple[Box, str, int]]]) -> list[mf.MFTensor]:
    """The ``metadata.json`` entries: each tensor's layout and the files (and ranks) holding each slice."""
    out = []
    for p in placements:
        chunks = [mf.StoredChunk(box, fname, rank if p.layout is not None else None) for box, fname, rank in stored[p.name]]
        out.append(mf.describe_tensor(p.name, p.dtype, p.shape, chunks, layout=p.layout))
    return out


def _kind(name: str, kinds: Mapping[str, str]) -> str:
    got = kinds.get(name)
    if got in mf.KINDS:
        return got
    return "opt" if mf.is_optimizer_state(name) else "model"


def _split_values(values: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Plain values: numbers and bools as 0-d arrays, strings kept for the files' metadata."""
    arrays: dict[str, np.ndarray] = {}
    strings: dict[str, str] = {}
    for k, v in values.items():
        arr = value_array(k, v)
        if isinstance(arr, str):
            strings[k] = arr
        else:
            arrays[k] = arr
    return arrays, strings


# --------------------------------------------------------------------------- offline output
def _iteration(job: OutputJob) -> int:
    want = job.options.get("dst_iteration")
    if want is None:
        info = getattr(job.source, "info", {}) or {}
        want = (info.get("inspect") or {}).get("iteration")
    if want is None:
        return 0
    try:
        mf.iteration_dir(want)
    except FormatError as exc:
        raise UsageError(f"--dst-iteration: {exc}") from None
    return int(want)


def _source_common(job: OutputJob, n: int) -> mf.MFCommon:
    got = ((getattr(job.source, "info", {}) or {}).get("inspect") or {}).get("common")
    if isinstance(got, Mapping) and str(getattr(job.source, "kind", "")) == "mindformers":
        return mf.MFCommon(**got)
    return default_common(n)


def write(job: OutputJob) -> list[str]:
    """Write SRC as a MindFormers checkpoint into ``job.store``; return the names written (tracker last)."""
    from ..progress import progress

    src, strat = job.source, job.strategy
    world = strat.world_size if strat is not None else 1
    n = _iteration(job)
    common = _source_common(job, n)
    kinds = (src.info or {}).get("kinds", {})
    extra, strings = _split_values(src.values)
    sizes = {name: (t.dtype, t.shape) for name, t in src.tensors.items()}
    sizes.update({k: (dtypes.name_of(a.dtype), ()) for k, a in extra.items() if k not in sizes})
    placements = [place(name, dt, shape, strat, world, _kind(name, kinds)) for name, (dt, shape) in sizes.items()]
    files = _files(placements, world, bool(job.options.get("plain")))
    stored: dict[str, list[tuple[Box, str, int]]] = {p.name: [] for p in placements}
    for fname, rows in files.items():
        for p, box, r in rows:
            stored[p.name].append((box, fname, r))
    described = describe_all(placements, stored)  # refuses what MindFormers cannot load, before any write
    d = mf.iteration_dir(n)

    def fetch(name: str, box: Box):
        if name in extra:
            return constant(extra[name])
        return lambda: job.read(name, box)

    written = []
    for fname, rows in progress(list(files.items()), desc="mindformers", quiet=bool(job.options.get("quiet", True)),
                                unit="file"):
        items = [OutItem(p.name, p.dtype, box.sizes, fetch(p.name, box)) for p, box, _ in rows]
        write_safetensors_file(job.store, f"{d}/{fname}", items, strings)
        written.append(f"{d}/{fname}")
    return written + _commit(job.store, n, described if world > 1 else None, common)


def _commit(store: Store, n: int, described: list[mf.MFTensor] | None, common: mf.MFCommon) -> list[str]:
    """``metadata.json`` (multi-rank only, as MindFormers), ``common.json``, then the tracker: the commit."""
    d = mf.iteration_dir(n)
    out = []
    if described is not None:
        store.put_atomic(f"{d}/{mf.METADATA}", mf.dump_metadata(described))
        out.append(f"{d}/{mf.METADATA}")
    store.put_atomic(f"{d}/{mf.COMMON}", mf.dump_common(common))
    store.put_atomic(mf.TRACKER, mf.dump_tracker(n))
    return out + [f"{d}/{mf.COMMON}", mf.TRACKER]


def remove_iteration(store: Store, n: int) -> None:
    """Delete ``iteration_N/`` of a root: ``common.json`` first, so a half-deleted one reads as uncommitted."""
    d = mf.iteration_dir(n)
    store.remove([f"{d}/{mf.COMMON}"])
    store.remove([d])


# --------------------------------------------------------------------------- distributed save
def _prepare(state: Any, strategy, storage_options, c: Communicator, plain: bool) -> dict:
    """Step 1, local: this rank's arrays, strings, strategy, and the boxes it writes."""
    from ..saving import SaveJob
    from ..state import split_state

    arrays, values = split_state(state)
    extra, strings = _split_values(values)
    clash = sorted(set(extra) & set(arrays))
    if clash:
        raise FormatError(f"state entry {clash[0]!r} is both an array and a value")
    job = SaveJob({**arrays, **extra}, "memory://distckpt-unused", strategy=strategy, comm=c,
                  storage_options=storage_options)  # step 1 of the save protocol: local preparation only
    if job.error is not None:
        raise job.error
    prep: dict[str, Any] = {"strategy": job.strategy, "world": job.world, "arrays": job.arrays, "values": job.values,
            "tensors": job.tensors, "items": job.items, "strings": strings}
    if plain:
        strat = prep["strategy"]
        prep["items"] = [
            WriteItem(name, dt, shape, box, c.rank)
            for name, (dt, shape) in sorted(prep["tensors"].items())
            if (box := box_of(strat, name, shape, c.rank)) is not None
        ]
    return prep


def _write_rank(store: Store, d: str, prep: dict, rank: int, world: int) -> dict:
    """Step 3: this rank's model and opt files; its report (files, chunks, tensors held)."""
    strat, arrays = prep["strategy"], prep["arrays"]
    by_kind: dict[str, list[OutItem]] = {k: [] for k in mf.KINDS}
    boxes: dict[str, list[WriteItem]] = {k: [] for k in mf.KINDS}
    for it in prep["items"]:
        arr = arrays[it.name]
        mine = box_of(strat, it.name, it.shape, rank)
        assert mine is not None
        piece = arr[it.box.relative_to(mine)] if it.box.ndim else arr
        kind = _kind(it.name, {})
        by_kind[kind].append(OutItem(it.name, it.dtype, it.box.sizes, constant(piece)))
        boxes[kind].append(it)
    files: dict[str, int] = {}
    chunks = []
    for kind in mf.KINDS:
        if not by_kind[kind]:
            continue
        fname = mf.file_name(kind, rank, world)
        write_safetensors_file(store, f"{d}/{fname}", by_kind[kind], prep["strings"])
        files[fname] = store.size(f"{d}/{fname}")
        chunks += [[it.name, list(it.box.offsets), list(it.box.sizes), fname] for it in boxes[kind]]
    return {"files": files, "chunks": chunks, "tensors": {n: [dt, list(s)] for n, (dt, s) in prep["tensors"].items()}}


def _describe_reports(reports: Sequence[dict], strategy: Strategy | None, world: int) -> list[mf.MFTensor]:
    """The coordinator's metadata from every rank's report (dtypes and shapes must agree)."""
    seen: dict[str, tuple[str, tuple[int, ...], int]] = {}
    stored: dict[str, list[tuple[Box, str, int]]] = {}
    for r, rep in enumerate(reports):
        for name, (dt, shape) in rep["r"]["tensors"].items():
            prev = seen.setdefault(name, (dt, tuple(shape), r))
            if prev[:2] != (dt, tuple(shape)):
                raise FormatError(
                    f"tensor {name!r}: rank {prev[2]} holds it as {prev[0]}{list(prev[1])}, rank {r} as {dt}{list(shape)}"
                )
        for name, offsets, sizes, fname in rep["r"]["chunks"]:
            stored.setdefault(name, []).append((Box(tuple(offsets), tuple(sizes)), fname, r))
    placements = [place(name, dt, shape, strategy, world, _kind(name, {})) for name, (dt, shape, _) in seen.items()]
    missing = [p.name for p in placements if p.name not in stored]
    if missing:
        raise FormatError(f"tensor {missing[0]!r}: no rank wrote it")
    return describe_all(placements, stored)


def _begin(store: Store, n: int) -> None:
    """Coordinator, before any write: clear ``iteration_N/``, unless it is the committed one."""
    from ..sources.mindformers import read_tracker

    d = mf.iteration_dir(n)
    names = store.listdir()
    if d in names:
        if mf.TRACKER in names and read_tracker(store) == n:
            raise ConfigError(
                f"{store.child_url(d)} is the committed iteration ({mf.TRACKER} names it); saving iteration {n} again "
                "would overwrite it while the save runs: save under another iteration"
            )
        remove_iteration(store, n)
    store.makedirs(d)


def _describe_error(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return str(exc) if isinstance(exc, DistCkptError) else f"{type(exc).__name__}: {exc}"


def save_distributed(
    state: Any,
    root,
    *,
    iteration: int,
    strategy=None,
    comm=None,
    common: mf.MFCommon | Mapping[str, Any] | None = None,
    plain: bool = False,
    storage_options: dict | None = None,
) -> int:
    """Every rank saves its part of ``state`` as iteration ``iteration`` of the MindFormers root ``root``.

    ``state``: this rank's arrays (and plain values), as for :func:`distckpt.save`; ``strategy``
    says what every rank holds (None: full tensors).  ``common``: ``common.json`` (default
    :func:`default_common`).  ``plain``: every rank writes every box it holds (MindFormers' plain
    save); default: each distinct box once.  Returns N once the tracker names it; any failure
    raises the same error on every rank and leaves the tracker as it was.
    """
    c = get_comm(comm)
    store = open_storage(root, storage_options)
    try:
        d = mf.iteration_dir(iteration)
    except FormatError as exc:
        raise UsageError(f"iteration: {exc}") from None
    n = int(iteration)
    info = mf.MFCommon(**common) if isinstance(common, Mapping) else common or default_common(n)
    if not isinstance(info, mf.MFCommon):
        raise UsageError(f"common must be an MFCommon or a mapping of its fields, got {type(common).__name__}")
    prep: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        prep = _prepare(state, strategy, storage_options, c, plain)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
        error = exc

    def begin() -> None:
        if error is not None:
            raise error
        _begin(store, n)

    begin() if c.size == 1 else c.run_on_root("mfsave.begin", begin)
    rep: dict[str, Any] = {}
    if error is None:
        try:
            rep = _write_rank(store, d, prep, c.rank, c.size)
        except Exception as exc:  # noqa: BLE001
            error = exc
    reports = c.gather({"ok": error is None, "e": _describe_error(error), "r": rep}, "mfsave.report")

    def decide() -> dict:
        assert reports is not None
        failures = {r: x["e"] for r, x in enumerate(reports) if not x["ok"]}
        if failures:
            return {"failures": failures}
        described = _describe_reports(reports, prep["strategy"], c.size)
        _commit(store, n, described if c.size > 1 else None, info)
        return {"failures": {}}

    try:
        verdict = decide() if c.size == 1 and error is None else c.run_on_root("mfsave.commit", decide)
    except BaseException:
        _discard(c, store, n, rep)
        raise
    failures = {int(k): v for k, v in verdict["failures"].items()}
    if failures:
        _discard(c, store, n, rep)
        if c.size == 1 and error is not None:
            raise error
        raise DistributedError(
            f"MindFormers save of iteration {n} to {store.url} failed on rank(s) {format_ranks(failures)}: "
            + "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items())),
            failures,
        ) from error
    return n


def _discard(c: Communicator, store: Store, n: int, rep: Mapping[str, Any]) -> None:
    """A failed save: every rank removes its files, then the coordinator the iteration directory it made."""
    d = mf.iteration_dir(n)
    store.remove([f"{d}/{f}" for f in rep.get("files", {})])
    try:
        if c.size > 1:
            c.barrier("mfsave.discard")
        if c.rank == 0:
            remove_iteration(store, n)
    except DistCkptError:
        pass

