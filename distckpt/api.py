"""The verbs: save, load, finalize, merge, split, reshard, verify, inspect, gc.

Each verb is a short sequence of steps that live elsewhere:

* ``save``   -- :class:`distckpt.saving.SaveJob`: :func:`distckpt.state.split_state` ->
  :func:`distckpt.plan.plan_writes` -> :func:`distckpt.execute.write_chunk_file` ->
  :mod:`distckpt.commit` (marker, report, build index, commit), over a :mod:`distckpt.comm` communicator;
* ``load``   -- :func:`distckpt.sources.open_source` -> :func:`distckpt.plan.check_fit`
  / :func:`~distckpt.plan.plan_load` -> :func:`distckpt.execute.read_box`;
* ``merge`` / ``split`` / ``reshard`` -- open the source, plan the target layout,
  and stream :class:`~distckpt.writers.OutItem` s into a
  :class:`~distckpt.storage.Staging` area that is moved into place on success.

The save protocol (who does what, in which order, under mpirun) is
:mod:`distckpt.saving`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from . import commit as _commit
from . import dtypes, naming
from .comm import get_comm
from .errors import (
    ConfigError,
    DistCkptError,
    FormatError,
    NotCommittedError,
    StrategyError,
    UsageError,
)
from .execute import DEFAULT_BLOCK_SIZE, PendingChunk, ReadStats, read_box, write_chunk_file
from .index import TensorInfo
from .jobconfig import size_option
from .layout import Box, Strategy, check_tiling, full_box
from .plan import SharedRead, check_fit, plan_load, plan_save, plan_shared_reads
from .progress import counted
from .saving import SaveJob
from .sources import Source, SourceKind, open_source
from .storage import Staging
from .strategy import load_strategy, strategy_bytes, strategy_to_json
from .writers import (
    OUTPUTS,
    OutItem,
    OutputJob,
    copy_configs,
    output_writer,
    write_ckpt_file,
    write_safetensors_file,
    write_sharded,
)

__all__ = ["save", "load", "finalize", "merge", "split", "reshard", "verify", "inspect", "gc"]

#: Output formats of ``merge``, and of ``split`` / ``reshard``.
MERGE_FORMATS = ("ckpt", "safetensors", "distckpt", "mindformers", "hf")
RELAYOUT_FORMATS = ("distckpt", "ckpt", "safetensors", "mindformers")


# ------------------------------------------------------------------------ save
def save(
    state: Any,
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
    """Save this rank's ``state`` into a distckpt checkpoint at ``path``; return the save id.

    ``state`` maps names to this rank's local arrays and to plain values (or is a
    model object an adapter knows, e.g. a MindSpore ``nn.Cell``).  ``strategy``
    (path, URL or parsed) says what every rank holds; without it arrays are full
    tensors.  Under mpirun every rank calls ``save`` and the ranks write together.
    With ``rank=r`` and no communicator only rank r's pieces and a manifest are
    written; :func:`finalize` commits.
    """
    job = SaveJob(state, path, strategy=strategy, rank=rank, comm=comm, storage_options=storage_options,
                  metadata=metadata, block_size=block_size, checksums=checksums)
    return job.run()


def finalize(path, *, storage_options: dict | None = None, **_ignored) -> dict:
    """Commit a rank-mode save once every rank's manifest is present."""
    return _commit.finalize(path, storage_options=storage_options)


def gc(path, *, storage_options: dict | None = None, dry_run: bool = False) -> list[str]:
    """Remove the debris of failed saves that distckpt can prove it wrote (see :mod:`distckpt.commit`)."""
    return _commit.gc(path, storage_options=storage_options, dry_run=dry_run)


# ------------------------------------------------------------------------ load
def _strategy_for(source: Source, strategy, storage_options, *, strict_missing: bool, what: str) -> Strategy:
    strat = load_strategy(strategy, storage_options=storage_options)
    missing = check_fit(strat, {n: t.shape for n, t in source.tensors.items()}, what=what)
    if missing and strict_missing:
        raise StrategyError(
            f"{what} names {len(missing)} tensor(s) that {source.url} lacks, e.g. {missing[0]!r}"
        )
    return strat


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
    iteration: int | None = None,
    model: str | None = None,
    qkv_layout: str | None = None,
    ffn_layout: str | None = None,
    cooperative: bool | None = None,
) -> dict:
    """Read a checkpoint; with ``strategy`` return exactly this rank's slices.

    Without a strategy, full tensors.  With one, what ``transform_checkpoints``
    writes to ``rank_{rank}`` (optimizer shard and pipeline stage included),
    plus the tensors the strategy does not name.  Only overlapping chunks are
    read.  Arrays are numpy (bf16 as ``ml_dtypes.bfloat16``).

    Cooperative load: under mpirun, with a strategy and no explicit ``rank``, every rank
    of the job calls ``load`` together, and each box that several ranks need (data-parallel
    replicas, tensors the strategy does not name) is read from storage by one of them and
    sent to the others over the communicator, so the job pulls each byte once.
    ``cooperative=False`` makes every rank read on its own (a local call); ``True``
    forces it (every rank of the communicator must call).
    """
    c = get_comm(comm) if (rank is None or cooperative) else None
    coop = bool(cooperative) if cooperative is not None else (strategy is not None and rank is None and c is not None
                                                                and c.size > 1 and c.can_exchange)
    if coop:
        assert c is not None
        return _load_together(c, path, strategy=strategy, src_strategy=src_strategy, names=names,
                              storage_options=storage_options, verify=verify, stats=stats,
                              source_options=dict(iteration=iteration, **_model_options(model, qkv_layout, ffn_layout)))
    src = _open(path, src_strategy, storage_options, iteration=iteration, **_model_options(model, qkv_layout, ffn_layout))
    want = _wanted(src, names)
    strat = None
    if strategy is not None:
        strat = _strategy_for(src, strategy, storage_options, strict_missing=want is None, what="destination strategy")
        if rank is None:
            rank = get_comm(comm).rank
    rank = rank or 0
    if strat is not None and not 0 <= rank < strat.world_size:
        raise StrategyError(f"rank {rank} is outside the strategy's {strat.world_size} ranks")
    st = stats if stats is not None else ReadStats()
    out: dict[str, Any] = {}
    items = plan_load({n: t.shape for n, t in src.tensors.items()}, strat, rank, want)
    src.index.prefetch((it.name, it.box) for it in items)  # index v2: every box looked up in one pass
    for item in items:
        out[item.name] = src.read(item.name, item.box, verify=verify, stats=st)
    out.update(_values(src, want))
    return out


def _wanted(src: Source, names: Iterable[str] | None) -> set[str] | None:
    want = set(names) if names is not None else None
    if want is not None:
        unknown = want - set(src.tensors) - set(src.values)
        if unknown:
            raise NotCommittedError(f"{src.url}: no tensor(s) {sorted(unknown)[:5]} in this checkpoint")
    return want


def _values(src: Source, want: set[str] | None) -> dict[str, Any]:
    return {k: v for k, v in src.values.items() if want is None or k in want}


def _load_together(c, path, *, strategy, src_strategy, names, storage_options, verify, stats, source_options) -> dict:
    """Cooperative load (see :func:`load`): plan from the layout alone, read my share, agree, exchange."""
    import numpy as np

    st = stats if stats is not None else ReadStats()
    out: dict[str, Any] = {}
    plan: list[SharedRead] = []
    error: BaseException | None = None
    src: Source | None = None
    want: set[str] | None = None
    try:
        src = _open(path, src_strategy, storage_options, **source_options)
        want = _wanted(src, names)
        strat = None
        if strategy is not None:
            strat = _strategy_for(src, strategy, storage_options, strict_missing=want is None,
                                  what="destination strategy")
            if strat.world_size != c.size:
                raise StrategyError(f"strategy describes {strat.world_size} ranks but this job has {c.size}")
        tensors = {n: (t.dtype, t.shape) for n, t in src.tensors.items() if want is None or n in want}
        plan = plan_shared_reads(tensors, strat, c.size, c.rank)
        src.index.prefetch((it.name, it.box) for it in plan if it.reader == c.rank)
        for it in plan:
            dtype = dtypes.to_numpy(tensors[it.name][0])
            if it.reader == c.rank:
                arr = src.read(it.name, it.box, verify=verify, stats=st)
                out[it.name] = np.ascontiguousarray(arr) if arr.ndim else arr.copy()
            else:
                out[it.name] = np.empty(it.box.sizes, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - every rank learns of it before any transfer
        error = exc
    c.agree("load.read", error)
    sends = [(m, out[it.name]) for it in plan if it.reader == c.rank for m in it.members if m != c.rank]
    recvs = [(it.reader, out[it.name]) for it in plan if it.reader != c.rank]
    c.exchange(sends, recvs, "load.share")
    assert src is not None
    out.update(_values(src, want))
    return out


# ------------------------------------------------------------- merge / relayout
def _check_dst_vs_src(src, dst: str) -> None:
    """Refuse a DST that is SRC, lies inside SRC, or contains SRC (--overwrite would delete it)."""
    from .storage import is_url

    if isinstance(src, Source):
        return
    s, d = os.fspath(src), os.fspath(dst)

    def norm(x: str) -> str:
        import posixpath

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


def _reader(src: Source, name: str, box: Box, verify: bool, stats: ReadStats):
    return lambda: src.read(name, box, verify=verify, stats=stats)


def _warn_missing(source: Source, strict: bool) -> None:
    """A strategy parameter no file holds: skipped (as transform_checkpoints does) with a warning, or an error."""
    import sys

    missing = source.info.get("missing") or []
    if not missing:
        return
    msg = (f"{source.url}: the strategy names {len(missing)} parameter(s) that no rank's file holds: "
           + ", ".join(missing))
    if strict:
        raise StrategyError(msg + " (--strict)")
    print("warning: " + msg + "; skipped", file=sys.stderr)


def _output_format(dst: str, format: str | None, allowed: tuple[str, ...]) -> str:
    ext = "ckpt" if dst.endswith(".ckpt") else "safetensors" if dst.endswith(".safetensors") else None
    if format is None:
        return ext or "ckpt"
    if format not in allowed:
        raise FormatError(f"unknown --format {format!r}; use {', '.join(allowed)}")
    if ext is not None and format != ext:
        raise UsageError(f"--format {format} contradicts DST {dst}, whose name ends in .{ext}")
    return format


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
    strict: bool = False,
    iteration: int | None = None,
    model: str | None = None,
    qkv_layout: str | None = None,
    ffn_layout: str | None = None,
    hf_config=None,
    dst_iteration: int | None = None,
    comm=None,
) -> dict:
    """Merge SRC into one checkpoint: a ``.ckpt``/``.safetensors`` file, a MindFormers-ready directory,
    a one-rank MindFormers checkpoint (``format="mindformers"``) or a HuggingFace model (``format="hf"``)."""
    t0 = time.perf_counter()
    dst = os.fspath(dst)
    format = _output_format(dst, format, MERGE_FORMATS)
    shard = size_option(max_shard_size)
    _check_dst_vs_src(src, dst)
    c = get_comm(comm)
    if c.size > 1:
        return _merge_with_every_rank(c, src, dst, format=format, shard=shard, src_strategy=src_strategy,
                                      overwrite=overwrite, storage_options=storage_options, verify=verify,
                                      strict=strict, t0=t0, iteration=iteration, model=model,
                                      qkv_layout=qkv_layout, ffn_layout=ffn_layout, hf_config=hf_config,
                                      dst_iteration=dst_iteration, quiet=quiet)
    source = _open(src, src_strategy, storage_options, iteration=iteration,
                   **({} if format == "hf" else _model_options(model, qkv_layout, ffn_layout)))
    _warn_missing(source, strict)
    stats = ReadStats()
    tensors = list(source.tensors.values())
    if format == "ckpt":
        for t in tensors:
            dtypes.ckpt_name(t.dtype, tensor=t.name)
    items = [OutItem(t.name, t.dtype, t.shape, _reader(source, t.name, full_box(t.shape), verify, stats)) for t in tensors]
    items = counted(items, desc="merge", quiet=quiet)
    single = dst.endswith((".ckpt", ".safetensors"))
    with Staging(dst, kind="file" if single else "dir", overwrite=overwrite, storage_options=storage_options) as out:
        if single:
            (write_ckpt_file if format == "ckpt" else write_safetensors_file)(out.store, out.name, items, source.values)
            files = [os.path.basename(dst)]
        elif format == "distckpt":
            files = _write_distckpt(out.store, source, None, 1, verify, stats)
            copy_configs(source, out.store)
        elif format in OUTPUTS:
            options = {"max_shard_size": shard, "quiet": quiet, "dst_iteration": dst_iteration, "plain": False,
                       "hf_config": hf_config, **_model_options(model, qkv_layout, ffn_layout)}
            files = output_writer(format)(OutputJob(out.store, source, None, _read_fn(source, verify, stats), options))
        else:
            stem = source.name if format == "ckpt" else "model"
            files = write_sharded(out.store, items, source.values, stem=stem, ext=format, max_shard_size=shard)
            copy_configs(source, out.store, json_only=bool(shard) and format == "ckpt")
    return {
        "dst": dst,
        "format": format,
        "files": files,
        "tensors": len(tensors),
        "bytes": sum(t.nbytes for t in tensors),
        "ranks": 1,
        "read": stats.to_json(),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _merge_with_every_rank(c, src, dst: str, *, format: str, shard, src_strategy, overwrite, storage_options, verify,
                           strict, t0, quiet, **opts) -> dict:
    """``merge`` under mpirun: the ranks split the output (:mod:`distckpt.writers.parallel`)."""
    from .writers.parallel import merge_parallel

    model_opts = _model_options(opts["model"], opts["qkv_layout"], opts["ffn_layout"])
    if format in OUTPUTS and format != "hf":  # written by their own module: the coordinator writes, the others wait
        def alone() -> dict:
            from .comm import SingleComm

            return merge(src, dst, format=format, max_shard_size=shard, src_strategy=src_strategy, overwrite=overwrite,
                         storage_options=storage_options, verify=verify, quiet=quiet, strict=strict,
                         hf_config=opts["hf_config"], dst_iteration=opts["dst_iteration"], iteration=opts["iteration"],
                         comm=SingleComm(), **model_opts)

        return c.run_on_root("merge", alone)
    stats = ReadStats()
    holder: dict[str, Source] = {}

    def open_src() -> Source:
        source = _open(src, src_strategy, storage_options, iteration=opts["iteration"],
                       **({} if format == "hf" else model_opts))
        if c.rank == 0:
            _warn_missing(source, strict)
        holder["source"] = source
        return source

    hf_options = {"max_shard_size": shard, "hf_config": opts["hf_config"], **model_opts}
    files = merge_parallel(c, open_src, dst, fmt=format, shard=shard, overwrite=overwrite,
                           storage_options=storage_options, read_factory=lambda s: _read_fn(s, verify, stats),
                           hf_options=hf_options)
    source = holder.get("source")
    tensors = list(source.tensors.values()) if source is not None else []
    totals = c.gather(stats.to_json(), "merge.stats")
    read = stats.to_json()
    if totals:
        read = {k: sum(t[k] for t in totals) for k in ("bytes_needed", "bytes_read", "requests")}
        read["ratio"] = round(read["bytes_read"] / read["bytes_needed"], 4) if read["bytes_needed"] else 1.0
    return {"dst": dst, "format": format, "files": files, "tensors": len(tensors),
            "bytes": sum(t.nbytes for t in tensors), "ranks": c.size, "read": read,
            "seconds": round(time.perf_counter() - t0, 3)}


def _model_options(model, qkv_layout, ffn_layout) -> dict:
    """The HuggingFace model-map options that were given (a source reads HF weights as MindFormers' through them)."""
    got = {"model": model, "qkv_layout": qkv_layout, "ffn_layout": ffn_layout}
    return {k: v for k, v in got.items() if v is not None}


def _open(src, src_strategy, storage_options, **options) -> Source:
    return open_source(src, src_strategy=src_strategy, storage_options=storage_options,
                       **{k: v for k, v in options.items() if v is not None})


def _read_fn(source: Source, verify: bool, stats: ReadStats):
    return lambda name, box: source.read(name, box, verify=verify, stats=stats)


def _write_distckpt(store, source: Source, strategy: Strategy | None, world: int, verify: bool, stats: ReadStats) -> list[str]:
    """Write SRC as a distckpt checkpoint laid out for ``strategy``: one file per writer rank."""
    save_id = naming.new_save_id()
    tensors = {n: (t.dtype, t.shape) for n, t in source.tensors.items()}
    by_writer: dict[int, list] = {}
    for it in plan_save(tensors, strategy, world):
        by_writer.setdefault(it.writer, []).append(it)
    _commit.write_marker(store, save_id)
    reports = []
    for r in sorted(by_writer):
        fname = naming.data_file(save_id, r)
        pending = [
            PendingChunk(it.name, it.box, it.dtype, _reader(source, it.name, it.box, verify, stats))
            for it in by_writer[r]
        ]
        recs, size = write_chunk_file(store, fname, pending, rank=r)
        reports.append(_commit.report(r, {fname: size}, {it.name: tensors[it.name] for it in by_writer[r]}, recs))
    index = _commit.build_index(
        reports, save_id=save_id, world_size=world, checksum="crc32c", block_size=DEFAULT_BLOCK_SIZE,
        strategy=strategy_to_json(strategy) if strategy is not None else None, metadata={"name": source.name},
        values=_commit.values_json(source.values), where=store.child_url(naming.INDEX_NAME),
    )
    return _commit.commit(store, index)


def split(
    src,
    dst,
    *,
    dst_strategy=None,
    format: str = "distckpt",
    prefix: str = "checkpoint_",
    src_strategy=None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    verify: bool = True,
    quiet: bool = True,
    strict: bool = False,
    iteration: int | None = None,
    model: str | None = None,
    qkv_layout: str | None = None,
    ffn_layout: str | None = None,
    dst_iteration: int | None = None,
    plain: bool = False,
    comm=None,
) -> dict:
    """Cut SRC into the shards of ``dst_strategy``.

    Under mpirun every rank calls it and rank 0 does the work (the others wait for its result or error).
    """
    def run() -> dict:
        return _relayout(src, dst, dst_strategy, format, prefix, src_strategy, overwrite, storage_options, verify,
                         quiet, strict, "split", dict(iteration=iteration, **_model_options(model, qkv_layout, ffn_layout)),
                         {"dst_iteration": dst_iteration, "plain": plain})

    c = get_comm(comm)
    return run() if c.size == 1 else c.run_on_root("split", run)


def reshard(
    src,
    dst,
    *,
    dst_strategy=None,
    format: str = "distckpt",
    prefix: str = "checkpoint_",
    src_strategy=None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    verify: bool = True,
    quiet: bool = True,
    strict: bool = False,
    iteration: int | None = None,
    model: str | None = None,
    qkv_layout: str | None = None,
    ffn_layout: str | None = None,
    dst_iteration: int | None = None,
    plain: bool = False,
    comm=None,
) -> dict:
    """Move SRC into another parallel layout (any world size).

    Under mpirun every rank calls it and rank 0 does the work (the others wait for its result or error).
    """
    def run() -> dict:
        return _relayout(src, dst, dst_strategy, format, prefix, src_strategy, overwrite, storage_options, verify,
                         quiet, strict, "reshard", dict(iteration=iteration, **_model_options(model, qkv_layout, ffn_layout)),
                         {"dst_iteration": dst_iteration, "plain": plain})

    c = get_comm(comm)
    return run() if c.size == 1 else c.run_on_root("reshard", run)


def _relayout(src, dst, dst_strategy, format, prefix, src_strategy, overwrite, storage_options, verify, quiet, strict,
              verb, source_options: dict, output_options: dict) -> dict:
    t0 = time.perf_counter()
    if format not in RELAYOUT_FORMATS:
        raise FormatError(f"unknown --format {format!r}; use {', '.join(RELAYOUT_FORMATS)}")
    if dst_strategy is None:
        raise UsageError(f"{verb} needs --dst-strategy FILE (the strategy of the target layout)")
    _check_prefix(prefix)
    _check_dst_vs_src(src, os.fspath(dst))
    source = _open(src, src_strategy, storage_options, **source_options)
    _warn_missing(source, strict)
    strat = load_strategy(dst_strategy, storage_options=storage_options)
    if format == "ckpt":  # what a .ckpt cannot hold is refused before anything else
        for name in strat.params:
            if name in source.tensors:
                dtypes.ckpt_name(source.tensors[name].dtype, tensor=name)
    strat = _strategy_for(source, strat, storage_options, strict_missing=True, what="destination strategy")
    stats = ReadStats()
    with Staging(os.fspath(dst), kind="dir", overwrite=overwrite, storage_options=storage_options) as out:
        if format == "distckpt":
            files = _write_distckpt(out.store, source, strat, strat.world_size, verify, stats)
        elif format in OUTPUTS:
            options = {"quiet": quiet, "prefix": prefix, **output_options}
            files = output_writer(format)(OutputJob(out.store, source, strat, _read_fn(source, verify, stats), options))
        else:
            files = _write_rank_files(out.store, source, strat, format, prefix, verify, stats, quiet, verb)
        if format != "mindformers":
            copy_configs(source, out.store)
    return {
        "dst": os.fspath(dst),
        "format": format,
        "ranks": strat.world_size,
        "files": len(files),
        "read": stats.to_json(),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _check_prefix(prefix: str) -> None:
    from .storage import safe_name

    try:
        safe_name(prefix + "0", what="--prefix")
    except DistCkptError:
        raise UsageError(f"--prefix {prefix!r} must be a plain file-name prefix (no '/', '..' or other path parts)") from None


def _write_rank_files(store, source: Source, strat: Strategy, format: str, prefix: str, verify: bool,
                      stats: ReadStats, quiet: bool, verb: str) -> list[str]:
    """MindSpore's per-rank layout ``rank_{r}/{prefix}{r}.{ext}`` + ``strategy.ckpt``."""
    from .progress import progress

    files = []
    shapes = {n: t.shape for n, t in source.tensors.items()}
    for r in progress(range(strat.world_size), total=strat.world_size, desc=verb, quiet=quiet):
        items = [
            OutItem(i.name, source.tensors[i.name].dtype, i.box.sizes, _reader(source, i.name, i.box, verify, stats))
            for i in plan_load(shapes, strat, r)
        ]
        fname = naming.rank_file(r, prefix, format)
        (write_ckpt_file if format == "ckpt" else write_safetensors_file)(store, fname, items, source.values)
        files.append(fname)
    store.put_atomic("strategy.ckpt", strategy_bytes(strat))
    return files + ["strategy.ckpt"]


# ------------------------------------------------------------ verify / inspect
def verify(src, *, src_strategy=None, storage_options: dict | None = None, quiet: bool = True,
           raise_errors: bool = True, iteration: int | None = None, model: str | None = None,
           qkv_layout: str | None = None, ffn_layout: str | None = None) -> dict:
    """Check every file, every chunk and every checksum, and report every problem found.

    Returns ``{"src", "kind", "ok", "checksums", "problems": [{"file", "tensor", "chunk", "what"}], ...}``.
    With defects and ``raise_errors`` (the default) the first problem's error is raised, its message
    counting the others and its ``report`` attribute holding the whole report.
    """
    from .progress import progress

    source = _open(src, src_strategy, storage_options, iteration=iteration, **_model_options(model, qkv_layout, ffn_layout))
    source = getattr(source, "base", None) or source  # a model map has no bytes of its own: check the files under it
    problems: list[dict] = []
    errors: list[DistCkptError] = []

    def note(exc: DistCkptError, file: str | None, tensor: str | None, chunk: int | None) -> None:
        errors.append(exc)
        problems.append({"file": file, "tensor": tensor, "chunk": chunk, "what": " ".join(str(exc).split())})

    bad_files = set()
    for name, f_size in source.index.files.items():
        url = source.storage.child_url(name)
        try:
            actual = source.storage.size(name)
            if actual != f_size:
                raise FormatError(f"{url}: file has {actual} bytes, the index says {f_size} (truncated or replaced)")
        except FileNotFoundError:
            bad_files.add(name)
            note(NotCommittedError(f"{url}: data file is missing (named by the index)"), url, None, None)
        except DistCkptError as exc:
            bad_files.add(name)
            note(exc, url, None, None)
    checked = 0
    tensors = list(source.tensors.values())
    try:
        source.index.check()  # index v2: every rule on every chunk of the table, and the blobs' crc32c
    except DistCkptError as exc:
        note(exc, None, None, None)
        tensors = []  # its chunks cannot be trusted to say where any bytes are
    for t in progress(tensors, desc="verify", quiet=quiet):
        tiled = True
        try:
            check_tiling(t.shape, [c.box for c in t.chunks], name=t.name)
        except DistCkptError as exc:
            tiled = False
            note(exc, None, t.name, None)
        if tiled:
            source.index.prefetch((t.name, c.box) for c in t.chunks)  # index v2: one lookup pass per tensor
        for i, c in enumerate(t.chunks):
            if c.file in bad_files:
                continue
            try:  # through the whole tensor when it tiles, so that messages number chunks as the report does
                read_box(source.storage, t if tiled else TensorInfo(t.name, t.dtype, t.shape, (c,)), c.box, verify=True)
                checked += c.nbytes
            except DistCkptError as exc:
                note(exc, source.storage.child_url(c.file), t.name, i)
    rep = {
        "src": source.url,
        "kind": str(source.kind),
        "ok": not problems,
        "checksums": source.kind == SourceKind.DISTCKPT and source.index.checksum != "none",
        "problems": problems,
        "tensors": len(source.tensors),
        "values": len(source.values),
        "bytes_checked": checked,
    }
    if problems and raise_errors:
        first = errors[0]
        more = f" (and {len(problems) - 1} more problem(s); `distckpt verify --json` lists them)" if len(problems) > 1 else ""
        failure = type(first)(f"{first}{more}")
        failure.report = rep  # type: ignore[attr-defined]
        raise failure
    return rep


def inspect(src, *, src_strategy=None, storage_options: dict | None = None, iteration: int | None = None,
            model: str | None = None, qkv_layout: str | None = None, ffn_layout: str | None = None) -> dict:
    """Describe SRC: tensors, dtypes, global shapes, chunks, bytes, layout, replicas."""
    from .inspection import describe

    return describe(_open(src, src_strategy, storage_options, iteration=iteration,
                          **_model_options(model, qkv_layout, ffn_layout)))

