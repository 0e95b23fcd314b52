"""Communicators: how the ranks of one job talk to each other.

distckpt needs very little from its communicator: a rank, a world size, and
three named collectives (``barrier``, ``allgather``, ``broadcast``) over small
JSON values (plans, per-rank manifests, error messages).  Tensor data never
crosses ranks.  Three implementations:

==================  ==========================================================
``SingleComm``      one process (rank 0 of 1); every collective is the
                    identity.  The CLI and most tests use it.
``MPIComm``         mpi4py under ``mpirun``; every collective has a deadline
                    (``DISTCKPT_COMM_TIMEOUT`` seconds, default 600).
``MindSporeComm``   ``mindspore.communication`` after ``init()`` (msrun jobs);
                    MindSpore's own collectives, no deadline of ours.
==================  ==========================================================

``get_comm()`` picks one: an explicit communicator wins, then ``mpirun``'s
environment (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``, ``PMIX_RANK``), then an
initialised ``mindspore.communication``, else ``SingleComm``.  The choice can
be forced with ``DISTCKPT_COMM=single|mpi|mindspore``.

Only JSON crosses ranks
-----------------------
Values are encoded with :mod:`json` (never pickle) and travel as raw bytes
through mpi4py's buffer API.  ``SingleComm`` round-trips them through JSON too,
so a tuple comes back as a list and an int dict key as a string in every
communicator alike.  A value that is not JSON-serializable on one rank does not
desynchronise the job: that rank still takes part and every rank raises the
same :class:`~distckpt.errors.DistributedError`.

One rank's failure never hangs the others
-----------------------------------------
Callers (all ranks) wrap every phase in :meth:`Communicator.run`::

    comm = get_comm()
    plan = comm.run("save.plan", lambda: make_local_plan(...), gather=True)
    comm.run("save.write", lambda: write_my_chunks(plan))          # 1) all ranks
    comm.run_on_root("save.commit", lambda: write_index(plan))     # 2) rank 0

``run`` calls ``fn`` on every rank, catches any exception, and allgathers the
outcome; if any rank failed, *every* rank raises the same ``DistributedError``
("save.write failed on rank(s) 1, 3: rank 1: ValueError: boom; rank 3: ...",
``.failures == {1: "ValueError: boom", 3: ...}``).  Code that may raise *between*
collectives outside ``run`` can still desynchronise ranks; two further guards
catch that:

* every ``MPIComm`` collective has a deadline; on expiry it raises
  ``DistributedError`` naming the collective and, on rank 0 and on every rank
  that did arrive, the ranks that did not;
* ``MPIComm`` installs a ``sys.excepthook`` that calls
  ``MPI.COMM_WORLD.Abort`` on an uncaught exception (after printing it), so
  ``mpirun`` tears the whole job down instead of leaving the other ranks in a
  collective.  ``DISTCKPT_NO_ABORT=1`` disables it.

After a timeout or a collective mismatch the communicator is unusable (some
ranks are out of step); every later collective on it raises at once.

How ``MPIComm`` runs a collective
---------------------------------
1. *Arrival* — every rank sends rank 0 a tiny ``{"seq", "name"}`` message on a
   private duplicate of the communicator; rank 0 polls with a deadline, so it
   knows exactly which ranks did not arrive, and checks that every rank is in
   the same collective (same name, same sequence number).  It answers every
   arrived rank with "go" or with the error, which those ranks then raise too.
   This step alone is the barrier.
2. *Data* — MPI's nonblocking collectives (``Iallgather`` of the lengths, then
   ``Iallgatherv``; ``Ibcast``), polled with a deadline.

Collectives must be called from one thread at a time per rank (a lock
serialises them).  Debug logs (logger ``distckpt.comm``) name every collective.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import struct
import sys
import threading
import time
from typing import Any, Callable

from .errors import DistributedError, require

__all__ = [
    "Communicator",
    "SingleComm",
    "MPIComm",
    "MindSporeComm",
    "get_comm",
    "reset_comm",
    "comm_timeout",
    "format_ranks",
    "DEFAULT_TIMEOUT",
]

log = logging.getLogger("distckpt.comm")

#: Default deadline of an MPI collective, in seconds (env ``DISTCKPT_COMM_TIMEOUT``).
DEFAULT_TIMEOUT = 600.0
ENV_TIMEOUT = "DISTCKPT_COMM_TIMEOUT"
ENV_COMM = "DISTCKPT_COMM"
ENV_NO_ABORT = "DISTCKPT_NO_ABORT"

#: Longest per-rank error message kept in a DistributedError.
_MAX_MESSAGE = 2000
_MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def comm_timeout(value: float | None = None) -> float | None:
    """The collective deadline in seconds: ``value``, else ``$DISTCKPT_COMM_TIMEOUT``, else 600.

    Zero or a negative number means no deadline (``None``).
    """
    if value is None:
        raw = os.environ.get(ENV_TIMEOUT, "").strip()
        if raw:
            try:
                value = float(raw)
            except ValueError:
                raise DistributedError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds") from None
        else:
            value = DEFAULT_TIMEOUT
    value = float(value)
    return value if value > 0 else None


def format_ranks(ranks) -> str:
    """``[1, 2, 3, 7]`` → ``"1-3, 7"`` (short even for thousands of ranks)."""
    ranks = sorted(set(int(r) for r in ranks))
    parts: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ranks[i]}-{ranks[j]}")
        else:
            parts.extend(str(r) for r in ranks[i : j + 1])
        i = j + 1
    return ", ".join(parts)


def _describe(exc: BaseException | str) -> str:
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    if len(msg) > _MAX_MESSAGE:
        msg = msg[: _MAX_MESSAGE - 15] + " ...(truncated)"
    return msg


def _failure_message(name: str, failures: dict[int, str]) -> str:
    detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
    return f"{name} failed on rank(s) {format_ranks(failures)}: {detail}"


def _envelope(obj: Any) -> bytes:
    """Encode ``obj`` for the wire; never raises (an encoding error travels as an error)."""
    try:
        return json.dumps({"ok": True, "v": obj}, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        return json.dumps({"ok": False, "e": _describe(exc)}).encode("utf-8")


def _open(raw: bytes) -> tuple[bool, Any]:
    msg = json.loads(raw.decode("utf-8"))
    return (True, msg["v"]) if msg["ok"] else (False, msg["e"])


class Communicator(abc.ABC):
    """A group of ranks and the few named collectives distckpt needs.

    Every rank must call the same collectives, with the same names, in the same
    order.  Values exchanged must be JSON-serializable; they come back as JSON
    gives them (lists for tuples, str keys).
    """

    #: This process's rank, ``0 <= rank < size``.
    rank: int
    #: Number of ranks.
    size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- the primitives each implementation provides --------------------------------
    @abc.abstractmethod
    def barrier(self, name: str, *, timeout: float | None = None) -> None:
        """Return once every rank has called ``barrier(name)``."""

    @abc.abstractmethod
    def _allgather_bytes(self, data: bytes, name: str, timeout: float | None) -> list[bytes]:
        """Every rank's ``data``, indexed by rank."""

    @abc.abstractmethod
    def _broadcast_bytes(self, data: bytes | None, root: int, name: str, timeout: float | None) -> bytes:
        """Root's ``data`` on every rank (``data`` is ignored elsewhere)."""

    # -- collectives over JSON values -----------------------------------------------
    def allgather(self, obj: Any, name: str, *, timeout: float | None = None) -> list:
        """Every rank's ``obj``, as a list indexed by rank (on every rank)."""
        raws = self._allgather_bytes(_envelope(obj), name, timeout)
        values, failures = [], {}
        for r, raw in enumerate(raws):
            ok, v = _open(raw)
            if not ok:
                failures[r] = v
            values.append(v)
        if failures:
            raise DistributedError(_failure_message(f"allgather {name!r} (value is not JSON-serializable)", failures), failures)
        return values

    def gather(self, obj: Any, name: str, *, root: int = 0, timeout: float | None = None) -> list | None:
        """Every rank's ``obj`` on ``root`` (None elsewhere).  (Interim: built on allgather.)"""
        vals = self.allgather(obj, name, timeout=timeout)
        return vals if self.rank == root else None

    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast", *, timeout: float | None = None) -> Any:
        """Root's ``obj`` on every rank (``obj`` is ignored on the other ranks)."""
        self._check_root(root, name)
        raw = self._broadcast_bytes(_envelope(obj) if self.rank == root else None, root, name, timeout)
        ok, v = _open(raw)
        if not ok:
            failures = {root: v}
            raise DistributedError(_failure_message(f"broadcast {name!r} (value is not JSON-serializable)", failures), failures)
        return v

    def gather_errors(self, name: str, error: BaseException | str | None = None, *, timeout: float | None = None) -> dict[int, str]:
        """Allgather each rank's error (or None); return ``{rank: "Type: message"}`` of the failed ranks.

        Every rank gets the same dict.  Does not raise for the failures themselves.
        """
        msg = None if error is None else _describe(error)
        return {r: m for r, m in enumerate(self.allgather(msg, f"{name}.errors", timeout=timeout)) if m is not None}

    def run(self, name: str, fn: Callable[..., Any], *args: Any, gather: bool = False, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` on every rank; if it fails anywhere, raise everywhere.

        Any ``Exception`` from ``fn`` is caught, the outcomes are allgathered (one
        collective, named ``name``), and if any rank failed every rank raises the
        same :class:`DistributedError` naming the failed ranks and their messages
        (on a failed rank chained to its own exception).  Otherwise returns fn's
        result, or with ``gather=True`` the list of every rank's result (which must
        then be JSON-serializable).
        """
        local_exc: BaseException | None = None
        result = None
        try:
            result = fn(*args, **kwargs)
            payload = {"ok": True, "v": result if gather else None}
            data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            local_exc = exc
            data = json.dumps({"ok": False, "e": _describe(exc)}).encode("utf-8")
            log.debug("rank %d: %s raised %s", self.rank, name, _describe(exc))
        raws = self._allgather_bytes(data, name, timeout)
        values, failures = [], {}
        for r, raw in enumerate(raws):
            ok, v = _open(raw)
            if not ok:
                failures[r] = v
            values.append(v)
        if failures:
            raise DistributedError(_failure_message(name, failures), failures) from local_exc
        return values if gather else result

    def run_on_root(self, name: str, fn: Callable[..., Any], *args: Any, root: int = 0, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``fn`` on ``root`` only and return its (JSON) result on every rank.

        If ``fn`` raises on root, every rank raises the same ``DistributedError``.
        """
        self._check_root(root, name)
        local_exc: BaseException | None = None
        data = None
        if self.rank == root:
            try:
                data = json.dumps({"ok": True, "v": fn(*args, **kwargs)}, separators=(",", ":")).encode("utf-8")
            except Exception as exc:  # noqa: BLE001
                local_exc = exc
                data = json.dumps({"ok": False, "e": _describe(exc)}).encode("utf-8")
        ok, v = _open(self._broadcast_bytes(data, root, name, timeout))
        if not ok:
            failures = {root: v}
            raise DistributedError(_failure_message(name, failures), failures) from local_exc
        return v

    def _check_root(self, root: int, name: str) -> None:
        if not isinstance(root, int) or not 0 <= root < self.size:
            raise DistributedError(f"{name}: root {root!r} is not a rank of this {self.size}-rank communicator")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleComm(Communicator):
    """One process: rank 0 of 1.  Collectives are the identity (values still round-trip through JSON)."""

    def __init__(self) -> None:
        self.rank = 0
        self.size = 1

    def barrier(self, name: str, *, timeout: float | None = None) -> None:
        log.debug("barrier %r (single process)", name)

    def _allgather_bytes(self, data: bytes, name: str, timeout: float | None) -> list[bytes]:
        return [data]

    def _broadcast_bytes(self, data: bytes | None, root: int, name: str, timeout: float | None) -> bytes:
        assert data is not None
        return data


# ----------------------------------------------------------------------------------------
# MPI


_TAG_ARRIVE = 0x7D1
_TAG_REPLY = 0x7D2
_hook_lock = threading.Lock()


def _where(header: dict) -> str:
    return f"{header.get('kind')} {header.get('name')!r} (#{header.get('seq')})"


_hook_installed = False


def _install_abort_hook(MPI: Any) -> None:
    """On an uncaught exception: print it as usual, then ``MPI.COMM_WORLD.Abort(1)``."""
    global _hook_installed
    with _hook_lock:
        if _hook_installed or os.environ.get(ENV_NO_ABORT, "") not in ("", "0"):
            return
        previous = sys.excepthook

        def _abort_hook(tp, value, tb):  # pragma: no cover - the process dies here
            try:
                previous(tp, value, tb)
            finally:
                try:
                    rank = MPI.COMM_WORLD.Get_rank()
                    sys.stderr.write(
                        f"distckpt: uncaught {tp.__name__} on MPI rank {rank}; aborting the MPI job so that "
                        f"the other ranks do not hang ({ENV_NO_ABORT}=1 disables this)\n"
                    )
                    sys.stdout.flush()
                    sys.stderr.flush()
                except Exception:  # noqa: BLE001
                    pass
                MPI.COMM_WORLD.Abort(1)

        sys.excepthook = _abort_hook
        _hook_installed = True


class MPIComm(Communicator):
    """Collectives over mpi4py, each with a deadline.  See the module docstring for the protocol.

    ``comm`` is an mpi4py communicator (default ``MPI.COMM_WORLD``); distckpt
    works on a private duplicate of it, made (nonblockingly, with the same
    deadline) at the first collective, so constructing an ``MPIComm`` is local.
    ``timeout`` is the default deadline in seconds (``None``: from
    ``$DISTCKPT_COMM_TIMEOUT``, else 600; ``0``: none); each collective may
    override it.  With ``abort_on_exception`` (default) an uncaught exception on
    this rank aborts the MPI job (see :func:`_install_abort_hook`).
    """

    #: How much longer non-root ranks wait than rank 0, so that rank 0's verdict reaches them first.
    GRACE = 10.0

    def __init__(self, comm: Any = None, *, timeout: float | None = None, abort_on_exception: bool = True) -> None:
        MPI = require("mpi4py.MPI", "mpi")
        self._MPI = MPI
        self._base = MPI.COMM_WORLD if comm is None else comm
        self.rank = self._base.Get_rank()
        self.size = self._base.Get_size()
        self._timeout = comm_timeout(timeout)
        self._comm: Any = None  # private duplicate, made at the first collective
        self._seq = 0
        self._broken: str | None = None
        self._lock = threading.RLock()
        if abort_on_exception and self.size > 1:
            _install_abort_hook(MPI)

    # -- helpers ---------------------------------------------------------------------
    def _deadline(self, timeout: float | None, extra: float = 0.0) -> float | None:
        t = self._timeout if timeout is None else comm_timeout(timeout)
        return None if t is None else time.monotonic() + t + extra

    def _budget(self, timeout: float | None) -> str:
        t = self._timeout if timeout is None else comm_timeout(timeout)
        return "no deadline" if t is None else f"{t:g} s"

    @staticmethod
    def _poll(test: Callable[[], bool], deadline: float | None) -> bool:
        """Call ``test()`` until it is true (→ True) or the deadline passes (→ False)."""
        delay = 5e-5
        while not test():
            if deadline is not None and time.monotonic() >= deadline:
                return test()
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
        return True

    def _fail(self, message: str, failures: dict[int, str] | None = None) -> DistributedError:
        self._broken = message
        log.debug("rank %d: %s", self.rank, message)
        return DistributedError(message, failures)

    def _ensure_private_comm(self, name: str, timeout: float | None) -> None:
        if self._comm is not None:
            return
        if self.size == 1:
            self._comm = self._base
            return
        newcomm, req = self._base.Idup()
        if not self._poll(req.Test, self._deadline(timeout)):
            raise self._fail(
                f"collective {name!r} timed out after {self._budget(timeout)} on rank {self.rank} while setting up "
                f"distckpt's communicator: some rank never reached its first distckpt collective"
            )
        self._comm = newcomm

    def _arrive(self, name: str, kind: str, timeout: float | None) -> None:
        """Step 1: everyone reports to rank 0, which checks and answers; raises on every arrived rank."""
        if self._broken is not None:
            raise DistributedError(
                f"collective {name!r}: this communicator is unusable after an earlier failure ({self._broken})"
            )
        self._ensure_private_comm(name, timeout)
        seq = self._seq
        self._seq += 1
        log.debug("rank %d: collective %r (#%d) start", self.rank, name, seq)
        if self.size == 1:
            return
        MPI, comm = self._MPI, self._comm
        status = MPI.Status()

        def recv_from(source: int, tag: int) -> dict:
            n = status.Get_count(MPI.BYTE)
            buf = bytearray(n)
            comm.Recv([buf, MPI.BYTE], source=source, tag=tag)
            return json.loads(buf.decode("utf-8"))

        if self.rank == 0:
            deadline = self._deadline(timeout)
            arrived: dict[int, dict] = {}

            def all_arrived() -> bool:
                while comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_ARRIVE, status=status):
                    src = status.Get_source()
                    arrived[src] = recv_from(src, _TAG_ARRIVE)
                return len(arrived) == self.size - 1

            self._poll(all_arrived, deadline)
            missing = [r for r in range(1, self.size) if r not in arrived]
            error = None
            failures: dict[int, str] = {}
            if missing:
                failures = {r: f"did not arrive at {name!r} within {self._budget(timeout)}" for r in missing}
                error = (
                    f"collective {name!r} (#{seq}) timed out after {self._budget(timeout)}: rank(s) "
                    f"{format_ranks(missing)} did not arrive (crashed, hung, or still busy in an earlier phase; "
                    f"if they are just slow, raise {ENV_TIMEOUT})"
                )
            else:
                me = {"seq": seq, "name": name[:500], "kind": kind}
                odd = {r: h for r, h in arrived.items() if h != me}
                if odd:
                    where = "; ".join(f"rank {r} is in {_where(h)}" for r, h in sorted(odd.items()))
                    failures = {r: f"in {_where(h)}" for r, h in odd.items()}
                    error = (
                        f"collective mismatch: rank 0 is in {_where(me)} but {where}; every rank must call the "
                        f"same collectives in the same order (wrap each phase in Communicator.run)"
                    )
            reply = json.dumps({"ok": error is None, "e": error, "f": {str(k): v for k, v in failures.items()}}).encode()
            reqs = [comm.Isend([reply, MPI.BYTE], dest=r, tag=_TAG_REPLY) for r in sorted(arrived)]
            self._poll(lambda: MPI.Request.Testall(reqs), time.monotonic() + self.GRACE)
            if error is not None:
                raise self._fail(error, failures)
        else:
            header = json.dumps({"seq": seq, "name": name[:500], "kind": kind}).encode()
            sreq = comm.Isend([header, MPI.BYTE], dest=0, tag=_TAG_ARRIVE)
            got = self._poll(
                lambda: bool(comm.Iprobe(source=0, tag=_TAG_REPLY, status=status)),
                self._deadline(timeout, extra=self.GRACE),
            )
            if not got:
                raise self._fail(
                    f"collective {name!r} (#{seq}) timed out after {self._budget(timeout)} on rank {self.rank}: "
                    f"rank 0 (the coordinator) never answered, so rank 0 itself did not arrive (crashed, hung or "
                    f"busy) or could not report which ranks did not"
                )
            verdict = recv_from(0, _TAG_REPLY)
            self._poll(sreq.Test, time.monotonic() + self.GRACE)
            if not verdict["ok"]:
                raise self._fail(verdict["e"], {int(k): v for k, v in verdict["f"].items()})

    def _wait_data(self, req: Any, name: str, timeout: float | None) -> None:
        if not self._poll(req.Test, self._deadline(timeout)):
            raise self._fail(
                f"collective {name!r} timed out after {self._budget(timeout)} on rank {self.rank} while exchanging "
                f"data, after every rank had arrived (a rank probably died)"
            )

    # -- primitives ------------------------------------------------------------------
    def barrier(self, name: str, *, timeout: float | None = None) -> None:
        with self._lock:
            self._arrive(name, "barrier", timeout)

    def _allgather_bytes(self, data: bytes, name: str, timeout: float | None) -> list[bytes]:
        with self._lock:
            self._arrive(name, "allgather", timeout)
            if self.size == 1:
                return [bytes(data)]
            MPI, comm = self._MPI, self._comm
            lengths = bytearray(8 * self.size)
            self._wait_data(comm.Iallgather([struct.pack("<q", len(data)), MPI.BYTE], [lengths, MPI.BYTE]), name, timeout)
            counts = list(struct.unpack(f"<{self.size}q", lengths))
            total = sum(counts)
            if total > 2**31 - 1:  # same verdict on every rank
                raise DistributedError(
                    f"allgather {name!r}: {total} bytes in all is too much for one collective (limit 2 GiB); "
                    f"exchange less metadata"
                )
            displs = [0] * self.size
            for i in range(1, self.size):
                displs[i] = displs[i - 1] + counts[i - 1]
            out = bytearray(max(total, 1))
            self._wait_data(comm.Iallgatherv([data, MPI.BYTE], [out, (counts, displs), MPI.BYTE]), name, timeout)
            return [bytes(out[d : d + c]) for d, c in zip(displs, counts)]

    def _broadcast_bytes(self, data: bytes | None, root: int, name: str, timeout: float | None) -> bytes:
        with self._lock:
            self._arrive(name, f"broadcast from rank {root}", timeout)
            if self.size == 1:
                assert data is not None
                return bytes(data)
            MPI, comm = self._MPI, self._comm
            head = bytearray(struct.pack("<q", len(data) if self.rank == root and data is not None else 0))
            self._wait_data(comm.Ibcast([head, MPI.BYTE], root=root), name, timeout)
            (n,) = struct.unpack("<q", head)
            buf = bytearray(data) if self.rank == root and data is not None else bytearray(n)
            self._wait_data(comm.Ibcast([buf, MPI.BYTE], root=root), name, timeout)
            return bytes(buf)


# ----------------------------------------------------------------------------------------
# MindSpore


def _mindspore_initialised() -> bool:
    """True if mindspore is imported *and* ``mindspore.communication.init()`` has run (never imports it)."""
    if "mindspore" not in sys.modules:
        return False
    try:
        from mindspore.communication._comm_helper import GlobalComm  # type: ignore

        return bool(GlobalComm.INITED)
    except Exception:  # noqa: BLE001
        return False


class MindSporeComm(Communicator):
    """Collectives over ``mindspore.communication`` (msrun jobs, or mpirun with ``launch/mpirun.sh --ms-scheduler``).

    Requires ``mindspore.communication.init()`` to have been called.  Bytes travel
    as ``int32`` tensors (padded to the longest payload) through the
    ``ops.AllGather`` primitive, which has kernels on CPU (mccl, dynamic
    cluster), GPU (nccl) and Ascend (hccl); broadcast and barrier are built on
    it.  (The newer ``comm_func`` / ``ops.communication`` functions have no CPU
    kernel in mindspore 2.9: "InnerCommAllGather unregistered".)
    Limits: no deadline of ours — MindSpore's collectives block until their own
    timeouts (e.g. ``HCCL_EXEC_TIMEOUT``) — and no abort hook; prefer
    :class:`MPIComm` when the job runs under mpirun.
    """

    def __init__(self, group: str | None = None) -> None:
        require("mindspore", "mindspore")
        from mindspore.communication import GlobalComm, get_group_size, get_rank

        if not _mindspore_initialised():
            raise DistributedError(
                "mindspore.communication is not initialised: call mindspore.communication.init() first "
                "(under msrun, or mpirun with launch/mpirun.sh --ms-scheduler)"
            )
        self._group = group or GlobalComm.WORLD_COMM_GROUP
        self.rank = int(get_rank(self._group))
        self.size = int(get_group_size(self._group))
        self._op: Any = None

    def _gather_int32(self, arr):
        """AllGather a 1-D int32 array of equal length on every rank → (size, n) numpy array."""
        import numpy as np
        from mindspore import Tensor, ops

        if self._op is None:
            self._op = ops.AllGather(group=self._group)
        out = self._op(Tensor(np.ascontiguousarray(arr, dtype=np.int32)))
        return np.asarray(out.asnumpy()).reshape(self.size, -1)

    def barrier(self, name: str, *, timeout: float | None = None) -> None:
        import numpy as np

        log.debug("rank %d: mindspore barrier %r", self.rank, name)
        if self.size > 1:
            self._gather_int32(np.zeros(1, dtype=np.int32))

    def _allgather_bytes(self, data: bytes, name: str, timeout: float | None) -> list[bytes]:
        import numpy as np

        log.debug("rank %d: mindspore allgather %r", self.rank, name)
        if self.size == 1:
            return [bytes(data)]
        lengths = self._gather_int32(np.array([len(data)], dtype=np.int32))[:, 0]
        width = max(4, -(-int(lengths.max()) // 4) * 4)
        padded = np.zeros(width, dtype=np.uint8)
        padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = self._gather_int32(padded.view(np.int32)).view(np.uint8)
        return [rows[r, : int(lengths[r])].tobytes() for r in range(self.size)]

    def _broadcast_bytes(self, data: bytes | None, root: int, name: str, timeout: float | None) -> bytes:
        # Built on allgather: the payloads are small and this needs one primitive only.
        parts = self._allgather_bytes(data if self.rank == root and data is not None else b"", name, timeout)
        return parts[root]


# ----------------------------------------------------------------------------------------
# selection

_auto_lock = threading.Lock()
_auto_comm: Communicator | None = None


def _under_mpirun() -> bool | None:
    """True/False from mpirun's environment; None when no MPI launcher is visible."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        raw = os.environ.get(var)
        if raw:
            try:
                return int(raw) > 1
            except ValueError:
                return True
    if os.environ.get("PMIX_RANK") is not None:
        return True
    return None


def _detect() -> Communicator:
    forced = os.environ.get(ENV_COMM, "").strip().lower()
    if forced in ("single", "none"):
        return SingleComm()
    if forced == "mpi":
        return MPIComm()
    if forced == "mindspore":
        return MindSporeComm()
    if forced:
        raise DistributedError(f"{ENV_COMM}={forced!r}: expected single, mpi or mindspore")
    if _under_mpirun():
        return MPIComm()
    if _mindspore_initialised():
        return MindSporeComm()
    return SingleComm()


def get_comm(comm: Any = None) -> Communicator:
    """The communicator to use.

    ``comm`` may be a :class:`Communicator` (returned as is) or an mpi4py
    communicator (wrapped in :class:`MPIComm`).  With ``None``: ``$DISTCKPT_COMM``
    if set (``single``, ``mpi``, ``mindspore``); else ``MPIComm`` when mpirun's
    environment shows more than one rank (mpi4py is imported only then); else
    ``MindSporeComm`` when ``mindspore.communication`` is initialised; else
    ``SingleComm``.  The auto-detected communicator is cached per process
    (:func:`reset_comm` forgets it).
    """
    global _auto_comm
    if isinstance(comm, Communicator):
        return comm
    if comm is not None:
        if hasattr(comm, "Get_rank") and hasattr(comm, "Get_size") and hasattr(comm, "Idup"):
            return MPIComm(comm)
        raise DistributedError(
            f"comm must be a distckpt Communicator or an mpi4py communicator, not {type(comm).__name__}"
        )
    with _auto_lock:
        if _auto_comm is None:
            _auto_comm = _detect()
            log.debug("auto-detected %r", _auto_comm)
        return _auto_comm


def reset_comm() -> None:
    """Forget the cached auto-detected communicator (tests; after mindspore.communication.init())."""
    global _auto_comm
    with _auto_lock:
        _auto_comm = None
