"""Asynchronous saves written by a separate process, fed through shared memory.

A training loop should be blocked only for the one copy of what its rank
writes; the bytes then go to disk (crc32c, writes, fsync) in another process,
so the writer never holds the training process's GIL.

Who does what for one asynchronous save (:class:`distckpt.CheckpointManager`):

1. (training thread)   :class:`~distckpt.saving.SaveJob` prepares; ``job.stage`` copies the
   pieces this rank writes into one shared-memory segment (a file in ``/dev/shm``,
   mapped) from :meth:`AsyncWriter.allocate` -- the only blocked time;
2. (background thread) ``job.run(writer=AsyncWriter.write)``: the save id round, then
   :meth:`AsyncWriter.write` hands the segment's layout to the writer process (JSON over a
   pipe; never pickle) and waits for its report; then the report/commit round;
3. (writer process)    maps the segment, runs :func:`distckpt.execute.write_chunk_file`,
   answers with the chunk records, and unmaps.

The writer process is spawned once per :class:`AsyncWriter` (fork-free, so it is
safe beside MPI) and imports neither MPI nor MindSpore.  If it dies, the save in
flight fails on every rank (and writes nothing that counts); the next save
starts a new one.  If the training process dies, the writer sees its pipe close
and exits.

After a save the segment is kept as a spare (``release(keep=True)``) and the next
save of about the same size stages into it: its pages are already faulted in, so the
blocked copy runs at memcpy speed instead of paying a page fault per 4 KiB (measured
4x on a fresh segment).  One spare at most, never more than twice the next save's
size; :meth:`AsyncWriter.close` (``CheckpointManager.close``) frees it.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import tempfile
import threading
import uuid
from typing import Any

import numpy as np

from . import jsonutil
from .errors import DistCkptError, StorageError
from .execute import PendingChunk
from .index import Chunk
from .layout import Box

__all__ = ["AsyncWriter"]


def _chunk_from_json(d: dict) -> Chunk:
    crcs = tuple(d["crc32c"]) if "crc32c" in d else None
    return Chunk(Box(tuple(d["offsets"]), tuple(d["sizes"])), d["file"], ((d["start"], d["length"]),), crcs,
                 d.get("block_size", 0), d.get("rank"))


#: The writer process's niceness (added to the parent's; ``DISTCKPT_WRITER_NICE`` overrides it,
#: 0 to turn it off): where the training step keeps the cores busy, the scheduler runs the writer
#: in the gaps rather than beside the step.  Measured on a 2-vCPU VM whose two vCPUs slow each
#: other (a busy loop on one slows a step on the other 1.5x): a 256 MiB save slows the training
#: step 1.4x at niceness 0 and 1.1x at 10, and takes longer (about 3 s instead of 0.7 s) while
#: the step saturates the machine.  On a host with idle cores the writer runs at full speed.
WRITER_NICE = 10

#: Name prefix of our shared-memory segments (``/dev/shm/distckpt_{pid}_{id}``).
_PREFIX = "distckpt_"
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _sweep_dead_segments(directory: str = _SHM_DIR) -> None:
    """Unlink segments left by a killed training process (its pid is gone), so crashes never pile up memory."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for n in names:
        if not n.startswith(_PREFIX):
            continue
        try:
            pid = int(n[len(_PREFIX):].split("_", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(directory, n))
            except OSError:
                pass
        except (ValueError, PermissionError):
            continue


class AsyncWriter:
    """A writer process and the shared-memory segments it writes from (one save in flight at a time)."""

    def __init__(self) -> None:
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()
        self._segments: dict[str, mmap.mmap] = {}
        self._spare: tuple[str, mmap.mmap] | None = None  # the last save's segment, faulted in, for reuse

    # ------------------------------------------------------------ process
    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="distckpt-writer")
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def close(self) -> None:
        """Stop the writer process and free every segment."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send_bytes(b'{"stop": true}')
                except OSError:
                    pass
                self._conn.close()
            if self._proc is not None:
                self._proc.join(timeout=10)
                if self._proc.is_alive():
                    self._proc.kill()
            self._proc = self._conn = None
            for name in list(self._segments):
                self.release(name)
            if self._spare is not None:
                self._free(*self._spare)
                self._spare = None

    # ------------------------------------------------------------ memory
    def allocate(self, nbytes: int) -> memoryview:
        """A shared-memory buffer of ``nbytes`` for :meth:`distckpt.saving.SaveJob.stage`."""
        _sweep_dead_segments()
        if self._spare is not None:
            name, mm = self._spare
            self._spare = None
            if nbytes <= len(mm) <= 2 * max(nbytes, 1 << 20):
                self._segments[name] = mm
                return memoryview(mm)[:nbytes]
            self._free(name, mm)
        name = f"{_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
        path = os.path.join(_SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, max(1, nbytes))
            mm = mmap.mmap(fd, max(1, nbytes))
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._segments[name] = mm
        return memoryview(mm)[:nbytes]

    def release(self, name: str | None = None, *, keep: bool = False) -> None:
        """Free one segment (or every one in use): unlinked now, unmapped once no array views it.

        ``keep=True`` (a save is done with its segment) keeps one of them as the spare that the
        next :meth:`allocate` reuses."""
        for n in [name] if name is not None else list(self._segments):
            mm = self._segments.pop(n, None)
            if mm is None:
                continue
            if keep and self._spare is None:
                self._spare = (n, mm)
                continue
            self._free(n, mm)

    @staticmethod
    def _free(name: str, mm: mmap.mmap) -> None:
        try:
            os.unlink(os.path.join(_SHM_DIR, name))
        except FileNotFoundError:
            pass
        try:
            mm.close()
        except BufferError:
            pass  # a staged view is still alive; the mapping goes with it

    def _segment_of(self, arr: np.ndarray) -> tuple[str, int]:
        addr = arr.__array_interface__["data"][0]
        for name, mm in self._segments.items():
            base = np.frombuffer(mm, dtype=np.uint8, count=1).__array_interface__["data"][0]
            if base <= addr < base + len(mm):
                return name, addr - base
        raise StorageError("async save: a staged piece is not in a shared-memory segment (stage the job first)")

    # ------------------------------------------------------------ writer
    def write(self, store, fname: str, pending, *, block_size: int, rank: int | None, checksums: bool):
        """The ``writer`` of :meth:`distckpt.saving.SaveJob.run`: the data file is written by the writer process."""
        if not pending:
            return {}, 0
        items = []
        segment = None
        for p in pending:
            arr = p.fetch()
            name, offset = self._segment_of(arr)
            segment = segment or name
            if name != segment:
                raise StorageError("async save: staged pieces span several shared-memory segments")
            items.append([p.name, p.dtype, list(p.box.offsets), list(p.box.sizes), offset, int(arr.nbytes)])
        job = {"url": store.url, "options": store.storage_options, "fname": fname, "shm": segment, "items": items,
               "block_size": block_size, "rank": rank, "checksums": checksums}
        with self._lock:
            self._ensure()
            try:
                self._conn.send_bytes(json.dumps(job).encode())
                raw = self._conn.recv_bytes()
            except (EOFError, OSError) as exc:
                self._proc = None
                raise StorageError(f"{store.child_url(fname)}: the async writer process died while writing it ({exc})") \
                    from None
        reply = jsonutil.loads(raw, where="the async writer's reply")
        if not reply["ok"]:
            raise StorageError(f"{store.child_url(fname)}: async write failed: {reply['error']}")
        chunks = {n: [_chunk_from_json(c) for c in cs] for n, cs in reply["chunks"].items()}
        return chunks, int(reply["size"])


def _worker_main(conn) -> None:  # pragma: no cover - runs in the writer process (tested end to end)
    """The writer process: one job at a time until told to stop or the parent goes away."""
    from . import dtypes
    from .execute import write_chunk_file
    from .storage import open_storage

    try:  # the training process comes first when they compete for a core
        os.nice(int(os.environ.get("DISTCKPT_WRITER_NICE", WRITER_NICE)))
    except (AttributeError, OSError, ValueError):  # no nice() here, or a bad value: run at the parent's
        pass
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        job = jsonutil.loads(raw, where="an async write job")
        if job.get("stop"):
            return
        mm = None
        pending: list[PendingChunk] = []
        try:
            if not job["shm"].startswith(_PREFIX) or "/" in job["shm"]:
                raise StorageError(f"async save: bad segment name {job['shm']!r}")
            fd = os.open(os.path.join(_SHM_DIR, job["shm"]), os.O_RDONLY | os.O_CLOEXEC)
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            for name, dt, offsets, sizes, offset, nbytes in job["items"]:
                dtype = dtypes.to_numpy(dt)
                raw_arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset)
                arr = raw_arr.view(dtype).reshape(tuple(sizes))
                pending.append(PendingChunk.of(name, Box(tuple(offsets), tuple(sizes)), arr))
            store = open_storage(job["url"], job["options"])
            chunks, size = write_chunk_file(store, job["fname"], pending, block_size=job["block_size"],
                                            rank=job["rank"], checksums=job["checksums"])
            reply = {"ok": True, "size": size, "chunks": {n: [c.to_json() for c in cs] for n, cs in chunks.items()}}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the save everywhere
            msg = str(exc) if isinstance(exc, DistCkptError) else f"{type(exc).__name__}: {exc}"
            reply = {"ok": False, "error": msg}
        finally:
            pending.clear()  # drop the views before the segment is unmapped
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
        conn.send_bytes(json.dumps(reply).encode())
