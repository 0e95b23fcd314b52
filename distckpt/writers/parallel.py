"""``merge`` with every rank of a job: ``mpirun -n N distckpt merge SRC DST`` splits the output among the ranks.

Who does what, in which order (every step's error becomes the same error on
every rank; a failure leaves nothing at DST):

1. (all ranks)   open SRC (metadata only) and compute the same output layout:
   which tensors, in which order, at which byte offsets (a single file), or in
   which shard file (a directory), and which rank writes what -- contiguous
   runs balanced by bytes;
2. (coordinator) open the :class:`~distckpt.storage.Staging` area beside DST and,
   for a single file, create it at its final size; broadcast its name;
3. (all ranks)   write their part: byte ranges of the one file (``pwrite`` through
   a positioned writer; a shared POSIX file system), or whole shard files, or a
   distckpt data file each;
4. (coordinator) write what only it writes (the safetensors header, the weight
   index, the distckpt index), fsync, and commit the staging area.

Object stores cannot take several writers into one object: there a single-file
merge is written by the coordinator alone (directories are still shared out,
one object per shard).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Sequence
from typing import Any

from .. import commit as _commit
from .. import dtypes, naming
from ..comm import Communicator
from ..errors import StorageError
from ..execute import DEFAULT_BLOCK_SIZE, PendingChunk, write_chunk_file
from ..plan import plan_save
from ..storage import Staging
from . import (
    OutItem,
    add_values,
    group_shards,
    safetensors_layout,
    write_ckpt_file,
    write_safetensors_file,
    write_weight_index,
)

__all__ = ["split_by_bytes", "merge_file", "merge_sharded", "merge_distckpt"]


def split_by_bytes(sizes: Sequence[int], parts: int) -> list[range]:
    """``parts`` contiguous ranges of ``sizes`` whose byte sums are as even as the items allow (some may be empty).

    Boundary ``k`` is where the running total comes nearest to ``k/parts`` of the whole.
    """
    n = len(sizes)
    prefix = [0]
    for x in sizes:
        prefix.append(prefix[-1] + int(x))
    total = prefix[-1]
    bounds = [0]
    for k in range(1, parts):
        target = total * k / parts
        i = bisect.bisect_left(prefix, target, lo=bounds[-1])
        near = [j for j in (i - 1, i) if bounds[-1] <= j <= n]
        bounds.append(min(near, key=lambda j: (abs(prefix[j] - target), j)))
    bounds.append(n)
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


class _Positioned:
    """A sequential ``write`` that lands at ``pos`` of an open file (``pwrite``), every byte checked."""

    def __init__(self, fd: int, pos: int, path: str):
        self.fd, self.pos, self.path = fd, pos, path

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            try:
                n = os.pwrite(self.fd, mv[done:], self.pos + done)
            except OSError as exc:
                from ..execute import _space_error

                raise _space_error(self.path, exc) from None
            if n <= 0:
                raise StorageError(f"{self.path}: the device took no more bytes (full?)")
            done += n
        self.pos += done
        return done


class _Counter:
    """A file that only counts what is written to it (to lay a ``.ckpt`` out before writing it)."""

    def __init__(self) -> None:
        self.pos = 0

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        self.pos += n
        return n


def _zeros(nbytes: int, piece: int = 1 << 22) -> Callable[[], Any]:
    blank = memoryview(bytes(min(nbytes, piece)))

    def gen():
        left = nbytes
        while left > 0:
            n = min(left, len(blank))
            yield blank[:n]
            left -= n

    return gen


def _ckpt_offsets(items: Sequence[OutItem], values: dict) -> tuple[list[int], int, int]:
    """Byte offset of every tensor's values in the ``.ckpt`` :func:`write_ckpt_file` writes, where the plain
    values start, and the file size -- without writing (a ``.ckpt`` is a concatenation of self-contained values)."""
    from ..codecs.ckpt import CkptWriter

    sink = _Counter()
    w = CkptWriter(sink)
    offsets = []
    for it in items:
        offsets.append(w.position)
        w.add_tensor_stream(it.name, it.dtype, it.shape, _zeros(it.nbytes)())
    values_at = w.position
    add_values(w, values)
    return offsets, values_at, w.position


def merge_file(c: Communicator, stage: Staging | None, tmp: str, fmt: str, items: Sequence[OutItem],
               values: dict, *, local: bool) -> None:
    """Step 3 for one ``.ckpt``/``.safetensors`` file: this rank's byte ranges of ``tmp`` (created by step 2)."""
    from ..codecs.ckpt import CkptWriter

    if not local:  # an object: one writer
        if c.rank == 0:
            assert stage is not None
            (write_ckpt_file if fmt == "ckpt" else write_safetensors_file)(stage.store, tmp, items, values)
        return
    path = stage.store.path(tmp) if stage is not None else tmp
    sizes = [it.nbytes for it in items]
    mine = split_by_bytes(sizes, c.size)[c.rank]
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if fmt == "ckpt":
            offsets, values_at, _total = _ckpt_offsets(items, values)
            for i in mine:
                w = CkptWriter(_Positioned(fd, offsets[i], path), offset=offsets[i], name=path)
                it = items[i]
                w.add_tensor(it.name, it.dtype, it.shape, it.fetch())
            if c.rank == 0 and values:
                add_values(CkptWriter(_Positioned(fd, values_at, path), offset=values_at, name=path), values)
        else:
            layout, allitems, _meta = safetensors_layout(items, values)
            if c.rank == 0:
                _Positioned(fd, 0, path).write(layout.header_bytes)
                for it in allitems[len(items):]:  # the plain values, as scalar tensors
                    _Positioned(fd, layout.data_offset(it.name), path).write(dtypes.byteview(it.fetch()))
            for i in mine:
                it = items[i]
                arr = it.fetch()
                _Positioned(fd, layout.data_offset(it.name), path).write(dtypes.byteview(arr))
    finally:
        os.close(fd)


def file_size(fmt: str, items: Sequence[OutItem], values: dict) -> int:
    """The size of the single file :func:`merge_file` fills (so step 2 can create it whole)."""
    if fmt == "ckpt":
        return _ckpt_offsets(items, values)[2]
    layout, allitems, _meta = safetensors_layout(items, values)
    return layout.data_start + sum(it.nbytes for it in allitems)


def merge_sharded(c: Communicator, store, items: Sequence[OutItem], values: dict, *, stem: str, ext: str,
                  max_shard_size: int, metadata: dict[str, str] | None = None) -> list[str]:
    """Step 3 for a sharded directory: every rank writes the shard files it was given (by bytes)."""
    groups = group_shards(items, max_shard_size)
    total = len(groups)
    names = [naming.shard_file(stem, k, total, ext) for k in range(1, total + 1)] if total > 1 else [f"{stem}.{ext}"]
    mine = split_by_bytes([sum(it.nbytes for it in g) for g in groups], c.size)[c.rank]
    for k in mine:
        shard_values = values if k == total - 1 else {}
        if ext == "ckpt":
            write_ckpt_file(store, names[k], groups[k], shard_values)
        else:
            write_safetensors_file(store, names[k], groups[k], shard_values, metadata)
    return names


def _fetcher(read, name: str, box) -> Callable[[], Any]:
    return lambda: read(name, box)


def merge_distckpt(c: Communicator, store, source, read, *, save_id: str) -> dict:
    """Step 3 for a distckpt output: this rank writes the tensors :func:`plan_save` gives it; returns its report."""
    tensors = {n: (t.dtype, t.shape) for n, t in source.tensors.items()}
    mine = [it for it in plan_save(tensors, None, c.size) if it.writer == c.rank]
    if not mine:
        return _commit.report(c.rank, {}, {}, {})
    fname = naming.data_file(save_id, c.rank)
    pending = [PendingChunk(it.name, it.box, it.dtype, _fetcher(read, it.name, it.box)) for it in mine]
    recs, size = write_chunk_file(store, fname, pending, block_size=DEFAULT_BLOCK_SIZE, rank=c.rank)
    return _commit.report(c.rank, {fname: size}, {it.name: tensors[it.name] for it in mine}, recs)



def merge_parallel(c: Communicator, open_source: Callable[[], Any], dst: str, *, fmt: str, shard: int | None,
                   overwrite: bool, storage_options: dict | None, read_factory: Callable[[Any], Any],
                   hf_options: dict | None = None) -> list[str]:
    """Steps 1-4 of the module docstring on every rank; returns the names written (on every rank).

    ``open_source()`` opens SRC (each rank reads its metadata); ``read_factory(source)`` gives the
    ``read(name, box)`` to fetch source data with (checksums and statistics as the caller wants).
    """
    from ..comm import format_ranks
    from ..errors import DistributedError
    from ..layout import full_box
    from ..saving import describe_error
    from ..storage import open_storage, split_url
    from . import copy_configs, write_sharded

    single = dst.endswith((".ckpt", ".safetensors"))
    error: BaseException | None = None
    source: Any = None
    items: list[OutItem] = []
    hf_config = b""
    try:
        source = open_source()
        read = read_factory(source)
        if fmt == "hf":  # HF names and fused tensors split: the HF writer plans, the ranks share its shards
            from . import OutputJob
            from .hf import plan as hf_plan

            items, hf_config, shard = hf_plan(OutputJob(None, source, None, read, hf_options or {}))  # type: ignore[arg-type]
        else:
            items = [OutItem(t.name, t.dtype, t.shape, _fetcher(read, t.name, full_box(t.shape)))
                     for t in source.tensors.values()]
        if fmt == "ckpt":
            for it in items:
                dtypes.ckpt_name(it.dtype, tensor=it.name)
    except Exception as exc:  # noqa: BLE001 - travels to every rank
        error = exc
    stage: Staging | None = None
    committed = False

    def open_stage() -> dict:
        nonlocal stage
        if error is not None:
            raise error
        stage = Staging(dst, kind="file" if single else "dir", overwrite=overwrite, storage_options=storage_options,
                        marker={"verb": "merge", "ranks": c.size})
        stage.__enter__()
        info: dict[str, Any] = {"tmp": stage.tmp_name, "local": bool(stage.store.is_local)}
        if single and stage.store.is_local:  # the file at its final size, for every rank's pwrite
            path = stage.store.path(stage.name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, file_size(fmt, items, source.values))
            finally:
                os.close(fd)
        if fmt == "distckpt":
            info["save_id"] = naming.new_save_id()
            _commit.write_marker(stage.store, info["save_id"])
        return info

    try:
        info = c.run_on_root("merge.stage", open_stage)
        rep: dict[str, Any] = {}
        mine_error: BaseException | None = error
        if mine_error is None:
            try:
                parent = stage.parent if stage is not None else open_storage(split_url(dst)[0], storage_options)
                if single:
                    target = parent.path(info["tmp"]) if info["local"] else info["tmp"]
                    merge_file(c, stage, target, fmt, items, source.values, local=info["local"])
                else:
                    store = stage.store if stage is not None else parent.sub(info["tmp"])
                    if fmt == "distckpt":
                        rep = merge_distckpt(c, store, source, read_factory(source), save_id=info["save_id"])
                    elif fmt == "hf":
                        from .hf import METADATA

                        rep = {"files": merge_sharded(c, store, items, {}, stem="model", ext="safetensors",
                                                      max_shard_size=shard or 0, metadata=METADATA)}
                    elif shard:
                        stem = source.name if fmt == "ckpt" else "model"
                        rep = {"files": merge_sharded(c, store, items, source.values, stem=stem, ext=fmt,
                                                      max_shard_size=shard)}
            except Exception as exc:  # noqa: BLE001
                mine_error = exc
        reports = c.gather({"ok": mine_error is None, "e": describe_error(mine_error), "r": rep}, "merge.write")

        def finish() -> list[str]:
            assert reports is not None and stage is not None
            failures = {r: x["e"] for r, x in enumerate(reports) if not x["ok"]}
            if failures:
                raise DistributedError(
                    f"merge into {dst} failed on rank(s) {format_ranks(failures)}: "
                    + "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items())), failures)
            names: list[str]
            if single:
                if info["local"]:
                    fd = os.open(stage.store.path(stage.name), os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                names = [os.path.basename(dst)]
            elif fmt == "hf":
                names = _weight_index(stage.store, items, {}, reports[0]["r"]["files"], stem="model",
                                      ext="safetensors", shard=shard or 0)
                stage.store.put_atomic("config.json", hf_config)
                names.append("config.json")
            elif fmt == "distckpt":
                index = _commit.build_index(
                    [x["r"] for x in reports], save_id=info["save_id"], world_size=1, checksum="crc32c",
                    block_size=DEFAULT_BLOCK_SIZE, strategy=None, metadata={"name": source.name},
                    values=_commit.values_json(source.values), where=stage.store.child_url(naming.INDEX_NAME))
                names = _commit.commit(stage.store, index)
                copy_configs(source, stage.store)
            else:
                stem = source.name if fmt == "ckpt" else "model"
                if shard:
                    names = reports[0]["r"]["files"]
                    names = _weight_index(stage.store, items, source.values, names, stem=stem, ext=fmt, shard=shard)
                else:
                    names = write_sharded(stage.store, items, source.values, stem=stem, ext=fmt, max_shard_size=None)
                copy_configs(source, stage.store, json_only=bool(shard) and fmt == "ckpt")
            nonlocal committed
            committed = True  # whatever happens next, the staging area is no longer ours to remove
            stage.__exit__(None, None, None)
            return names

        return c.run_on_root("merge.commit", finish)
    except BaseException as exc:
        if stage is not None and not committed:
            try:
                stage.__exit__(type(exc), exc, exc.__traceback__)
            except Exception:  # noqa: BLE001 - the original error matters
                pass
        raise


def _weight_index(store, items: Sequence[OutItem], values: dict, names: list[str], *, stem: str, ext: str,
                  shard: int) -> list[str]:
    """The weight map of shards written by several ranks (what :func:`write_sharded` writes itself)."""
    groups = group_shards(items, shard)
    if len(groups) == 1:
        return names
    return names + [write_weight_index(store, groups, values, names, stem=stem, ext=ext)]
