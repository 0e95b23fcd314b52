"""The save protocol: one rank's part in one save, as steps a caller can split across threads.

Who does what, in which order (under mpirun one round trip after the writes;
an exception on any rank, at any step, becomes the same
:class:`~distckpt.errors.DistributedError` on every rank, never a hang):

1. (all ranks)   :class:`SaveJob` prepares locally: state -> arrays, the strategy,
   global shapes, the boxes this rank writes (closed form,
   :func:`~distckpt.plan.plan_writes`); an error is kept, not raised;
2. (all ranks)   optionally :meth:`SaveJob.stage`: copy the pieces this rank
   writes (and only those) into host or shared memory, so training may go on
   changing its arrays -- the only time an asynchronous save blocks training;
3. (coordinator) :meth:`SaveJob.run` writes the save marker and broadcasts the
   save id (or its own error);
4. (all ranks)   write their data file through a *writer* (in this process:
   :func:`distckpt.execute.write_chunk_file`; or a separate process,
   :mod:`distckpt.asyncsave`);
5. (all ranks)   send their report (or error) to the coordinator only, as bytes: a small
   JSON head and the rank's chunk table (:func:`distckpt.commit.rank_table`,
   :func:`~distckpt.commit.pack_report`; ``gather_bytes``, so each rank sends
   O(its own chunks)); the coordinator merges them
   (:class:`~distckpt.commit.IndexBuilder`), commits index version 2 or names
   the ranks that failed, and broadcasts the small verdict; every rank returns
   the save id or raises it.  A failed save removes what it wrote.

With ``rank=r`` and no communicator (a launcher without MPI) step 5 is a
manifest per rank (:func:`distckpt.commit.write_manifest`: the packed report,
then a small JSON naming it); :func:`distckpt.commit.finalize` commits.
Nothing a rank does here depends on the world size but the coordinator's
merge, which is linear in the reports.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import commit as _commit
from . import dtypes, jsonutil, naming
from .chunktable import ChunkTable
from .comm import Communicator, SingleComm, format_ranks, get_comm
from .errors import DistCkptError, DistributedError, StrategyError, UsageError
from .execute import DEFAULT_BLOCK_SIZE, PendingChunk, write_chunk_file
from .index import Chunk
from .layout import Strategy
from .plan import WriteItem, plan_writes
from .state import split_state
from .storage import open_storage
from .strategy import load_strategy, strategy_to_json

__all__ = ["SaveJob", "Writer", "describe_error"]

#: ``writer(store, fname, pending, *, block_size, rank, checksums) -> (chunk records by tensor, file size)``
Writer = Callable[..., "tuple[dict[str, list[Chunk]], int]"]


def describe_error(exc: BaseException | None) -> str | None:
    """How a rank's error travels to the others: distckpt's message, else ``Type: message``."""
    if exc is None:
        return None
    return str(exc) if isinstance(exc, DistCkptError) else f"{type(exc).__name__}: {exc}"


class SaveJob:
    """One rank's part in one save of ``state`` to ``path`` (see the module docstring)."""

    def __init__(
        self,
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
    ):
        self.rank_mode = rank is not None and comm is None
        self.comm: Communicator = SingleComm() if self.rank_mode else get_comm(comm)
        self.me: int = rank if rank is not None and self.rank_mode else self.comm.rank
        self.url = str(path)
        self.store: Any = None
        self.block_size = block_size
        self.checksums = checksums
        self.metadata = dict(metadata or {})
        self.error: BaseException | None = None
        self.strategy: Strategy | None = None
        self.world = self.comm.size
        self.values: dict[str, Any] = {}
        self.tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.items: list[WriteItem] = []
        self.pieces: list[np.ndarray] = []
        self.arrays: dict[str, np.ndarray] = {}
        self._records: dict[str, list[Chunk]] = {}  # the writer's chunk records (legacy manifests)
        try:  # everything local, so that a failure on one rank reaches the others (never a hang)
            self.store = open_storage(path, storage_options)
            self.url = self.store.url
            self._prepare(state, strategy, storage_options)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            self.error = exc

    # ------------------------------------------------------------ step 1
    def _prepare(self, state, strategy, storage_options) -> None:
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs & (bs - 1):
            raise UsageError(f"block_size {bs!r}: checksum blocks must be a power of two (e.g. 1 MiB = 1048576 bytes)")
        strat = load_strategy(strategy, storage_options=storage_options) if strategy is not None else None
        me = self.me
        if self.rank_mode:
            world = strat.world_size if strat is not None else int(os.environ.get("RANK_SIZE", "1"))
        else:
            world = self.comm.size
        if strat is not None and strat.world_size != world:
            raise StrategyError(
                f"strategy describes {strat.world_size} ranks but this job has {world}: pass the strategy of this job"
            )
        if not 0 <= me < world:
            raise StrategyError(f"rank {me} is outside the world of {world} ranks")
        arrays, values = split_state(state)
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, arr in arrays.items():
            dt = dtypes.name_of(arr.dtype)
            if strat is not None and name in strat:
                if not strat.holds(name, me):
                    continue
                shape = strat.global_shape(name, arr.shape)
                spec = strat.params[name]
                if spec.shape is not None and tuple(spec.shape) != shape:
                    raise StrategyError(
                        f"tensor {name!r}: rank {me} holds {list(arr.shape)}, which the strategy makes {list(shape)}, "
                        f"but its tensor_shape says {list(spec.shape)}"
                    )
                spec.layout.validate(shape, name)
            else:
                shape = tuple(arr.shape)
            tensors[name] = (dt, shape)
        if strat is not None:
            lacking = [n for n in strat.params if strat.holds(n, me) and n not in arrays]
            if lacking:
                raise StrategyError(
                    f"rank {me}'s state has no tensor {lacking[0]!r}, which the strategy places on it"
                    + (f" ({len(lacking)} such tensors)" if len(lacking) > 1 else "")
                )
        self.strategy, self.world, self.values, self.tensors = strat, world, values, tensors
        self.arrays = arrays
        self.items = plan_writes(tensors, strat, world, me)
        self.pieces = []
        for it in self.items:  # plan_writes hands out the very boxes this rank holds: its whole arrays
            self.pieces.append(arrays[it.name])

    @property
    def nbytes(self) -> int:
        """Bytes this rank writes."""
        return sum(int(p.nbytes) for p in self.pieces)

    # ------------------------------------------------------------ step 2
    def stage(self, allocate: Callable[[int], memoryview] | None = None) -> None:
        """Copy the pieces this rank writes into memory from ``allocate(nbytes)`` (host memory by default)."""
        if self.error is not None or not self.pieces:
            return
        try:
            buf = allocate(self.nbytes) if allocate is not None else memoryview(bytearray(self.nbytes))
            staged, pos = [], 0
            for p in self.pieces:
                n = int(p.nbytes)
                arr = np.frombuffer(buf, dtype=np.uint8, count=n, offset=pos).view(p.dtype).reshape(p.shape)
                arr[...] = p
                staged.append(arr)
                pos += n
            self.pieces = staged
        except Exception as exc:  # noqa: BLE001
            self.error = exc

    # ---------------------------------------------------------- steps 3-5
    def run(self, writer: Writer = write_chunk_file) -> str:
        """Write and commit (every rank); return the save id or raise the same error everywhere."""
        c, store, me = self.comm, self.store, self.me

        def new_id() -> str:
            if self.error is not None:
                raise self.error
            sid = naming.new_save_id()
            _commit.write_marker(store, sid, rank=me if self.rank_mode else None)
            return sid

        save_id = new_id() if self.rank_mode or c.size == 1 else c.run_on_root("save.id", new_id)
        fname = naming.data_file(save_id, me)
        files: list = []
        tensors: list = []
        table: ChunkTable | None = None
        if self.error is None:
            try:
                files, tensors, table = self._write(fname, writer)
            except Exception as exc:  # noqa: BLE001
                self.error = exc
        strategy = strategy_to_json(self.strategy) if self.strategy is not None else None
        common: dict[str, Any] = {
            "save_id": save_id,
            "world_size": self.world,
            "block_size": self.block_size,
            "checksum": "crc32c" if self.checksums else "none",
            "strategy": strategy,
            "metadata": self.metadata,
        }
        head: dict[str, Any] = {"rank": me, "save_id": save_id, "files": files, "tensors": tensors}
        if self.rank_mode:
            if self.error is not None:
                raise self.error
            if _commit.index_version() == 1:  # for an older distckpt's finalize: chunk records in the JSON
                legacy = _commit.report(me, dict(map(tuple, files)), {n: (dt, tuple(s)) for n, dt, s in tensors},
                                        self._records)
                store.put_atomic(naming.manifest_file(me), jsonutil.dumps({
                    **legacy, **common, "values": _commit.values_json(self.values) if me == 0 else {}}).encode())
                return save_id
            packed = _commit.pack_report(head, table)
            _commit.write_manifest(store, {
                **common, **head, "strategy": strategy if me == 0 else None,
                "strategy_sha256": _commit.strategy_digest(strategy),
                "values": _commit.values_json(self.values) if me == 0 else {},
            }, packed)
            return save_id
        try:
            packed = _commit.pack_report({"ok": self.error is None, "e": describe_error(self.error), **head}, table)
        except Exception as exc:  # noqa: BLE001 - e.g. metadata that is not JSON: a failure like any other
            self.error = self.error or exc
            packed = _commit.pack_report({"ok": False, "e": describe_error(self.error), "rank": me}, None)
        table = None
        reports = c.gather_bytes(packed, "save.report")  # to the coordinator only: O(own report) per rank
        del packed

        def decide() -> dict:
            assert reports is not None
            where = store.child_url(naming.INDEX_NAME)
            parts = [_commit.unpack_report(b, where=f"{where} (report of rank {r})") for r, b in enumerate(reports)]
            failures = {r: h.get("e") for r, (h, _t, _c) in enumerate(parts) if not h.get("ok")}
            if failures:  # the coordinator words the error, so that every rank raises the same one
                return {"failures": failures, "where": self.url}
            builder = _commit.IndexBuilder(
                ((r, h.get("tensors"), f"{where} (report of rank {r})") for r, (h, _t, _c) in enumerate(parts)), where=where)
            for r, (h, tb, cb) in enumerate(parts):
                builder.add(r, h.get("files"), h.get("tensors"), tb, cb, where=f"{where} (report of rank {r})")
            parts.clear()
            index = builder.finish(values=_commit.values_json(self.values), **common)
            _commit.commit(store, index)
            return {"failures": {}}

        try:
            verdict = decide() if c.size == 1 and self.error is None else c.run_on_root("save.commit", decide)
        except BaseException:
            self._discard(fname, save_id)
            raise
        failures = {int(k): v for k, v in verdict["failures"].items()}
        if failures:
            self._discard(fname, save_id)
            if c.size == 1 and self.error is not None:
                raise self.error
            raise DistributedError(
                f"save to {verdict.get('where', self.url)} failed on rank(s) {format_ranks(failures)}: "
                + "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items())),
                failures,
            ) from self.error
        return save_id

    def _write(self, fname: str, writer: Writer) -> tuple[list, list, ChunkTable | None]:
        """Write this rank's data file; return its report: ``(files, tensors, chunk table)``."""
        pending: Sequence[PendingChunk] = [
            PendingChunk.of(it.name, it.box, piece) for it, piece in zip(self.items, self.pieces)
        ]
        if not pending:
            return [], [], None
        self.store.makedirs()
        chunks, size = writer(self.store, fname, pending, block_size=self.block_size, rank=self.me,
                              checksums=self.checksums)
        self._records = chunks
        written = {it.name: self.tensors[it.name] for it in self.items}
        return _commit.rank_table(self.me, {fname: size}, written, chunks, where=f"rank {self.me}'s report")

    def _discard(self, fname: str, save_id: str) -> None:
        """A failed save: every rank removes its data file, then the coordinator the save's marker.

        If a rank cannot take part (it died), the marker stays, so ``gc`` can still prove the rest is ours.
        """
        c = self.comm
        if self.store is not None:  # None: this rank failed before it opened the storage, so it wrote nothing
            self.store.remove([fname])
        try:
            if c.size > 1:
                c.barrier("save.discard")  # every rank takes part, whatever it wrote
            if c.rank == 0 and self.store is not None:
                self.store.remove([naming.save_marker(save_id)])
        except DistCkptError:
            pass
