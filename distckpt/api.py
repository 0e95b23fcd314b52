"""The verbs: save, load, finalize, merge, split, reshard, verify, inspect, gc.

Who does what during a save (every phase runs inside ``comm.run`` so an
exception on one rank becomes the same error on every rank, never a hang):

1. (all ranks)   describe what they hold (names, dtypes, local shapes); allgather;
2. (all ranks)   compute the same write plan from the layout (``plan_save``);
3. (all ranks)   write their assigned chunks to ``data-{save_id}-{rank}.safetensors``;
4. (coordinator) gather the chunk records, check they tile every tensor, and
   commit the index (``Storage.put_atomic``); then drop files of older saves.
"""

from __future__ import annotations

import math
import os
import posixpath
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import dtypes
from .errors import (
    ConfigError,
    DestinationExistsError,
    DistCkptError,
    FormatError,
    LayoutError,
    NotCommittedError,
    StrategyError,
)
from .index import INDEX_NAME, MAX_INDEX_BYTES, Chunk, Index, TensorInfo
from .io import DEFAULT_BLOCK_SIZE, PendingChunk, ReadStats, read_box, write_chunk_file
from .layout import Box, Strategy, check_tiling, full_box
from .plan import plan_save
from .sources import Source, box_of, open_source
from .storage import Storage, is_url, open_storage, split_url
from .strategy import dump_merged_strategy_proto, dump_strategy_proto, load_strategy, strategy_to_json

__all__ = ["save", "load", "finalize", "merge", "split", "reshard", "verify", "inspect", "gc"]

_MANIFEST = ".manifest-{rank:05d}.json"


# --------------------------------------------------------------------- helpers
def _progress(iterable, *, total=None, desc="", quiet=False, unit="tensor"):
    """A tqdm bar on a terminal; the iterable itself otherwise (or with ``quiet``)."""
    if quiet or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)


def _counted(items: list, *, desc: str, quiet: bool) -> list:
    """Writer items whose reads advance a progress bar (writers need the list up front)."""
    if quiet or not sys.stderr.isatty() or not items:
        return items
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(math.prod(it[2]) * dtypes.itemsize(it[1]) for it in items), desc=desc,
               unit="B", unit_scale=True, leave=False)

    def wrap(it):
        name, dt, shape, produce = it

        def run():
            arr = produce()
            bar.update(arr.nbytes)
            if bar.n >= bar.total:
                bar.close()
            return arr

        return (name, dt, shape, run)

    return [wrap(it) for it in items]


def _as_numpy(name: str, v: Any) -> np.ndarray | None:
    """numpy view of an array-like state value; None for plain values."""
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, np.generic):
        return np.asarray(v)
    # a mindspore Parameter's class lives in module "abc"; look along the MRO
    if any((c.__module__ or "").startswith("mindspore") for c in type(v).__mro__):
        from .mindspore import to_numpy

        return to_numpy(v, name=name)
    if isinstance(v, (bool, int, float, str)):
        return None
    raise FormatError(f"state entry {name!r} has unsupported type {type(v).__name__}; use arrays or int/float/bool/str")


def _split_state(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, values = {}, {}
    for name, v in state.items():
        if not isinstance(name, str) or not name:
            raise FormatError(f"state key {name!r} must be a non-empty string")
        arr = _as_numpy(name, v)
        if arr is None:
            values[name] = v
        else:
            dtypes.name_of(arr.dtype)  # fails clearly on object / unsupported dtypes
            arrays[name] = arr
    return arrays, values


def _resolve_strategy(strategy, storage_options) -> Strategy | None:
    if strategy is None:
        return None
    return load_strategy(strategy, storage_options=storage_options)


def _new_save_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _data_name(save_id: str, rank: int) -> str:
    return f"data-{save_id}-{rank:05d}.safetensors"


def _global_tensors(
    summaries: Mapping[int, dict[str, list]], strategy: Strategy | None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Global (dtype, shape) per tensor from the known ranks' (dtype, local shape); check they agree."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    owner: dict[str, int] = {}
    for r, summ in sorted(summaries.items()):
        for name, (dt, local) in summ.items():
            local = tuple(local)
            if strategy is not None and name in strategy:
                if not strategy.holds(name, r):
                    continue
                shape = strategy.global_shape(name, local)
                strategy.params[name].layout.validate(shape, name)
            else:
                shape = local
            if name in out and out[name] != (dt, shape):
                raise LayoutError(
                    f"tensor {name!r}: rank {r} implies {dt}{list(shape)} but rank {owner[name]} "
                    f"implies {out[name][0]}{list(out[name][1])}"
                )
            out.setdefault(name, (dt, shape))
            owner.setdefault(name, r)
    if strategy is not None:
        for name in out:
            if name in strategy:
                holders = strategy.ranks_holding(name)
                for r in holders:
                    if int(r) in summaries and name not in summaries[int(r)]:
                        raise StrategyError(f"rank {int(r)} has no tensor {name!r}, which the strategy places on it")
    return out


def _local_piece(arr: np.ndarray, box: Box, my_box: Box) -> np.ndarray:
    return arr[box.relative_to(my_box)] if box.ndim else arr


# ------------------------------------------------------------------------ save
def save(
    state: Mapping[str, Any],
    path,
    *,
    strategy=None,
    rank: int | None = None,
    comm=None,
    storage_options: dict | None = None,
    metadata: dict | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    checksums: bool = True,
) -> str:
    """Save this rank's ``state`` into a distckpt checkpoint at ``path``.

    ``state`` maps names to this rank's local arrays and to plain values.
    ``strategy`` (path, URL or parsed) says what every rank holds; without it
    arrays are full tensors.  Under mpirun every rank calls ``save`` and the
    ranks write together.  With ``rank=r`` and no communicator only rank r's
    pieces and a manifest are written; :func:`finalize` commits.
    Returns the save id.
    """
    from .comm import SingleComm, get_comm

    strat = _resolve_strategy(strategy, storage_options)
    rank_mode = rank is not None and comm is None
    c = SingleComm() if rank_mode else get_comm(comm)
    my_rank = rank if rank_mode else c.rank
    if rank_mode:
        world = strat.world_size if strat is not None else int(os.environ.get("RANK_SIZE", "1"))
    else:
        world = c.size
    storage = open_storage(path, storage_options)
    arrays, values = _split_state(state)

    def describe():
        if strat is not None and strat.world_size != world:
            raise StrategyError(
                f"strategy describes {strat.world_size} ranks but this job has {world}: pass the strategy of this job"
            )
        if not 0 <= my_rank < world:
            raise StrategyError(f"rank {my_rank} is outside the world of {world} ranks")
        return {n: [dtypes.name_of(a.dtype), list(a.shape)] for n, a in arrays.items()}

    summary = c.run("save.describe", describe)
    save_id = c.broadcast(_new_save_id(), 0, "save.id")
    if rank_mode:
        summaries = {my_rank: summary}
    else:
        summaries = dict(enumerate(c.allgather(summary, "save.summaries")))

    def write():
        tensors = _global_tensors(summaries, strat)
        items = plan_save(tensors, strat, world)
        mine = []
        for it in items:
            if it.writer != my_rank or it.name not in arrays:
                continue
            my_box = box_of(TensorInfo(it.name, it.dtype, it.shape), strat, my_rank)
            if my_box is None:
                continue
            mine.append(PendingChunk.of(it.name, it.box, _local_piece(arrays[it.name], it.box, my_box)))
        fname = _data_name(save_id, my_rank)
        storage.makedirs()
        records: dict[str, list[Chunk]] = {}
        size = 0
        if mine:
            records, size = write_chunk_file(
                storage, fname, mine, block_size=block_size, rank=my_rank, checksums=checksums
            )
        return {
            "tensors": {n: [dt, list(s)] for n, (dt, s) in tensors.items()},
            "files": {fname: size} if mine else {},
            "chunks": {n: [ch.to_json() for ch in cs] for n, cs in records.items()},
        }

    report = c.run("save.write", write)
    common = {
        "save_id": save_id,
        "world_size": world,
        "block_size": block_size,
        "checksum": "crc32c" if checksums else "none",
        "strategy": strategy_to_json(strat) if strat is not None else None,
        "metadata": dict(metadata or {}),
    }
    if rank_mode:
        import json

        manifest = {**report, "rank": my_rank, **common, "values": _values_json(values) if my_rank == 0 else {}}
        storage.put_atomic(_MANIFEST.format(rank=my_rank), json.dumps(manifest).encode())
        return save_id
    reports = c.allgather(report, "save.gather")

    def commit():
        if c.rank != 0:
            return None
        index = _build_index(reports, common, _values_json(values), where=storage.url)
        _commit(storage, index)
        return None

    c.run("save.commit", commit)
    c.barrier("save.done")
    return save_id


def _values_json(values: Mapping[str, Any]) -> dict:
    from .index import encode_value

    return {k: encode_value(k, v) for k, v in values.items()}


def _build_index(reports: list[dict], common: dict, values_json: dict, *, where: str) -> Index:
    doc_tensors: dict[str, dict] = {}
    files: dict[str, int] = {}
    shapes: dict[str, list] = {}
    for rep in reports:
        shapes.update(rep["tensors"])
        files.update(rep["files"])
        for name, cs in rep["chunks"].items():
            doc_tensors.setdefault(name, {"chunks": []})["chunks"].extend(cs)
    for name, (dt, shape) in shapes.items():
        doc_tensors.setdefault(name, {"chunks": []}).update({"dtype": dt, "shape": shape})
    doc = {
        "format": "distckpt",
        "version": 1,
        "save_id": common["save_id"],
        "world_size": common["world_size"],
        "checksum": {"algorithm": common["checksum"], "block_size": common["block_size"]},
        "files": {k: {"size": v} for k, v in files.items()},
        "tensors": doc_tensors,
        "values": values_json,
        "strategy": common["strategy"],
        "metadata": common["metadata"],
    }
    index = Index.from_json(doc, where=where)
    for name, t in index.tensors.items():
        check_tiling(t.shape, [c.box for c in t.chunks], name=name)
    return index


def _commit(storage: Storage, index: Index) -> None:
    """Write the index last (atomic), then drop data files no committed index names."""
    old: set[str] = set()
    if storage.exists(INDEX_NAME):
        try:
            old = set(Index.loads(storage.read_bytes(INDEX_NAME, limit=MAX_INDEX_BYTES)).files)
        except DistCkptError:
            old = set()
    storage.put_atomic(INDEX_NAME, index.dumps())
    stale = old - set(index.files)
    storage.remove(sorted(stale))


def finalize(path, *, storage_options: dict | None = None, **_ignored) -> dict:
    """Commit a rank-mode save once every rank's manifest is present."""
    import json

    storage = open_storage(path, storage_options)
    names = [n for n in storage.listdir() if n.startswith(".manifest-") and n.endswith(".json")]
    if not names:
        raise NotCommittedError(f"{storage.url}: no rank manifests to finalize (did every rank call save(rank=...)?)")
    reports = []
    for n in sorted(names):
        try:
            reports.append(json.loads(storage.read_bytes(n, limit=MAX_INDEX_BYTES)))
        except ValueError as exc:
            raise FormatError(f"{storage.child_url(n)}: manifest is not valid JSON ({exc})") from None
    world = reports[0].get("world_size")
    ranks = sorted(int(r.get("rank", -1)) for r in reports)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise NotCommittedError(
            f"{storage.url}: manifests of rank(s) {missing} are missing; every one of the {world} ranks must save before finalize"
        )
    base = next(r for r in reports if r["rank"] == 0)
    for r in reports:
        if r.get("strategy") != base.get("strategy") or r.get("world_size") != world:
            raise StrategyError(f"{storage.url}: rank {r['rank']} saved with a different strategy or world size than rank 0")
    common = {k: base[k] for k in ("world_size", "block_size", "checksum", "strategy", "metadata")}
    common["save_id"] = base["save_id"]
    index = _build_index(reports, common, base.get("values", {}), where=storage.url)
    for fname, size in index.files.items():
        if not storage.exists(fname) or storage.size(fname) != size:
            raise NotCommittedError(f"{storage.child_url(fname)}: data file missing or of the wrong size; re-run the save")
    _commit(storage, index)
    storage.remove(names)
    return {"path": storage.url, "tensors": len(index.tensors), "files": len(index.files)}


# ------------------------------------------------------------------------ load
def _targets(src: Source, strategy: Strategy | None, rank: int, names: Iterable[str] | None):
    want = set(names) if names is not None else None
    if want is not None:
        unknown = want - set(src.tensors) - set(src.values)
        if unknown:
            raise NotCommittedError(f"{src.storage.url}: no tensor(s) {sorted(unknown)[:5]} in this checkpoint")
    if strategy is not None:
        missing = [n for n in strategy.params if n not in src.tensors]
        if missing and want is None:
            raise StrategyError(
                f"destination strategy names {len(missing)} tensor(s) the checkpoint lacks, e.g. {missing[0]!r}"
            )
    for name, t in src.tensors.items():
        if want is not None and name not in want:
            continue
        box = box_of(t, strategy, rank)
        if box is not None:
            yield t, box


def load(
    path,
    *,
    strategy=None,
    rank: int | None = None,
    src_strategy=None,
    names: Iterable[str] | None = None,
    storage_options: dict | None = None,
    verify: bool = True,
    comm=None,
    stats: ReadStats | None = None,
) -> dict:
    """Read a checkpoint; with ``strategy`` return exactly this rank's slices.

    Without a strategy, full tensors.  With one, what ``transform_checkpoints``
    writes to ``rank_{rank}`` (optimizer shard and pipeline stage included),
    plus the tensors the strategy does not name.  Only overlapping chunks are
    read.  Arrays are numpy (bf16 as ``ml_dtypes.bfloat16``).
    """
    src = open_source(path, src_strategy=src_strategy, storage_options=storage_options)
    strat = _resolve_strategy(strategy, storage_options)
    if strat is not None and rank is None:
        from .comm import get_comm

        rank = get_comm(comm).rank
    rank = rank or 0
    if strat is not None and not 0 <= rank < strat.world_size:
        raise StrategyError(f"rank {rank} is outside the strategy's {strat.world_size} ranks")
    out: dict[str, Any] = {}
    st = stats if stats is not None else ReadStats()
    for t, box in _targets(src, strat, rank, names):
        out[t.name] = read_box(src.storage, t, box, verify=verify, stats=st)
    want = set(names) if names is not None else None
    for k, v in src.values.items():
        if want is None or k in want:
            out[k] = v
    return out


# ------------------------------------------------------------- output helpers
def _check_dst_vs_src(src, dst: str) -> None:
    """Refuse a DST that is SRC, lies inside SRC, or contains SRC (--overwrite would delete it)."""
    if isinstance(src, Source):
        return
    s, d = os.fspath(src), os.fspath(dst)

    def norm(x: str) -> str:
        if is_url(x):
            proto, _, rest = x.partition("://")
            return proto.lower() + "://" + posixpath.normpath("/" + rest).lstrip("/")
        return os.path.realpath(x)

    sn, dn = norm(s), norm(d)
    sep = "/" if is_url(sn) else os.sep
    if sn == dn:
        raise ConfigError(f"DST {d} is SRC {s}: write the output somewhere else")
    if dn.startswith(sn.rstrip(sep) + sep):
        raise ConfigError(f"DST {d} lies inside SRC {s}: write the output outside the checkpoint")
    if sn.startswith(dn.rstrip(sep) + sep):
        raise ConfigError(f"SRC {s} lies inside DST {d}: replacing DST would delete SRC; pick another DST")


class _Output:
    """A destination built in a temporary place beside DST, moved in on success."""

    def __init__(self, dst, *, overwrite: bool, storage_options: dict | None, is_file: bool):
        self.dst = os.fspath(dst)
        self.opts = storage_options
        self.is_file = is_file
        parent, base = split_url(self.dst)
        self.parent = open_storage(parent, storage_options)
        self.base = base
        if self.parent.exists(base) and not overwrite:
            raise DestinationExistsError(f"{self.dst} already exists; pass --overwrite to replace it")
        self.tmp_name = f".{base}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self):
        if self.is_file:
            self.storage = self.parent
        else:
            self.storage = self.parent.sub(self.tmp_name)
            self.storage.makedirs()
        return self

    def __exit__(self, et, ev, tb):
        if et is not None:
            self.parent.remove([self.tmp_name])
            return False
        self._move_into_place()
        return False

    def _move_into_place(self):
        p = self.parent
        old = f".{self.base}.old-{uuid.uuid4().hex[:8]}"
        if p.is_local:
            src, dst = p.path(self.tmp_name), p.path(self.base)
            had = os.path.lexists(dst)
            if had:
                os.replace(dst, p.path(old))
            os.replace(src, dst)
            if had:
                p.remove([old])
            return
        # object stores: server-side copies, the index last, stale objects dropped after
        p.replace(self.tmp_name, self.base, commit_last=INDEX_NAME)


def _py_value_entry(name: str, v: Any) -> tuple[str, np.ndarray | str]:
    if isinstance(v, str):
        return "str", v
    if isinstance(v, bool):
        return "bool", np.asarray(v, dtype=np.bool_)
    if isinstance(v, int):
        if not -(1 << 63) <= v < 1 << 63:
            raise FormatError(f"value {name!r} = {v} does not fit in int64, the only integer a .ckpt/.safetensors value can hold")
        return "int64", np.asarray(v, dtype=np.int64)
    return "float32", np.asarray(v, dtype=np.float32)


def _write_ckpt_file(storage: Storage, fname: str, items, values: Mapping[str, Any]) -> None:
    """items: iterable of (name, dtype, shape, array-producing callable)."""
    from .formats.ckpt import CkptWriter

    f = storage.open_write(fname)
    try:
        w = CkptWriter(f)
        for name, dt, shape, produce in items:
            w.add_tensor(name, dt, shape, produce())
        for name, v in values.items():
            kind, arr = _py_value_entry(name, v)
            if kind == "str":
                w.add_str(name, arr)  # type: ignore[arg-type]
            else:
                w.add_tensor(name, kind, (), arr)
        w.close()
        storage.close_durable(f)
    except BaseException:
        f.close()
        raise


def _write_safetensors_file(storage: Storage, fname: str, items, values: Mapping[str, Any], metadata=None) -> None:
    from .formats.safetensors import SafetensorsWriter

    items = list(items)
    extra = []
    for name, v in values.items():
        kind, arr = _py_value_entry(name, v)
        if kind == "str":
            continue  # safetensors cannot hold strings; kept in the metadata below
        extra.append((name, kind, (), (lambda a=arr: a)))
    allitems = items + extra
    meta = {"format": "ms"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    for name, v in values.items():
        if isinstance(v, str):
            meta[name] = v
    f = storage.open_write(fname)
    try:
        w = SafetensorsWriter(f, [(n, dt, tuple(s)) for n, dt, s, _ in allitems], metadata=meta)
        for name, _dt, _s, produce in allitems:
            arr = np.ascontiguousarray(produce())
            w.write(name, memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b""))
        storage.close_durable(f)
    except BaseException:
        f.close()
        raise


def _copy_configs(src: Source, out: Storage, *, json_only: bool = False) -> None:
    """Copy SRC's config files.  ``json_only``: no YAML (MindFormers' from_pretrained takes a
    directory with a YAML for a one-file ``.ckpt`` directory and would load only the first shard),
    and a ``config.json`` derived from the YAML when SRC has none."""
    import json

    yamls = [n for n in src.config_files if n.endswith((".yaml", ".yml"))]
    for n in src.config_files:
        if not (json_only and n in yamls):
            out.put(n, src.storage.read_bytes(n, limit=64 << 20))
    if json_only and yamls and "config.json" not in src.config_files:
        from .mindspore.config import read_config

        pick = f"{src.name}.yaml" if f"{src.name}.yaml" in yamls else sorted(yamls)[0]
        found = read_config(src.storage.child_url(pick), storage_options=src.storage.storage_options)
        doc = dict(found.config)
        if found.arch:
            doc["architectures"] = [found.arch]
        out.put("config.json", (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def _reader(src: Source, t: TensorInfo, box: Box, verify: bool, stats: ReadStats):
    return lambda: read_box(src.storage, t, box, verify=verify, stats=stats)


def _parse_size(v) -> int | None:
    from .config import parse_size

    if v is None:
        return None
    try:
        return parse_size(v)
    except ValueError as exc:
        raise ConfigError(f"--max-shard-size: {exc}") from None


# ----------------------------------------------------------------------- merge
def merge(
    src,
    dst,
    *,
    format: str | None = None,
    max_shard_size=None,
    src_strategy=None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    verify: bool = True,
    quiet: bool = True,
) -> dict:
    """Merge SRC into one checkpoint: a ``.ckpt``/``.safetensors`` file, or a MindFormers-ready directory."""
    t0 = time.perf_counter()
    dst = os.fspath(dst)
    _check_dst_vs_src(src, dst)
    source = open_source(src, src_strategy=src_strategy, storage_options=storage_options)
    if format is None:
        format = "safetensors" if dst.endswith(".safetensors") else "ckpt"
    if format not in ("ckpt", "safetensors", "distckpt"):
        raise FormatError(f"unknown --format {format!r}; use ckpt, safetensors or distckpt")
    stats = ReadStats()
    tensors = list(source.tensors.values())
    if format == "ckpt":
        for t in tensors:
            dtypes.ckpt_name(t.dtype, tensor=t.name)
    items = [(t.name, t.dtype, t.shape, _reader(source, t, full_box(t.shape), verify, stats)) for t in tensors]
    items = _counted(items, desc="merge", quiet=quiet)
    single = dst.endswith((".ckpt", ".safetensors")) and format != "distckpt"
    shard = _parse_size(max_shard_size)
    with _Output(dst, overwrite=overwrite, storage_options=storage_options, is_file=single) as out:
        if single:
            tmp = out.tmp_name
            if format == "ckpt":
                _write_ckpt_file(out.storage, tmp, items, source.values)
            else:
                _write_safetensors_file(out.storage, tmp, items, source.values)
            files = [out.base]
        elif format == "distckpt":
            files = _write_distckpt(out.storage, source, None, 1, verify, stats)
            _copy_configs(source, out.storage)
        else:
            files = _write_pretrained_dir(out.storage, source, items, format, shard)
            _copy_configs(source, out.storage, json_only=bool(shard) and format == "ckpt")
    return {
        "dst": dst,
        "format": format,
        "files": files,
        "tensors": len(tensors),
        "bytes": sum(t.nbytes for t in tensors),
        "read": stats.to_json(),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _write_pretrained_dir(storage: Storage, source: Source, items, format: str, shard: int | None) -> list[str]:
    import json

    ext = "ckpt" if format == "ckpt" else "safetensors"
    name = source.name if format == "ckpt" else "model"
    write = _write_ckpt_file if format == "ckpt" else _write_safetensors_file
    if not shard:
        fname = f"{name}.{ext}"
        write(storage, fname, items, source.values)
        return [fname]
    groups: list[list] = [[]]
    size = 0
    for it in items:
        n = math.prod(it[2]) * dtypes.itemsize(it[1])
        if groups[-1] and size + n > shard:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += n
    total = len(groups)
    weight_map, files = {}, []
    for k, group in enumerate(groups, 1):
        fname = f"{name}-{k:05d}-of-{total:05d}.{ext}"
        write(storage, fname, group, source.values if k == total else {})
        files.append(fname)
        for it in group:
            weight_map[it[0]] = fname
    for v in source.values:
        weight_map[v] = files[-1]
    idx = {"metadata": {"total_size": sum(t.nbytes for t in source.tensors.values())}, "weight_map": weight_map}
    idx_name = f"{name}.{ext}.index.json"
    storage.put(idx_name, json.dumps(idx, indent=2).encode())
    return files + [idx_name]


def _write_distckpt(
    storage: Storage, source: Source, strategy: Strategy | None, world: int, verify: bool, stats: ReadStats
) -> list[str]:
    """Write SRC as a distckpt checkpoint laid out for ``strategy``: one file per writer rank."""
    save_id = _new_save_id()
    tensors = {n: (t.dtype, t.shape) for n, t in source.tensors.items()}
    items = plan_save(tensors, strategy, world)
    by_writer: dict[int, list] = {}
    for it in items:
        by_writer.setdefault(it.writer, []).append(it)
    reports = []
    for r in sorted(by_writer):
        fname = _data_name(save_id, r)
        pending = [
            PendingChunk(it.name, it.box, it.dtype, _reader(source, source.tensors[it.name], it.box, verify, stats))
            for it in by_writer[r]
        ]
        recs, size = write_chunk_file(storage, fname, pending, rank=r)
        reports.append(
            {
                "tensors": {n: [dt, list(s)] for n, (dt, s) in tensors.items()},
                "files": {fname: size},
                "chunks": {n: [c.to_json() for c in cs] for n, cs in recs.items()},
            }
        )
    if not reports:
        reports.append({"tensors": {}, "files": {}, "chunks": {}})
    common = {
        "save_id": save_id,
        "world_size": world,
        "block_size": DEFAULT_BLOCK_SIZE,
        "checksum": "crc32c",
        "strategy": strategy_to_json(strategy) if strategy is not None else None,
        "metadata": {"name": source.name},
    }
    index = _build_index(reports, common, _values_json(source.values), where=storage.url)
    storage.put_atomic(INDEX_NAME, index.dumps())
    return sorted(index.files) + [INDEX_NAME]


# ------------------------------------------------------------- split / reshard
def split(
    src,
    dst,
    *,
    dst_strategy,
    format: str = "distckpt",
    prefix: str = "checkpoint_",
    src_strategy=None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    verify: bool = True,
    quiet: bool = True,
) -> dict:
    """Cut SRC into the shards of ``dst_strategy``."""
    return _relayout(src, dst, dst_strategy, format, prefix, src_strategy, overwrite, storage_options, verify, quiet, "split")


def reshard(
    src,
    dst,
    *,
    dst_strategy,
    format: str = "distckpt",
    prefix: str = "checkpoint_",
    src_strategy=None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    verify: bool = True,
    quiet: bool = True,
) -> dict:
    """Move SRC into another parallel layout (any world size)."""
    return _relayout(src, dst, dst_strategy, format, prefix, src_strategy, overwrite, storage_options, verify, quiet, "reshard")


def _relayout(src, dst, dst_strategy, format, prefix, src_strategy, overwrite, storage_options, verify, quiet, verb) -> dict:
    t0 = time.perf_counter()
    if format not in ("distckpt", "ckpt", "safetensors"):
        raise FormatError(f"unknown --format {format!r}; use distckpt, ckpt or safetensors")
    if dst_strategy is None:
        raise StrategyError(f"{verb} needs --dst-strategy FILE")
    _check_dst_vs_src(src, os.fspath(dst))
    source = open_source(src, src_strategy=src_strategy, storage_options=storage_options)
    strat = load_strategy(dst_strategy, storage_options=storage_options)
    missing = [n for n in strat.params if n not in source.tensors]
    if missing:
        raise StrategyError(
            f"destination strategy names {len(missing)} tensor(s) that {source.storage.url} lacks, e.g. {missing[0]!r}"
        )
    for name in strat.params:
        t = source.tensors[name]
        try:
            strat.params[name].layout.validate(t.shape, name)
        except DistCkptError as exc:
            raise StrategyError(f"destination strategy does not fit the checkpoint: {exc}") from None
        if format == "ckpt":
            dtypes.ckpt_name(t.dtype, tensor=name)
    stats = ReadStats()
    with _Output(dst, overwrite=overwrite, storage_options=storage_options, is_file=False) as out:
        if format == "distckpt":
            files = _write_distckpt(out.storage, source, strat, strat.world_size, verify, stats)
        else:
            files = []
            ranks = range(strat.world_size)
            for r in _progress(ranks, total=strat.world_size, desc=verb, quiet=quiet):
                items = [
                    (t.name, t.dtype, box.sizes, _reader(source, t, box, verify, stats))
                    for t, box in _targets(source, strat, r, None)
                ]
                ext = "ckpt" if format == "ckpt" else "safetensors"
                fname = f"rank_{r}/{prefix}{r}.{ext}"
                (_write_ckpt_file if format == "ckpt" else _write_safetensors_file)(out.storage, fname, items, source.values)
                files.append(fname)
            if strat.num_stages > 1:
                out.storage.put("strategy.ckpt", dump_merged_strategy_proto(strat))
            else:
                out.storage.put("strategy.ckpt", dump_strategy_proto(strat))
            files.append("strategy.ckpt")
        _copy_configs(source, out.storage)
    return {
        "dst": os.fspath(dst),
        "format": format,
        "ranks": strat.world_size,
        "files": len(files),
        "read": stats.to_json(),
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ------------------------------------------------------------ verify / inspect
def verify(src, *, src_strategy=None, storage_options: dict | None = None, quiet: bool = True) -> dict:
    """Check every element of every tensor is covered exactly, checksums match, files are readable."""
    source = open_source(src, src_strategy=src_strategy, storage_options=storage_options)
    problems = 0
    for name, f_size in source.index.files.items():
        try:
            actual = source.storage.size(name)
        except FileNotFoundError:
            raise NotCommittedError(f"{source.storage.child_url(name)}: data file is missing (named by the index)") from None
        if actual != f_size:
            raise FormatError(
                f"{source.storage.child_url(name)}: file has {actual} bytes, the index says {f_size} (truncated or replaced)"
            )
    checked = 0
    for t in _progress(list(source.tensors.values()), desc="verify", quiet=quiet):
        check_tiling(t.shape, [c.box for c in t.chunks], name=t.name)
        for i, c in enumerate(t.chunks):
            # read each chunk alone so a failure names it; blocks are verified as read
            try:
                one = TensorInfo(t.name, t.dtype, t.shape, (c,))
                read_box(source.storage, one, c.box, verify=True)
            except DistCkptError as exc:
                raise type(exc)(f"{exc} [chunk {i} of {t.name!r} in {c.file}]") from None
            checked += c.nbytes
    return {
        "src": source.storage.url,
        "kind": source.kind,
        "ok": problems == 0,
        "tensors": len(source.tensors),
        "values": len(source.values),
        "bytes_checked": checked,
    }


def inspect(src, *, src_strategy=None, storage_options: dict | None = None) -> dict:
    """Describe SRC: tensors, dtypes, global shapes, chunks, bytes, layout, replicas."""
    source = open_source(src, src_strategy=src_strategy, storage_options=storage_options)
    strat = source.strategy
    tensors = []
    for name, t in source.tensors.items():
        row: dict[str, Any] = {
            "name": name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "chunks": len(t.chunks),
            "bytes": t.nbytes,
        }
        if strat is not None and name in strat:
            spec = strat.params[name]
            row["layout"] = {**spec.layout.to_json(), "stages": list(spec.stages)}
            holders = len(spec.stages) * strat.stage_device_num  # len(ranks_holding) without building it
            row["replicas"] = holders // max(1, math.prod(spec.layout.full_splits()))
        else:
            row["layout"] = None
            row["replicas"] = source.world_size if source.kind != "distckpt" or strat is not None else 1
        tensors.append(row)
    return {
        "schema": "distckpt.inspect/1",
        "src": source.storage.url,
        "kind": source.kind,
        "world_size": source.world_size,
        "strategy": strategy_to_json(strat) if strat is not None else None,
        "tensors": tensors,
        "values": {k: v for k, v in source.values.items()},
        "total_bytes": sum(t.nbytes for t in source.tensors.values()),
        "files": sorted(source.index.files) if source.kind == "distckpt" else None,
        "config_files": source.config_files,
    }


def gc(path, *, storage_options: dict | None = None, dry_run: bool = False) -> list[str]:
    """Remove the debris of failed saves: data files no committed index names, temp files."""
    storage = open_storage(path, storage_options)
    names = storage.listdir()
    keep: set[str] = set()
    if INDEX_NAME in names:
        keep = set(Index.loads(storage.read_bytes(INDEX_NAME, limit=MAX_INDEX_BYTES)).files)
    debris = [
        n
        for n in names
        if (n.startswith("data-") and n.endswith(".safetensors") and n not in keep)
        or (n.startswith(".") and (".tmp" in n or ".old-" in n))
        or (n.startswith(".manifest-") and INDEX_NAME in names)
    ]
    if not dry_run:
        storage.remove(debris)
    return debris

