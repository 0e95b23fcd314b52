"""Reusable contract checks for storage backends (zarr ``testing/store.py`` style).

``check_storage_contract(url)`` exercises every primitive :class:`~distckpt.storage.Storage`
relies on against a fresh, empty directory URL, and ``check_roundtrip(url)``
saves and loads a small checkpoint there.  Both raise ``AssertionError``
naming the primitive that misbehaves; use them to qualify a new fsspec backend::

    from distckpt.testing import check_storage_contract, check_roundtrip
    check_storage_contract("myfs://bucket/tmp/contract")
    check_roundtrip("myfs://bucket/tmp/roundtrip")

:class:`ThreadComm` and :func:`run_ranks` run a multi-rank job as threads of one
process, with every primitive of :class:`~distckpt.comm.MPIComm`::

    results = run_ranks(4, lambda rank, comm: save(state[rank], url, comm=comm))
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

from .comm import Communicator, _pieces, comm_timeout, format_ranks
from .errors import StorageError
from .storage import Storage, open_storage

__all__ = ["check_storage_contract", "check_roundtrip", "sample_state", "ThreadComm", "run_ranks"]


def _eq(got, want, what: str) -> None:
    assert got == want, f"{what}: got {got!r}, want {want!r}"


def check_storage_contract(url: str, storage_options: dict | None = None) -> Storage:
    """Check the primitives on an empty directory ``url``; return the storage."""
    st = open_storage(url, storage_options)
    _eq(st.listdir(), [], "listdir of a missing directory")
    _eq(st.exists("nope"), False, "exists of a missing name")
    try:
        st.size("nope")
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("size of a missing name must raise FileNotFoundError")

    payload = bytes(range(256)) * 41  # 10496 bytes, not a multiple of anything round
    st.makedirs()
    st.put("a.bin", payload)
    _eq(st.exists("a.bin"), True, "exists after put")
    _eq(st.size("a.bin"), len(payload), "size after put")
    _eq(st.read_bytes("a.bin"), payload, "read_bytes after put")
    _eq(bytes(st.read_range("a.bin", 1000, 333)), payload[1000:1333], "read_range")
    try:
        st.read_bytes("a.bin", limit=100)
    except StorageError:
        pass
    else:
        raise AssertionError("read_bytes must refuse an object above its limit")
    try:
        st.read_range("a.bin", len(payload) - 10, 20)
    except (StorageError, OSError):
        pass
    else:
        raise AssertionError("read_range past the end must raise")

    # a sequential writer, published by close_durable
    f = st.open_write("sub/b.bin")
    for i in range(0, len(payload), 1000):
        f.write(payload[i : i + 1000])
    _eq(f.tell(), len(payload), "writer tell()")
    st.close_durable(f)
    _eq(st.read_bytes("sub/b.bin"), payload, "open_write + close_durable")
    _eq(st.listdir(), ["a.bin", "sub"], "listdir with a file and a subdirectory")
    _eq(st.listdir("sub"), ["b.bin"], "listdir of a subdirectory")
    _eq(st.walk_files(), ["a.bin", "sub/b.bin"], "walk_files")
    _eq(st.isdir("sub"), True, "isdir of a subdirectory")

    # put_atomic replaces whole
    st.put_atomic("idx.json", b"old")
    st.put_atomic("idx.json", b"new-and-longer")
    _eq(st.read_bytes("idx.json"), b"new-and-longer", "put_atomic over an existing object")
    leftovers = [n for n in st.listdir() if n.endswith(".tmp")]
    _eq(leftovers, [], "temp files left by put_atomic")

    # many concurrent ranged reads into caller buffers; a large one is cut into pieces
    st.read_piece = 1 << 20
    big = np.random.default_rng(0).integers(0, 256, size=(3 << 20) + 12345, dtype=np.uint8).tobytes()
    st.put("big.bin", big)
    bufs = [bytearray(n) for n in (7, 1 << 16, len(big) - 100, 1)]
    starts = [0, 5000, 50, len(big) - 1]
    st.read_many([("big.bin", s, memoryview(b)) for s, b in zip(starts, bufs)])
    for s, b in zip(starts, bufs):
        _eq(bytes(b) == big[s : s + len(b)], True, f"read_many range [{s}, {s + len(b)})")

    # a writer abandoned by an exception publishes nothing
    f = st.open_write("partial.bin")
    f.write(b"x" * 100)
    try:
        raise RuntimeError("simulated failure mid-write")
    except RuntimeError:
        f.close()
    if not st.is_local:
        _eq(st.exists("partial.bin"), False, "an object whose writer failed")
    st.remove(["partial.bin"])

    # replace: a file, then a directory with its commit object copied last
    st.put("new.bin", b"N")
    st.replace("new.bin", "a.bin")
    _eq(st.read_bytes("a.bin"), b"N", "replace of a file")
    _eq(st.exists("new.bin"), False, "replace leaves no source")
    st.put("d_new/x", b"1")
    st.put("d_new/commit", b"c")
    st.put("d/old-only", b"o")
    st.replace("d_new", "d", commit_last="commit")
    _eq(st.walk_files("d"), ["d/commit", "d/x"], "replace of a directory (stale objects removed)")

    sub = st.sub("sub")
    _eq(sub.read_bytes("b.bin"), payload, "sub() storage")

    st.remove(["a.bin", "sub", "nope"])
    _eq("a.bin" in st.listdir() or "sub" in st.listdir(), False, "remove of a file and a directory")
    return st


def sample_state(seed: int = 0) -> dict:
    """A small state with the dtypes and shapes that matter: bf16, fp32, int, bool, scalar, value."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((64, 48)).astype(np.float32),
        "b16": rng.standard_normal((40, 8)).astype(ml_dtypes.bfloat16),
        "ids": rng.integers(-5, 5, size=(9,), dtype=np.int64),
        "mask": rng.integers(0, 2, size=(3, 3)).astype(bool),
        "scale": np.asarray(1.5 + seed, dtype=np.float32),
        "step": 100 + seed,
        "tag": "run-α",
    }


def check_roundtrip(url: str, storage_options: dict | None = None, seed: int = 0) -> dict:
    """Save :func:`sample_state` to ``url``, load it back, compare bit for bit; return what was loaded."""
    from . import api

    state = sample_state(seed)
    api.save(state, url, storage_options=storage_options)
    got = api.load(url, storage_options=storage_options)
    _eq(sorted(got), sorted(state), "names after a round trip")
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            g = got[k]
            _eq((g.dtype, g.shape), (v.dtype, v.shape), f"dtype/shape of {k!r}")
            _eq(g.tobytes() == v.tobytes(), True, f"bytes of {k!r}")
        else:
            _eq(got[k], v, f"value {k!r}")
    return got


class _Hub:
    """What the thread-ranks of one :class:`ThreadComm` group share (guarded by ``cond``)."""

    def __init__(self, size: int, timeout: float | None):
        self.size = size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.posts: dict[tuple[int, int], dict[int, Any]] = {}  # (seq, step) -> {rank: contribution}
        self.reads: dict[tuple[int, int], int] = {}
        self.verdicts: dict[int, tuple[str, dict[int, str]]] = {}  # seq -> the error every rank raises
        self.gone: dict[int, tuple[int, str]] = {}  # rank -> (collectives it completed, why it left)
        self.boxes: dict[tuple[int, int], collections.deque] = collections.defaultdict(collections.deque)


class ThreadComm(Communicator):
    """Ranks as threads of one process, with every primitive of :class:`~distckpt.comm.MPIComm`.

    Lets a test run a real multi-rank save or load on one CPU without mpirun.
    The protocol (header rounds, failure paths, messages) is the shared one of
    :class:`~distckpt.comm.Communicator`; only the transport differs: each step of
    a collective meets in a shared slot, ``exchange`` hands buffer views from
    sender to receiver (the receiver copies).  Deadlines apply (``timeout`` of
    :meth:`group`); a timeout names the ranks that did not arrive, the same text
    on every rank.  A rank whose thread dies (see :func:`run_ranks`) is *gone*: the
    collectives it will never join fail at once on the others, naming it.
    """

    def __init__(self, rank: int, hub: _Hub):
        super().__init__()
        self.rank, self.size, self._hub = rank, hub.size, hub
        self._key = (-1, 0)

    @staticmethod
    def group(n: int, *, timeout: float = 300) -> list[ThreadComm]:
        hub = _Hub(n, comm_timeout(timeout))
        return [ThreadComm(r, hub) for r in range(n)]

    def _timeout_value(self) -> float | None:
        return self._hub.timeout

    def _leave(self, why: str) -> None:
        """This rank takes part in no further collective (its thread ended with an error)."""
        with self._hub.cond:
            self._hub.gone[self.rank] = (self._done(), why)
            self._hub.cond.notify_all()

    def _check(self, op, present=None) -> None:
        """With the hub's lock held: raise the verdict of ``op`` or name a rank that left before it."""
        hub = self._hub
        if op.seq in hub.verdicts:
            raise self._break(*hub.verdicts[op.seq])
        for r, (done, why) in sorted(hub.gone.items()):
            if r != self.rank and done <= op.seq and (present is None or r not in present):
                message = f"collective {op.name!r} (#{op.seq}) cannot complete: rank(s) {r} did not arrive (rank {r} {why})"
                verdict = hub.verdicts.setdefault(op.seq, (message, {r: why}))
                hub.cond.notify_all()
                raise self._break(*verdict)

    def _precheck(self, op) -> None:
        with self._hub.cond:
            self._check(op)

    def _meet(self, op, value) -> dict[int, Any]:
        """Post this rank's contribution to the next step of ``op``; every rank's, once all arrived."""
        hub = self._hub
        seq, step = self._key
        self._key = key = (op.seq, step + 1 if seq == op.seq else 0)
        with hub.cond:
            got = hub.posts.setdefault(key, {})
            got[self.rank] = value
            hub.cond.notify_all()
            while len(got) < self.size:
                self._check(op, got)
                left = None if op.deadline is None else op.deadline - time.monotonic()
                if left is not None and left <= 0:
                    missing = [r for r in range(self.size) if r not in got]
                    message = (
                        f"collective {op.name!r} (#{op.seq}) timed out after {op.budget}: rank(s) "
                        f"{format_ranks(missing)} did not arrive (crashed, hung, or still busy in an earlier phase; "
                        f"if they are just slow, raise the timeout)"
                    )
                    failures = {r: f"did not arrive at {op.name!r} within {op.budget}" for r in missing}
                    verdict = hub.verdicts.setdefault(op.seq, (message, failures))
                    hub.cond.notify_all()
                    raise self._break(*verdict)
                hub.cond.wait(left)
            out = dict(got)
            hub.reads[key] = hub.reads.get(key, 0) + 1
            if hub.reads[key] == self.size:
                del hub.posts[key], hub.reads[key]
            return out

    def _t_header(self, words, op):
        return [max(col) for col in zip(*self._meet(op, list(words)).values())]

    def _t_allgather(self, data, op, maxsize):
        got = self._meet(op, bytes(data))
        return [got[r] for r in range(self.size)]

    def _t_gather(self, data, op, root, maxsize):
        got = self._meet(op, bytes(data))
        return [got[r] for r in range(self.size)] if self.rank == root else None

    def _t_bcast(self, data, op, root, size):
        return self._meet(op, bytes(data) if self.rank == root and data is not None else None)[root]

    def _await(self, op, ready, peer: int, what: str) -> None:
        """With the hub's lock held: wait until ``ready()``, a verdict, ``peer`` leaving, or the deadline."""
        hub = self._hub
        while not ready():
            if op.seq in hub.verdicts:
                raise self._break(*hub.verdicts[op.seq])
            if peer in hub.gone and hub.gone[peer][0] <= op.seq:
                why = hub.gone[peer][1]
                message = f"collective {op.name!r} (#{op.seq}) cannot complete: rank(s) {peer} did not arrive (rank {peer} {why})"
                verdict = hub.verdicts.setdefault(op.seq, (message, {peer: why}))
                hub.cond.notify_all()
                raise self._break(*verdict)
            left = None if op.deadline is None else op.deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._break(f"exchange {op.name!r} (#{op.seq}) timed out after {op.budget} on rank "
                                  f"{self.rank} waiting {what}")
            hub.cond.wait(left)

    def _t_exchange(self, plan, op, chunk):
        hub = self._hub
        problems = []
        with hub.cond:
            mine = []
            for dest, view in plan.sends:
                for a, b in _pieces(len(view), chunk):
                    item = [view[a:b], False]
                    hub.boxes[(self.rank, dest)].append(item)
                    mine.append((dest, item))
            hub.cond.notify_all()
            for src, view in plan.recvs:
                box = hub.boxes[(src, self.rank)]
                for a, b in _pieces(len(view), chunk):
                    self._await(op, lambda box=box: bool(box), src, f"to receive from rank {src}")
                    item = box.popleft()
                    if len(item[0]) == b - a:
                        view[a:b] = item[0]
                    else:
                        problems.append(f"received {len(item[0])} bytes from rank {src} into a {b - a}-byte piece")
                    item[1] = True
                    hub.cond.notify_all()
            for dest, item in mine:
                self._await(op, lambda item=item: item[1], dest, f"for rank {dest} to receive what it sent")
        return "; ".join(problems) or None


def run_ranks(n: int, fn, *, timeout: float = 300, return_exceptions: bool = False) -> list:
    """Run ``fn(rank, comm)`` on ``n`` thread-ranks of one :class:`ThreadComm` group.

    Returns the results; re-raises the first error (or, with ``return_exceptions``,
    puts each rank's exception in its place).  A rank whose ``fn`` raises leaves
    the group, so the others' pending collectives fail at once, naming it.
    """
    comms = ThreadComm.group(n, timeout=timeout)
    results: list = [None] * n
    errors: list = []

    def body(r):
        try:
            results[r] = fn(r, comms[r])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            results[r] = exc
            comms[r]._leave(f"raised {type(exc).__name__}: {exc}"[:500])

    threads = [threading.Thread(target=body, args=(r,), name=f"rank-{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise AssertionError(f"thread-rank(s) {stuck} still running after {timeout} s")
    if errors and not return_exceptions:
        raise errors[0]
    return results
