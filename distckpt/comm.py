"""Communicators: how the ranks of one job talk to each other.

Who calls what
--------------
``api.py`` (save/load/finalize), ``manager.py`` and the MindSpore adapter get a
communicator from :func:`get_comm` and call its named collectives on every rank,
in the same order.  Each phase of a protocol runs inside :meth:`Communicator.run`
(or reports its local error to :meth:`Communicator.agree`), so one rank's failure
raises the same :class:`~distckpt.errors.DistributedError` on every rank::

    comm = get_comm()
    plan = comm.run("save.plan", make_local_plan)                  # 1) all ranks; agree on errors
    comm.run("save.write", write_my_chunks, plan)                   # 2) all ranks
    reports = comm.gather_bytes(my_report, "save.reports")          # 3) to rank 0 only
    comm.run_on_root("save.commit", lambda: commit(reports))        # 4) rank 0; result/error to all
    comm.exchange(sends, recvs, "load.share")                       # cooperative load: raw buffers

==================  ==========================================================
``SingleComm``      one process (rank 0 of 1); every collective is the
                    identity.  The CLI and most tests use it.
``MPIComm``         mpi4py under ``mpirun``; every wait has a deadline
                    (``DISTCKPT_COMM_TIMEOUT`` seconds, default 600).
``MindSporeComm``   ``mindspore.communication`` after ``init()`` (msrun jobs),
                    in :mod:`distckpt.mindspore.comm`, loaded lazily through
                    ``COMM_REGISTRY``; no deadline of ours, no ``exchange``.
``ThreadComm``      ranks as threads of one process (:mod:`distckpt.testing`).
==================  ==========================================================

``get_comm()`` picks one: an explicit communicator wins, then ``mpirun``'s
environment (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``, ``PMIX_RANK``), then an
initialised ``mindspore.communication``, else ``SingleComm``.  The choice can
be forced with ``DISTCKPT_COMM=single|mpi|mindspore``.

Primitives
----------
=========================================  ==================================================
``barrier(name)``                          every rank arrived
``agree(name, error)``                     raise the same ``DistributedError`` everywhere if
                                           any rank passed an error; else return
``run(name, fn, gather=False|True|"root")``  ``fn`` on every rank, then ``agree``; ``True``:
                                           every result everywhere; ``"root"``: on root only
``run_on_root(name, fn)``                  ``fn`` on root; its result (or error) everywhere
``gather(obj, name)`` / ``gather_bytes``   JSON values / raw bytes to root (None elsewhere)
``broadcast(obj)`` / ``allgather(obj)``    root's value everywhere / every value everywhere
``gather_errors(name, error)``             ``{rank: message}`` of failed ranks, everywhere
``exchange(sends, recvs, name)``           point-to-point raw buffers (cooperative loads)
=========================================  ==================================================

Only JSON crosses ranks in the value collectives (never pickle); ``gather_bytes``
and ``exchange`` move raw bytes (numpy arrays of any dtype, bf16 included, go
straight from and to the caller's memory in ``exchange``).  A value that is not
JSON-serializable on one rank does not desynchronise the job: every rank raises.

Every collective is one *header* round, then data rounds only if needed
-----------------------------------------------------------------------
The header is one small reduction (elementwise MAX of 38 uint64 words: sequence
number and a hash of kind/name/root, each also negated so MAX yields the minimum
too, an error flag, the largest payload size, and up to 256 bytes of a
broadcast's payload, which only root fills).  From that one round every rank
knows whether all ranks are in the same collective (else "collective mismatch",
naming who is where), whether any rank failed (then, on the failure path only,
the messages are gathered to root and its verdict broadcast), and the payload
size, so:

* ``barrier``, ``agree``, ``run`` and small ``broadcast``/``run_on_root``: 1 round;
* ``gather``/``gather_bytes``/``run(gather="root")`` of at most 4 KiB per rank:
  2 rounds (fixed slots), larger: 3 (the lengths go to root, then ``Gatherv``);
* ``exchange``: header, the point-to-point transfers, a closing header (so a
  short message is reported the same on every rank).

Traffic per rank is O(its own data) except at the root of a gather (O(sum)),
and in the legacy ``allgather``/``run(gather=True)`` (O(sum) everywhere by
definition).  There is no arrival handshake: a rank's arrival *is* its header.

How an MPI rank waits (no sleep-polling)
----------------------------------------
MPI requests are completed by a blocking ``MPI_Waitsome`` on the data requests
plus two always-posted receives: a *wake* receive on a private ``COMM_SELF``
duplicate, which a per-communicator watchdog thread (a ``threading.Condition``
with a timeout, re-armed without waking it as deadlines only move forward)
satisfies with a self-send when the deadline passes, and a *notice* receive
(ANY_SOURCE) through which peers report "I am leaving" (BYE), root reports a
verdict (FAIL) or asks "where are you?" (CENSUS).  A wait ends within
microseconds of the event that ends it.  This needs ``MPI_THREAD_MULTIPLE``
(mpi4py's default).

``DISTCKPT_COMM_WAIT`` picks how an MPI rank waits: ``block`` (as above), ``hybrid``
(block for the first 10 ms, then test the requests, sleeping 2 % of the time
waited so far between tests, 50 µs to 2 ms), ``poll`` (that from the start; also
the fallback without ``MPI_THREAD_MULTIPLE``), or ``auto`` (the default):
``hybrid`` when the launcher puts more ranks on the node than it has CPUs,
else ``block``.  Why: Open MPI's blocking wait spins (yielding when
oversubscribed), which costs nothing when every rank has a core, but on an
oversubscribed host a rank waiting for others' I/O takes CPU from them.
Measured with ``tests/mpi_scripts/comm_bench.py`` (``mpirun -n 4
--oversubscribe`` on 2 cores shared with other jobs, load average 9-18, every
implementation interleaved in the same job; medians over 6 jobs, 4 for the last
two rows; old = the previous arrival-handshake design, polling with sleeps of
up to 5 ms):

=======================================  =======  =======  =======  =======
                                         block    hybrid   poll     old
=======================================  =======  =======  =======  =======
one ``run`` round                        0.56 ms  0.59 ms  1.2 ms   3.0 ms
one gather + one small broadcast         6.8 ms   5.5 ms   3.2 ms   13.6 ms
100 ``run`` rounds                       0.25 s   0.12 s   0.14 s   0.47 s
workers' time while rank 0 waits, vs     +17 %    +5 %     -1 %     -2 %
while it sleeps (3 ranks, ~1 s of work)
rank 0 back after the last worker        3.1 ms   6.9 ms   6.5 ms   9.2 ms
=======================================  =======  =======  =======  =======

Rounds are 2-5x faster than the old design's in every mode.  Blocking is the
fastest to react but, on an oversubscribed host, takes a sixth of the CPU of
the ranks it waits for; ``hybrid`` keeps the blocking speed for the short waits
of ranks in step and gives the CPU back during long ones, so it is the best
overall there, and ``block`` wherever each rank has a core.

Deadlines and the same error everywhere
---------------------------------------
Each collective has a deadline (``DISTCKPT_COMM_TIMEOUT``, default 600 s;
``timeout=`` overrides it per call).  When root's wait expires it takes a
*census*: it asks every rank (a CENSUS notice, answered from inside any wait)
where it is, waits up to 1 s for the answers, and sends every rank the same
verdict, e.g. "collective 'save.commit' (#7) timed out after 600 s: rank(s) 2
did not arrive (...)", naming ranks that did not answer, ranks that exited and
ranks that are in another collective.  Non-root ranks wait 5 s longer than
root so the verdict reaches them first; if root itself is missing they raise
"rank 0 (the coordinator) did not report ...".  A rank that arrives late finds
the verdict waiting and raises it at once; a rank still finishing an earlier
collective (which every rank completed) finishes it first and raises the
verdict in the collective it names.  A rank that leaves the job
(a non-zero exit, or a failure of its own) sends BYE, so the collectives it
will never join fail at once instead of at the deadline.  After a timeout,
a mismatch or a peer's departure the communicator is broken: every later
collective on it raises at once.

Exiting never hangs (``mpirun`` jobs)
-------------------------------------
Why ``MPI_Finalize`` hung: Open MPI's finalize starts with a PMIx fence over
every process of the job, so a rank that exits while a peer is stuck (asleep,
or waiting in a collective that will never complete) waits in that fence
forever; and mpirun tears a job down only when some process *exits*
abnormally, which a process stuck in the fence never does.

So the first ``MPIComm`` with more than one rank records the process's exit
status (``sys.exit``/``exit``/``quit`` are wrapped to record their argument,
uncaught exceptions record 1, and for 2 minutes after the communicator breaks a
trace hook on the outermost frame sees ``raise SystemExit(n)`` too) and registers an
``atexit`` hook.  Python runs ``atexit`` hooks before mpi4py's own finalize
(a C-level ``Py_AtExit`` hook, the very last thing).  The hook:

1. sends BYE if this process exits with a non-zero status or after a failure,
   so peers still waiting for it fail at once instead of at the deadline;
2. takes part in an *exit vote*, a MAX-reduction of "I exit with a non-zero
   status" on a communicator of its own, waited for at most 2 s;
3. vote complete and 0 (every rank is at exit, all with status 0): MPI_Finalize
   cannot hang, so mpi4py finalizes as usual (after a failure the hook runs it
   itself, on a helper thread, for at most 5 s);
4. vote complete and 1, or incomplete while this rank failed or exits non-zero:
   ``os._exit(status)`` (the other ``atexit`` hooks ran and every open Python
   file object was flushed before the vote): no ``MPI_Finalize``, so no fence to hang in (nor
   the rest of the interpreter's teardown: ``__del__`` methods and ``weakref``
   finalizers of live objects do not run on this path).  Every live rank learned
   the outcome from the same vote, so they all leave within milliseconds, each
   with its own status, before mpirun (which kills the rest of a job about
   0.25 s after the first abnormal exit) notices; a rank stuck for good is
   killed by mpirun;
5. vote incomplete and this rank healthy with status 0: mpi4py finalizes as MPI
   prescribes (waiting for the others).

The ``sys.excepthook`` abort stays: an uncaught exception on any rank prints
the traceback and calls ``MPI_Abort``, so mpirun ends the whole job at once
(the process never reaches the ``atexit`` hook; the other ranks are killed by
mpirun and do not choose their status).  ``DISTCKPT_NO_ABORT=1`` disables it;
the failing rank then exits with status 1 through the hook above, and its BYE
makes the others' pending collective fail at once, naming it.

Collectives must be called from one thread at a time per rank (a lock
serialises them).  Debug logs (logger ``distckpt.comm``) name every collective.
"""

from __future__ import annotations

import abc
import array
import atexit
import builtins
import contextlib
import hashlib
import importlib
import itertools
import json
import logging
import os
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError, DistributedError, require

__all__ = [
    "Communicator",
    "SingleComm",
    "MPIComm",
    "get_comm",
    "reset_comm",
    "comm_timeout",
    "format_ranks",
    "DEFAULT_TIMEOUT",
    "EXCHANGE_CHUNK",
    "COMM_REGISTRY",
]

log = logging.getLogger("distckpt.comm")

#: Default deadline of a collective, in seconds (env ``DISTCKPT_COMM_TIMEOUT``).
DEFAULT_TIMEOUT = 600.0
ENV_TIMEOUT = "DISTCKPT_COMM_TIMEOUT"
ENV_COMM = "DISTCKPT_COMM"
ENV_NO_ABORT = "DISTCKPT_NO_ABORT"
ENV_WAIT = "DISTCKPT_COMM_WAIT"

#: ``exchange`` cuts buffers larger than this into pieces (both sides alike).
EXCHANGE_CHUNK = 1 << 30

#: Communicators outside the core, loaded only when selected: name -> "module:Class".
COMM_REGISTRY = {"mindspore": "distckpt.mindspore.comm:MindSporeComm"}

#: Longest per-rank error message kept in a DistributedError.
_MAX_MESSAGE = 2000
#: At most this many distinct messages are spelled out in one DistributedError's text.
_MAX_GROUPS = 16
#: Bytes of a broadcast that ride inside the header round.
_INLINE = 256
#: Gathers whose largest part is at most this many bytes use fixed slots (one data round).
_SMALL = 4096
#: Upper bound of one rank's failure record on the wire (UTF-8 of a truncated message).
_FAIL_BOUND = 4 * _MAX_MESSAGE + 16
_MPI_LIMIT = 2**31 - 1
_M64 = 2**64 - 1
_HEAD = 6 + _INLINE // 8
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
    """``"save failed on rank(s) 1, 3: rank 1: ValueError: a; rank 3: ValueError: b"`` (equal messages grouped)."""
    groups: dict[str, list[int]] = {}
    for r in sorted(failures):
        groups.setdefault(failures[r], []).append(r)
    parts = []
    for msg, ranks in list(groups.items())[:_MAX_GROUPS]:
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {format_ranks(ranks)}"
        parts.append(f"{who}: {msg}")
    hidden = sum(len(r) for r in list(groups.values())[_MAX_GROUPS:])
    if hidden:
        parts.append(f"and {hidden} more rank(s) with other errors (see .failures)")
    return f"{name} failed on rank(s) {format_ranks(failures)}: " + "; ".join(parts)


def _encode(obj: Any) -> tuple[bytes, str | None]:
    """JSON bytes of ``obj``, or ``(b"", message)``; never raises (an encoding error travels as an error)."""
    try:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8"), None
    except (TypeError, ValueError, RecursionError) as exc:
        return b"", _describe(exc)


def _tag(kind: str, name: str, root: int) -> int:
    digest = hashlib.blake2b(f"{kind}\0{name}\0{root}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _where(h: dict) -> str:
    root = f" from rank {h.get('root')}" if h.get("root") else ""
    return f"{h.get('kind')} {h.get('name')!r}{root} (#{h.get('seq')})"


def _byte_view(buf: Any, *, writable: bool, what: str) -> memoryview:
    """A flat unsigned-byte view of ``buf`` (numpy array of any dtype, bytes, bytearray, memoryview); no copy."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError(f"{what} is a non-contiguous numpy array; pass np.ascontiguousarray(...)")
        if writable and not buf.flags.writeable:
            raise ValueError(f"{what} is a read-only numpy array")
        return memoryview(buf.reshape(-1).view(np.uint8))
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"{what} must be a numpy array, bytes, bytearray or memoryview, not {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise ValueError(f"{what} is not a contiguous buffer")
    if writable and mv.readonly:
        raise ValueError(f"{what} is read-only")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _pieces(n: int, chunk: int) -> list[tuple[int, int]]:
    """Byte ranges a buffer of ``n`` bytes is cut into (one empty piece for an empty buffer)."""
    if n == 0:
        return [(0, 0)]
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


@dataclass(frozen=True)
class _Op:
    """One collective call on one rank."""

    seq: int
    kind: str
    name: str
    root: int
    timeout: float | None
    start: float

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.start + self.timeout

    @property
    def budget(self) -> str:
        return "no deadline" if self.timeout is None else f"{self.timeout:g} s"

    def head(self) -> dict:
        return {"seq": self.seq, "kind": self.kind, "name": self.name[:200], "root": self.root}


@dataclass(frozen=True)
class _Agreed:
    """What one header round told every rank."""

    failed: bool
    size: int
    inline: bytes


@dataclass(frozen=True)
class _Transfers:
    """A validated ``exchange`` request: ``(peer, flat byte view)`` lists."""

    sends: list
    recvs: list

    @classmethod
    def of(cls, sends: Sequence, recvs: Sequence, size: int) -> _Transfers:
        out: dict[str, list] = {"sends": [], "recvs": []}
        for key, items, writable in (("sends", sends, False), ("recvs", recvs, True)):
            for i, item in enumerate(items):
                try:
                    peer, buf = item
                except (TypeError, ValueError):
                    raise ValueError(f"{key}[{i}] must be a (rank, buffer) pair") from None
                if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < size:
                    raise ValueError(f"{key}[{i}]: {peer!r} is not a rank of this {size}-rank communicator")
                out[key].append((peer, _byte_view(buf, writable=writable, what=f"{key}[{i}] buffer")))
        return cls(out["sends"], out["recvs"])

    @property
    def nbytes(self) -> int:
        return sum(len(v) for _, v in self.sends)


class Communicator(abc.ABC):
    """A group of ranks and the few named collectives distckpt needs.

    Every rank must call the same collectives, with the same names, in the same
    order.  Values exchanged must be JSON-serializable; they come back as JSON
    gives them (lists for tuples, str keys).  Implementations provide the
    ``_t_*`` transports; the protocol (headers, failure paths, messages) lives here.
    """

    #: This process's rank, ``0 <= rank < size``.
    rank: int
    #: Number of ranks.
    size: int
    #: Whether :meth:`exchange` works on this communicator.
    can_exchange: bool = True
    #: Largest piece ``exchange`` sends as one message.
    exchange_chunk: int = EXCHANGE_CHUNK

    def __init__(self) -> None:
        self._seq = 0
        self._broken: str | None = None
        #: A verdict about a collective this rank had not reached when it arrived (raised by that collective).
        self._verdict: DistributedError | None = None
        self._open: _Op | None = None
        self._lock = threading.RLock()
        #: ``collectives`` called and ``bytes_sent`` handed to the transport by this rank.
        self.stats = {"collectives": 0, "bytes_sent": 0}

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- transports (each implementation) ---------------------------------------------
    @abc.abstractmethod
    def _t_allgather(self, data: bytes | memoryview, op: _Op, maxsize: int) -> list[bytes]:
        """Every rank's ``data`` (each at most ``maxsize`` bytes), indexed by rank."""

    def _t_header(self, words: list[int], op: _Op) -> list[int]:
        """Elementwise MAX of every rank's ``words`` (uint64)."""
        fmt = f"<{len(words)}Q"
        rows = [struct.unpack(fmt, raw) for raw in self._t_allgather(struct.pack(fmt, *words), op, 8 * len(words))]
        return [max(col) for col in zip(*rows)]

    def _t_gather(self, data: bytes | memoryview, op: _Op, root: int, maxsize: int) -> list[bytes] | None:
        """Every rank's ``data`` on ``root`` (None elsewhere)."""
        parts = self._t_allgather(data, op, maxsize)
        return parts if self.rank == root else None

    def _t_bcast(self, data: bytes | memoryview | None, op: _Op, root: int, size: int) -> bytes:
        """Root's ``data`` (``size`` bytes, known to every rank) on every rank."""
        return bytes(self._t_allgather(data if self.rank == root and data is not None else b"", op, size)[root])

    def _t_exchange(self, plan: _Transfers, op: _Op, chunk: int) -> str | None:
        """Run the transfers; return a problem found locally (e.g. a short message) or None."""
        raise DistributedError(f"exchange {op.name!r}: {type(self).__name__} cannot move raw buffers")

    def _precheck(self, op: _Op) -> None:
        """Raise before ``op`` starts if it can never complete (a peer already left)."""
        return None

    def _timeout_value(self) -> float | None:
        return comm_timeout()

    def _break(self, message: str, failures: dict[int, str] | None = None, **_: Any) -> DistributedError:
        """Mark this communicator unusable and return the error to raise."""
        self._broken = message
        log.debug("rank %d: %s", self.rank, message)
        return DistributedError(message, failures)

    # -- protocol -------------------------------------------------------------------
    def _begin(self, kind: str, name: str, root: int, timeout: float | None) -> _Op:
        if self._verdict is not None:
            verdict, self._verdict = self._verdict, None
            self._seq += 1
            raise verdict
        if self._broken is not None:
            raise DistributedError(
                f"collective {name!r}: this communicator is unusable after an earlier failure ({self._broken})"
            )
        t = self._timeout_value() if timeout is None else comm_timeout(timeout)
        op = _Op(self._seq, kind, name, root, t, time.monotonic())
        self._seq += 1
        self.stats["collectives"] += 1
        log.debug("rank %d: %s %r (#%d)", self.rank, kind, name, op.seq)
        self._precheck(op)
        return op

    @contextlib.contextmanager
    def _collective(self, kind: str, name: str, root: int, timeout: float | None) -> Iterator[_Op]:
        """One collective call: serialised, and marked open until it completes or fails on every rank.

        A rank that leaves while a collective is open (``SystemExit`` from inside
        it) has not completed it, which :meth:`_done` tells the others.
        """
        with self._lock:
            op = self._begin(kind, name, root, timeout)
            self._open = op
            try:
                yield op
            except DistributedError:
                self._open = None
                raise
            self._open = None

    def _done(self) -> int:
        """How many collectives this rank completed (the others may need every later one from it)."""
        if self._open is not None:
            return self._open.seq
        return self._seq - 1 if self._broken is not None else self._seq

    def _agreement(self, op: _Op, failed: bool, size: int, inline: bytes = b"") -> _Agreed:
        """The header round: check that every rank is in ``op``, OR the failure flags, MAX the sizes."""
        tag = _tag(op.kind, op.name, op.root)
        words = [op.seq, _M64 - op.seq, tag, _M64 - tag, int(failed), size]
        words += struct.unpack(f"<{_INLINE // 8}Q", inline.ljust(_INLINE, b"\0"))
        self.stats["bytes_sent"] += 8 * len(words)
        out = self._t_header(words, op)
        if out[0] != _M64 - out[1] or out[2] != _M64 - out[3]:
            raise self._mismatch(op)
        got = out[5]
        inline_out = struct.pack(f"<{_INLINE // 8}Q", *out[6:])[:got] if got <= _INLINE else b""
        return _Agreed(bool(out[4]), got, inline_out)

    def _gather(self, data: bytes | memoryview, op: _Op, root: int, maxsize: int) -> list[bytes] | None:
        self.stats["bytes_sent"] += len(data) if maxsize > _SMALL else 8 + maxsize
        return self._t_gather(data, op, root, maxsize)

    def _bcast_any(self, data: bytes | None, op: _Op, root: int) -> bytes:
        """Broadcast bytes whose length only root knows (failure paths): the length first."""
        n = len(data) if self.rank == root and data is not None else 0
        if self.rank == root:
            self.stats["bytes_sent"] += 8 + n
        (size,) = struct.unpack("<Q", self._t_bcast(struct.pack("<Q", n), op, root, 8))
        return self._t_bcast(data, op, root, size) if size else b""

    def _mismatch(self, op: _Op) -> DistributedError:
        """Every rank saw that not all ranks are in the same collective: name who is where, same text everywhere."""
        me = json.dumps(op.head()).encode("utf-8")  # at most ~1.3 KB: names are cut to 200 characters
        heads = self._gather(me, op, 0, _SMALL)
        payload = None
        if heads is not None:
            seen = {r: json.loads(h) for r, h in enumerate(heads)}
            mine = seen[0]
            odd: dict[str, list[int]] = {}
            for r, h in seen.items():
                if h != mine:
                    odd.setdefault(json.dumps(h, sort_keys=True), []).append(r)
            where = "; ".join(
                (f"rank {rs[0]} is" if len(rs) == 1 else f"ranks {format_ranks(rs)} are") + f" in {_where(json.loads(h))}"
                for h, rs in odd.items()
            )
            message = (
                f"collective mismatch: rank 0 is in {_where(mine)} but {where}; every rank must call the same "
                f"collectives in the same order (wrap each phase in Communicator.run)"
            )
            failures = {r: f"in {_where(json.loads(h))}" for h, rs in odd.items() for r in rs}
            payload = json.dumps({"m": message, "f": failures}).encode("utf-8")
        verdict = json.loads(self._bcast_any(payload, op, 0))
        return self._break(verdict["m"], {int(k): v for k, v in verdict["f"].items()}, settled=True)

    def _collect_failures(self, op: _Op, message: str | None) -> dict[int, str]:
        """Failure path of a header: the failed ranks' messages to root, root's dict to every rank."""
        data = b"" if message is None else b"!" + _describe(message).encode("utf-8", "replace")
        parts = self._gather(data, op, 0, _FAIL_BOUND)
        payload = None
        if parts is not None:
            failures = {str(r): p[1:].decode("utf-8", "replace") for r, p in enumerate(parts) if p}
            payload = json.dumps(failures).encode("utf-8")
        return {int(k): v for k, v in json.loads(self._bcast_any(payload, op, 0)).items()}

    # -- collectives ------------------------------------------------------------------
    def barrier(self, name: str, *, timeout: float | None = None) -> None:
        """Return once every rank has called ``barrier(name)``."""
        with self._collective("barrier", name, 0, timeout) as op:
            self._agreement(op, False, 0)

    def agree(self, name: str, error: BaseException | str | None = None, *, timeout: float | None = None) -> None:
        """Raise the same :class:`DistributedError` on every rank if any rank passed an ``error``; else return.

        One tiny reduction when nobody failed; the messages are gathered (to root,
        then broadcast) only on failure.  On a failed rank the error is chained to
        its own exception.
        """
        message = None if error is None else _describe(error)
        with self._collective("agree", name, 0, timeout) as op:
            if self._agreement(op, message is not None, 0).failed:
                failures = self._collect_failures(op, message)
                raise DistributedError(_failure_message(name, failures), failures) from (
                    error if isinstance(error, BaseException) else None
                )

    def gather_errors(self, name: str, error: BaseException | str | None = None, *, timeout: float | None = None) -> dict[int, str]:
        """``{rank: "Type: message"}`` of the ranks that passed an error, on every rank (``{}`` if none).

        Does not raise for the failures themselves.
        """
        message = None if error is None else _describe(error)
        with self._collective("gather_errors", name, 0, timeout) as op:
            if not self._agreement(op, message is not None, 0).failed:
                return {}
            return self._collect_failures(op, message)

    def allgather(self, obj: Any, name: str, *, timeout: float | None = None) -> list:
        """Every rank's ``obj``, as a list indexed by rank (on every rank; O(total) bytes per rank)."""
        data, error = _encode(obj)
        with self._collective("allgather", name, 0, timeout) as op:
            ag = self._agreement(op, error is not None, len(data))
            if ag.failed:
                self._raise_failed(op, error, f"allgather {name!r} (value is not JSON-serializable)")
            self.stats["bytes_sent"] += len(data)
            return [json.loads(p) for p in self._t_allgather(data, op, ag.size)]

    def gather(self, obj: Any, name: str, *, root: int = 0, timeout: float | None = None) -> list | None:
        """Every rank's JSON ``obj`` on ``root`` as a list indexed by rank; ``None`` on the other ranks."""
        self._check_root(root, name)
        data, error = _encode(obj)
        with self._collective("gather", name, root, timeout) as op:
            ag = self._agreement(op, error is not None, len(data))
            if ag.failed:
                self._raise_failed(op, error, f"gather {name!r} (value is not JSON-serializable)")
            parts = self._gather(data, op, root, ag.size)
            return None if parts is None else [json.loads(p) for p in parts]

    def gather_bytes(self, data: Any, name: str, *, root: int = 0, timeout: float | None = None) -> list[bytes] | None:
        """Every rank's raw ``data`` (bytes-like or a contiguous numpy array) on ``root``; ``None`` elsewhere."""
        self._check_root(root, name)
        error = None
        view: memoryview | bytes = b""
        try:
            view = _byte_view(data, writable=False, what="gather_bytes data")
        except (TypeError, ValueError) as exc:
            error = _describe(exc)
        with self._collective("gather_bytes", name, root, timeout) as op:
            ag = self._agreement(op, error is not None, len(view))
            if ag.failed:
                self._raise_failed(op, error, f"gather_bytes {name!r}")
            return self._gather(view, op, root, ag.size)

    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast", *, timeout: float | None = None) -> Any:
        """Root's ``obj`` on every rank (``obj`` is ignored on the other ranks)."""
        self._check_root(root, name)
        data, error = _encode(obj) if self.rank == root else (b"", None)
        with self._collective("broadcast", name, root, timeout) as op:
            raw = self._bcast_value(op, root, data, error, f"broadcast {name!r} (value is not JSON-serializable)")
            return json.loads(raw)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, gather: bool | str = False,
            timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` on every rank; if it fails anywhere, raise everywhere.

        Any ``Exception`` from ``fn`` is caught and the outcome agreed in one
        collective named ``name``; if any rank failed every rank raises the same
        :class:`DistributedError` naming the failed ranks and their messages (on a
        failed rank chained to its own exception).  Otherwise returns fn's result;
        with ``gather=True`` the list of every rank's (JSON) result on every rank;
        with ``gather="root"`` that list on rank 0 and ``None`` elsewhere.
        """
        if gather not in (False, True, "root"):
            raise ConfigError(f"run({name!r}): gather must be False, True or 'root', not {gather!r}")
        local_exc: BaseException | None = None
        message: str | None = None
        result: Any = None
        data = b""
        try:
            result = fn(*args, **kwargs)
            if gather is not False:
                data = json.dumps(result, separators=(",", ":")).encode("utf-8")
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            local_exc, message, data = exc, _describe(exc), b""
            log.debug("rank %d: %s raised %s", self.rank, name, message)
        kind = {False: "run", True: "run.allgather", "root": "run.gather"}[gather]  # type: ignore[index]
        with self._collective(kind, name, 0, timeout) as op:
            ag = self._agreement(op, message is not None, len(data))
            if ag.failed:
                failures = self._collect_failures(op, message)
                raise DistributedError(_failure_message(name, failures), failures) from local_exc
            if gather is False:
                return result
            if gather is True:
                self.stats["bytes_sent"] += len(data)
                return [json.loads(p) for p in self._t_allgather(data, op, ag.size)]
            parts = self._gather(data, op, 0, ag.size)
            return None if parts is None else [json.loads(p) for p in parts]

    def run_on_root(self, name: str, fn: Callable[..., Any], *args: Any, root: int = 0,
                    timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``fn`` on ``root`` only and return its (JSON) result on every rank.

        If ``fn`` raises on root, every rank raises the same ``DistributedError``.
        """
        self._check_root(root, name)
        local_exc: BaseException | None = None
        data, error = b"", None
        if self.rank == root:
            try:
                data = json.dumps(fn(*args, **kwargs), separators=(",", ":")).encode("utf-8")
            except Exception as exc:  # noqa: BLE001
                local_exc, error = exc, _describe(exc)
        with self._collective("run_on_root", name, root, timeout) as op:
            try:
                raw = self._bcast_value(op, root, data, error, name)
            except DistributedError as exc:
                if local_exc is not None and self._broken is None:
                    raise exc from local_exc
                raise
            return json.loads(raw)

    def exchange(self, sends: Sequence, recvs: Sequence, name: str, *, chunk: int | None = None,
                 timeout: float | None = None) -> None:
        """Point-to-point transfers of raw buffers (cooperative loads); every rank calls it, in the same order.

        ``sends`` is a list of ``(dest_rank, buffer)``, ``recvs`` a list of
        ``(src_rank, writable buffer)``; buffers are numpy arrays (any dtype, C-contiguous),
        bytes, bytearray or memoryview, and move without a copy (never pickled).
        Messages between one pair of ranks match in posting order, and each receive
        must be exactly as long as the matching send.  Buffers longer than ``chunk``
        (default :data:`EXCHANGE_CHUNK`, 1 GiB; every rank must pass the same) travel
        in pieces.  Invalid arguments on any rank, or a message of the wrong length,
        raise the same ``DistributedError`` on every rank (a header round before and
        after the transfers).

        Contract: callers ``agree`` on their plan before exchanging, so the transfers
        themselves only fail if a process dies or hangs; then the deadline applies,
        the waiting ranks raise ``DistributedError`` (each naming the peers it still
        waits for), the communicator is broken, and a dying process's exit hook tells
        the others at once (see the module docstring).
        """
        chunk = self.exchange_chunk if chunk is None else int(chunk)
        if chunk <= 0:
            raise ConfigError(f"exchange {name!r}: chunk must be a positive number of bytes, not {chunk}")
        if not self.can_exchange:
            raise DistributedError(
                f"exchange {name!r}: {type(self).__name__} cannot move raw buffers between ranks; run under mpirun "
                f"(MPIComm) or turn cooperative loading off"
            )
        error = None
        plan = _Transfers([], [])
        try:
            plan = _Transfers.of(sends, recvs, self.size)
        except (TypeError, ValueError) as exc:
            error = _describe(exc)
        with self._collective("exchange", name, 0, timeout) as op:
            if self._agreement(op, error is not None, 0).failed:
                self._raise_failed(op, error, f"exchange {name!r}")
            self.stats["bytes_sent"] += plan.nbytes
            problem = self._t_exchange(plan, op, chunk)
            if self._agreement(op, problem is not None, 0).failed:
                self._raise_failed(op, problem, f"exchange {name!r}")

    # -- helpers ----------------------------------------------------------------------
    def _bcast_value(self, op: _Op, root: int, data: bytes, error: str | None, what: str) -> bytes:
        small = self.rank == root and len(data) <= _INLINE
        ag = self._agreement(op, error is not None, len(data) if self.rank == root else 0, data if small else b"")
        if ag.failed:
            self._raise_failed(op, error, what)
        if ag.size <= _INLINE:
            return ag.inline
        if self.rank == root:
            self.stats["bytes_sent"] += len(data)
        return self._t_bcast(data, op, root, ag.size)

    def _raise_failed(self, op: _Op, message: str | None, what: str) -> None:
        failures = self._collect_failures(op, message)
        raise DistributedError(_failure_message(what, failures), failures)

    def _check_root(self, root: int, name: str) -> None:
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.size:
            raise DistributedError(f"{name}: root {root!r} is not a rank of this {self.size}-rank communicator")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _local_exchange(plan: _Transfers, chunk: int, me: int) -> str | None:
    """Transfers of a rank to itself, matched in posting order (SingleComm)."""
    queue = [v[a:b] for peer, v in plan.sends if peer == me for a, b in _pieces(len(v), chunk)]
    problems = []
    k = 0
    for peer, view in plan.recvs:
        for a, b in _pieces(len(view), chunk):
            if k >= len(queue):
                problems.append(f"receive of {b - a} bytes from rank {peer} has no matching send")
                continue
            src = queue[k]
            k += 1
            if len(src) != b - a:
                problems.append(f"received {len(src)} bytes from rank {peer} into a {b - a}-byte piece")
                continue
            view[a:b] = src
    if k < len(queue):
        problems.append(f"{len(queue) - k} message(s) sent to rank {me} were never received")
    return "; ".join(problems) or None


class SingleComm(Communicator):
    """One process: rank 0 of 1.  Collectives are the identity (values still round-trip through JSON)."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = 0
        self.size = 1

    def _timeout_value(self) -> float | None:
        return None

    def _t_allgather(self, data: bytes | memoryview, op: _Op, maxsize: int) -> list[bytes]:
        return [bytes(data)]

    def _t_header(self, words: list[int], op: _Op) -> list[int]:
        return list(words)

    def _t_gather(self, data: bytes | memoryview, op: _Op, root: int, maxsize: int) -> list[bytes] | None:
        return [bytes(data)]

    def _t_bcast(self, data: bytes | memoryview | None, op: _Op, root: int, size: int) -> bytes:
        assert data is not None
        return bytes(data)

    def _t_exchange(self, plan: _Transfers, op: _Op, chunk: int) -> str | None:
        return _local_exchange(plan, chunk, 0)


# ----------------------------------------------------------------------------------------
# MPI

_TAG_NOTICE = 0x7D1
_TAG_VERDICT = 0x7D2
_TAG_CENSUS = 0x7D3
_TAG_WAKE = 0x7D4
_TAG_DATA = 0x7D5
#: Notice kinds: a rank leaves / root's verdict follows / root asks where you are.
_BYE, _FAIL, _CENSUS = 1, 2, 3
#: BYE status of a rank that gave up after a failure of its own (still running).
_BYE_BROKEN = -1
_CENSUS_MAX = 2048
#: Polling waits sleep 2 % of the time waited so far, within these bounds (seconds).
_POLL_MIN, _POLL_MAX, _POLL_SHARE = 5e-5, 2e-3, 0.02
#: How long the exit vote waits for the other ranks.
EXIT_GRACE = 2.0
#: How long a rank whose communicator broke lets MPI_Finalize run once every rank voted to finalize.
FINALIZE_GRACE = 5.0
#: How long after a failure ``raise SystemExit(n)`` is watched for (see :func:`_trace_exit_status`).
TRACE_WINDOW = 120.0

_hook_lock = threading.Lock()
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


def _oversubscribed() -> bool:
    """More ranks on this node (as the launcher tells) than it has CPUs."""
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"):
        raw = os.environ.get(var, "")
        if raw.isdigit():
            return int(raw) > (os.cpu_count() or 1)
    return False


class _Watchdog:
    """One daemon thread that calls ``fire(token)`` when the armed deadline passes.

    ``arm`` wakes the thread only when the new deadline is earlier than the one it
    sleeps towards (deadlines usually move forward, so re-arming is a lock and a store).
    """

    def __init__(self, fire: Callable[[int], None]) -> None:
        self._fire = fire
        self._cond = threading.Condition()
        self._armed: tuple[float, int] | None = None
        self._until = float("inf")
        self._stop = False
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, token: int) -> None:
        with self._cond:
            self._armed = (deadline, token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="distckpt-comm-watchdog", daemon=True)
                self._thread.start()
            elif deadline < self._until:
                self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._armed = None

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._armed = None
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._stop:
                armed = self._armed
                if armed is None:
                    self._until = float("inf")
                    self._cond.wait()
                    continue
                deadline, token = armed
                now = time.monotonic()
                if now >= deadline:
                    self._armed = None
                    try:
                        self._fire(token)
                    except Exception:  # noqa: BLE001 - MPI already finalized at exit, etc.
                        log.debug("watchdog could not wake its rank", exc_info=True)
                    continue
                self._until = deadline
                self._cond.wait(deadline - now)


class MPIComm(Communicator):
    """Collectives over mpi4py, each with a deadline.  See the module docstring for the protocol.

    ``comm`` is an mpi4py communicator (default ``MPI.COMM_WORLD``); distckpt
    works on private duplicates of it, made (nonblockingly, with the same
    deadline) at the first collective, so constructing an ``MPIComm`` is local.
    ``timeout`` is the default deadline in seconds (``None``: from
    ``$DISTCKPT_COMM_TIMEOUT``, else 600; ``0``: none); each collective may
    override it.  With ``abort_on_exception`` (default) an uncaught exception on
    this rank aborts the MPI job (see :func:`_install_abort_hook`).
    """

    #: How much longer non-root ranks wait than rank 0, so that rank 0's verdict reaches them first.
    GRACE = 5.0
    #: How long rank 0 waits for the answers to a census.
    CENSUS_WINDOW = 1.0
    #: ``hybrid`` waits block this long, then poll.
    SPIN = 0.01

    def __init__(self, comm: Any = None, *, timeout: float | None = None, abort_on_exception: bool = True) -> None:
        super().__init__()
        MPI = require("mpi4py.MPI", "mpi")
        self._MPI = MPI
        self._base = MPI.COMM_WORLD if comm is None else comm
        self.rank = self._base.Get_rank()
        self.size = self._base.Get_size()
        self._timeout = comm_timeout(timeout)
        self._comm: Any = None  # private duplicate for collectives, notices and exchange
        self._xcomm: Any = None  # private duplicate for the exit vote
        self._self: Any = None  # private duplicate of COMM_SELF for wake-ups
        self._wake_req: Any = None
        self._wake_buf = bytearray(8)
        self._notice_req: Any = None
        self._notice_buf = bytearray(32)
        self._tokens = 0
        self._census_id = 0
        self._watchdog: _Watchdog | None = None
        self._sends: list[tuple[Any, Any]] = []  # notices in flight, with their buffers
        self._gone: dict[int, tuple[int, int]] = {}  # rank -> (collectives it completed, exit status)
        self._settled = False  # every rank already knows this rank's failure (verdict sent or received)
        self._current: _Op | None = None
        mode = os.environ.get(ENV_WAIT, "").strip().lower() or "auto"
        if mode not in ("auto", "block", "poll", "hybrid"):
            raise ConfigError(f"{ENV_WAIT}={mode!r}: expected auto, block, hybrid or poll")
        if mode == "auto":
            mode = "hybrid" if _oversubscribed() else "block"
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            mode = "poll"  # the watchdog thread may not call MPI
        self._mode = mode
        if self.size > 1:
            _track_exit(self)
            if abort_on_exception:
                _install_abort_hook(MPI)

    def _timeout_value(self) -> float | None:
        return self._timeout

    # -- setup, waits, notices --------------------------------------------------------
    def _setup(self, op: _Op) -> None:
        if self._comm is not None:
            return
        MPI = self._MPI
        if self._self is None:
            self._self = MPI.COMM_SELF.Dup()
            self._post_wake()
        c1, r1 = self._base.Idup()
        c2, r2 = self._base.Idup()
        self._wait([r1, r2], op, deadline=op.deadline, what="setup")
        self._comm, self._xcomm = c1, c2
        self._post_notice()

    def _post_wake(self) -> None:
        self._wake_buf = bytearray(8)
        self._wake_req = self._self.Irecv([self._wake_buf, self._MPI.BYTE], source=0, tag=_TAG_WAKE)

    def _post_notice(self) -> None:
        self._notice_buf = bytearray(32)
        self._notice_req = self._comm.Irecv([self._notice_buf, self._MPI.BYTE], source=self._MPI.ANY_SOURCE,
                                            tag=_TAG_NOTICE)

    def _wake(self, token: int) -> None:
        self._self.Send([struct.pack("<q", token), self._MPI.BYTE], dest=0, tag=_TAG_WAKE)

    def _arm(self, deadline: float) -> int:
        if self._watchdog is None:
            self._watchdog = _Watchdog(self._wake)
        self._tokens += 1
        self._watchdog.arm(deadline, self._tokens)
        return self._tokens

    def _deadline(self, op: _Op) -> float | None:
        """Root waits until the op's deadline, the others a little longer so root's verdict reaches them."""
        d = op.deadline
        return d if d is None or self.rank == 0 else d + self.GRACE

    def _wait(self, reqs: list, op: _Op | None, *, deadline: float | None, what: str, quiet: bool = False) -> list | None:
        """Complete ``reqs``; their statuses in order.

        Ends early on a peer's notice (raises) or at ``deadline`` (raises; with
        ``quiet`` returns None, and notices are only recorded).
        """
        MPI = self._MPI
        n = len(reqs)
        statuses: list = [None] * n
        left = sum(1 for r in reqs if r != MPI.REQUEST_NULL)
        blocking = self._mode != "poll"
        token = None
        if blocking:
            first = deadline
            if self._mode == "hybrid":
                spin = time.monotonic() + self.SPIN
                first = spin if first is None else min(first, spin)
            if first is not None:
                token = self._arm(first)
        started = time.monotonic()
        prev = self._current
        self._current = op
        try:
            while left:
                extra = [self._wake_req, self._notice_req if self._notice_req is not None else MPI.REQUEST_NULL]
                allr = list(reqs) + extra
                sts: list = []
                if blocking:
                    idxs = MPI.Request.Waitsome(allr, sts) or []
                else:
                    idxs = MPI.Request.Testsome(allr, sts) or []
                    if not idxs:
                        if deadline is not None and time.monotonic() >= deadline:
                            self._expired(reqs, op, what, quiet)
                            return None
                        time.sleep(min(_POLL_MAX, max(_POLL_MIN, _POLL_SHARE * (time.monotonic() - started))))
                        continue
                woke = notice = None
                for k, i in enumerate(idxs):
                    if i < n:
                        left -= 1
                        statuses[i] = sts[k]
                    elif i == n:
                        (woke,) = struct.unpack("<q", self._wake_buf)
                        self._post_wake()
                    else:
                        notice = (struct.unpack("<4q", self._notice_buf), sts[k].Get_source())
                        self._post_notice()
                if notice is not None:
                    self._on_notice(notice[0], notice[1], op, quiet)
                if woke is not None and woke == token:
                    token = None
                    if deadline is not None and time.monotonic() >= deadline - 1e-4:
                        self._expired(reqs, op, what, quiet)
                        return None
                    blocking = False  # hybrid: the spin is over, poll from now on
        finally:
            self._current = prev
            if token is not None and self._watchdog is not None:
                self._watchdog.disarm()
        return statuses

    def _expired(self, reqs: list, op: _Op | None, what: str, quiet: bool) -> None:
        if not quiet:
            raise self._timed_out(op, what, reqs)

    def _isend(self, data: bytes, dest: int, tag: int) -> None:
        buf = bytearray(data)
        self._sends.append((self._comm.Isend([buf, self._MPI.BYTE], dest=dest, tag=tag), buf))

    def _prune_sends(self) -> None:
        if self._sends:
            self._sends = [(r, b) for r, b in self._sends if not r.Test()]

    def _send_bye(self, status: int) -> None:
        """Tell root (or, from root, everyone) that this rank takes part in no further collective."""
        if self._comm is None or self.size == 1:
            return
        words = struct.pack("<4q", _BYE, 0, self._done(), status)
        for dest in range(1, self.size) if self.rank == 0 else (0,):
            try:
                self._isend(words, dest, _TAG_NOTICE)
            except Exception:  # noqa: BLE001 - best effort while leaving
                log.debug("rank %d: BYE to rank %d failed", self.rank, dest, exc_info=True)

    def _relay(self, seq: int, message: str, failures: dict[int, str] | None) -> None:
        """Root: send every other rank the verdict (a FAIL notice, then the text)."""
        payload = json.dumps({"m": message, "f": {str(k): v for k, v in (failures or {}).items()}}).encode("utf-8")
        notice = struct.pack("<4q", _FAIL, 0, seq, len(payload))
        for dest in range(1, self.size):
            self._isend(notice, dest, _TAG_NOTICE)
            self._isend(payload, dest, _TAG_VERDICT)

    def _break(self, message: str, failures: dict[int, str] | None = None, *, relay: bool = False,
               bye: bool = False, settled: bool = False, **_: Any) -> DistributedError:
        if self._broken is None:
            self._settled = self._settled or settled
            if relay and self.rank == 0 and self._comm is not None and self.size > 1:
                seq = self._current.seq if self._current is not None else self._seq - 1
                try:
                    self._relay(seq, message, failures)
                    self._settled = True
                except Exception:  # noqa: BLE001
                    log.debug("rank 0: could not relay the verdict", exc_info=True)
            self._broken = message
            if bye and self.rank != 0:
                self._send_bye(_BYE_BROKEN)
            if self.size > 1:
                _trace_exit_status()
        log.debug("rank %d: %s", self.rank, message)
        return DistributedError(message, failures)

    def _on_notice(self, words: tuple, src: int, op: _Op | None, quiet: bool) -> None:
        kind, a, b, c = words
        if kind == _BYE:
            self._gone[src] = (b, c)
            log.debug("rank %d: rank %d left after %d collectives (status %d)", self.rank, src, b, c)
            if not quiet and op is not None and op.seq >= b:
                raise self._peer_gone(op, src)
        elif kind == _FAIL:
            if quiet:
                return
            message, failures = self._recv_verdict(c)
            self._settled = True
            if op is not None and b > op.seq:
                # Root failed collective #b, which this rank has not reached yet (it was descheduled, and the
                # current collective's completion and the verdict arrived together).  Every rank completed this
                # one, so let it finish; collective #b raises the verdict (see _begin), later ones "unusable".
                self._verdict = self._break(message, failures)
                return
            raise self._break(message, failures)
        elif kind == _CENSUS:
            cur = self._current
            here = cur.head() if cur is not None else {"seq": self._seq, "kind": "(between collectives)", "name": "",
                                                        "root": 0}
            reply = json.dumps({"id": a, **here}).encode("utf-8")[:_CENSUS_MAX]
            try:
                self._isend(reply, 0, _TAG_CENSUS)
            except Exception:  # noqa: BLE001
                log.debug("rank %d: census reply failed", self.rank, exc_info=True)

    def _recv_verdict(self, nbytes: int) -> tuple[str, dict[int, str]]:
        buf = bytearray(max(nbytes, 1))
        req = self._comm.Irecv([buf, self._MPI.BYTE], source=0, tag=_TAG_VERDICT)
        got = self._wait([req], None, deadline=time.monotonic() + self.GRACE, what="verdict", quiet=True)
        if got is None:
            req.Cancel()
            return "rank 0 reported a failure but its verdict never arrived", {}
        verdict = json.loads(bytes(buf[:nbytes]))
        return verdict["m"], {int(k): v for k, v in verdict["f"].items()}

    def _peer_gone(self, op: _Op, src: int) -> DistributedError:
        status = self._gone[src][1]
        why = (f"rank {src} gave up after a failure of its own" if status == _BYE_BROKEN
               else f"rank {src} exited with status {status}")
        message = f"collective {op.name!r} (#{op.seq}) cannot complete: rank(s) {src} did not arrive ({why})"
        return self._break(message, {src: why}, relay=True)

    def _precheck(self, op: _Op) -> None:
        if self._comm is None:
            return
        self._prune_sends()
        status = self._MPI.Status()
        while self._notice_req.Test(status):
            words, src = struct.unpack("<4q", self._notice_buf), status.Get_source()
            self._post_notice()
            self._on_notice(words, src, op, False)
        for src, (done, _status) in sorted(self._gone.items()):
            if done <= op.seq:
                raise self._peer_gone(op, src)

    # -- timeouts ---------------------------------------------------------------------
    def _timed_out(self, op: _Op | None, what: str, reqs: list) -> DistributedError:
        assert op is not None
        if self._verdict is not None:  # the real cause: root's verdict about a later collective
            verdict, self._verdict = self._verdict, None
            return verdict
        if what == "setup":
            return self._break(
                f"collective {op.name!r} timed out after {op.budget} on rank {self.rank} while setting up "
                f"distckpt's communicator: some rank never reached its first distckpt collective"
            )
        if what == "exchange":
            return self._break(
                f"exchange {op.name!r} (#{op.seq}) timed out after {op.budget} on rank {self.rank}: {self._pending(reqs)} "
                f"(a peer probably died or hangs; if it is just slow, raise {ENV_TIMEOUT})",
                relay=True, bye=True,
            )
        if self.rank != 0:
            return self._break(
                f"collective {op.name!r} (#{op.seq}) timed out after {op.budget} on rank {self.rank}: rank 0 (the "
                f"coordinator) did not report which ranks are missing, so rank 0 itself did not arrive (crashed, "
                f"hung or busy)",
                bye=True,
            )
        message, failures = self._census(op)
        return self._break(message, failures, relay=True)

    def _pending(self, reqs: list) -> str:
        left = [i for i, r in enumerate(reqs) if r != self._MPI.REQUEST_NULL]
        return f"{len(left)} of its {len(reqs)} transfers never completed"

    def _census(self, op: _Op) -> tuple[str, dict[int, str]]:
        """Root, after a timeout: ask every rank where it is; name who did not arrive."""
        MPI = self._MPI
        self._census_id += 1
        cid = self._census_id
        for dest in range(1, self.size):
            self._isend(struct.pack("<4q", _CENSUS, cid, op.seq, 0), dest, _TAG_NOTICE)
        replies: dict[int, dict] = {}
        end = time.monotonic() + self.CENSUS_WINDOW
        while len(replies) < self.size - 1:
            buf = bytearray(_CENSUS_MAX)
            req = self._comm.Irecv([buf, MPI.BYTE], source=MPI.ANY_SOURCE, tag=_TAG_CENSUS)
            sts = self._wait([req], op, deadline=end, what="census", quiet=True)
            if sts is None:
                req.Cancel()
                break
            try:
                reply = json.loads(bytes(buf[: sts[0].Get_count(MPI.BYTE)]))
            except ValueError:
                continue
            if reply.get("id") == cid:
                replies[sts[0].Get_source()] = reply
        me = op.head()
        missing, exited, odd = [], {}, {}
        for r in range(1, self.size):
            if r in self._gone and self._gone[r][0] <= op.seq:
                exited[r] = self._gone[r][1]
            elif r not in replies:
                missing.append(r)
            elif {k: replies[r].get(k) for k in me} != me:
                odd[r] = replies[r]
        parts, failures = [], {}
        if missing:
            parts.append(
                f"rank(s) {format_ranks(missing)} did not arrive (crashed, hung, or still busy in an earlier phase; "
                f"if they are just slow, raise {ENV_TIMEOUT})"
            )
            failures.update({r: f"did not arrive at {op.name!r} within {op.budget}" for r in missing})
        for r, status in exited.items():
            parts.append(f"rank {r} exited with status {status}" if status != _BYE_BROKEN else f"rank {r} gave up")
            failures[r] = f"left the job (status {status})"
        for r, h in odd.items():
            parts.append(f"rank {r} is in {_where(h)}")
            failures[r] = f"in {_where(h)}"
        if not parts:
            parts.append("every rank arrived but the collective did not complete (an MPI process probably died)")
        return f"collective {op.name!r} (#{op.seq}) timed out after {op.budget}: " + "; ".join(parts), failures

    # -- transports -------------------------------------------------------------------
    def _run(self, make: Callable[[], Any], op: _Op, what: str = "data") -> list:
        """Start one nonblocking operation (after setup) and wait for it."""
        self._setup(op)
        try:
            return self._wait([make()], op, deadline=self._deadline(op), what=what) or []
        except self._MPI.Exception as exc:
            raise self._break(f"{op.kind} {op.name!r} (#{op.seq}): MPI error on rank {self.rank}: {exc}",
                              relay=True, bye=True) from exc

    def _t_header(self, words: list[int], op: _Op) -> list[int]:
        MPI = self._MPI
        send = array.array("Q", words)
        recv = array.array("Q", bytes(8 * len(words)))
        if self.size == 1:
            return list(words)
        self._run(lambda: self._comm.Iallreduce([send, MPI.UINT64_T], [recv, MPI.UINT64_T], op=MPI.MAX), op, "header")
        return list(recv)

    def _t_gather(self, data: bytes | memoryview, op: _Op, root: int, maxsize: int) -> list[bytes] | None:
        MPI, size, me = self._MPI, self.size, self.rank == root
        if size == 1:
            return [bytes(data)]
        if maxsize <= _SMALL:
            sbuf = _slot(data, maxsize)
            rbuf = bytearray(len(sbuf) * size) if me else None
            self._run(lambda: self._comm.Igather([sbuf, MPI.BYTE], [rbuf, MPI.BYTE] if me else None, root=root), op)
            return _unslot(rbuf, len(sbuf), size) if rbuf is not None else None
        lens = bytearray(8 * size) if me else None
        mine = struct.pack("<Q", len(data))
        self._run(lambda: self._comm.Igather([mine, MPI.BYTE], [lens, MPI.BYTE] if me else None, root=root), op)
        counts = list(struct.unpack(f"<{size}Q", lens)) if lens is not None else []
        piece = max(_SMALL, _MPI_LIMIT // size)
        outs = [bytearray(c) for c in counts]
        view = memoryview(data)
        for k in range(-(-maxsize // piece)):
            lo = k * piece
            part = view[lo : lo + piece]
            cnt = [max(0, min(c - lo, piece)) for c in counts]
            displs = _displacements(cnt)
            rbuf = bytearray(max(sum(cnt), 1) if me else 0)
            recv = [rbuf, (cnt, displs), MPI.BYTE] if me else None
            self._run(self._igatherv(part, recv, root), op)
            if me:
                for r in range(size):
                    outs[r][lo : lo + cnt[r]] = rbuf[displs[r] : displs[r] + cnt[r]]
        return [bytes(o) for o in outs] if me else None

    def _igatherv(self, part: memoryview, recv: list | None, root: int) -> Callable[[], Any]:
        return lambda: self._comm.Igatherv([part, self._MPI.BYTE], recv, root=root)

    def _t_allgather(self, data: bytes | memoryview, op: _Op, maxsize: int) -> list[bytes]:
        MPI, size = self._MPI, self.size
        if size == 1:
            return [bytes(data)]
        if maxsize <= _SMALL:
            sbuf = _slot(data, maxsize)
            rbuf = bytearray(len(sbuf) * size)
            self._run(lambda: self._comm.Iallgather([sbuf, MPI.BYTE], [rbuf, MPI.BYTE]), op)
            return _unslot(rbuf, len(sbuf), size)
        lens = bytearray(8 * size)
        self._run(lambda: self._comm.Iallgather([struct.pack("<Q", len(data)), MPI.BYTE], [lens, MPI.BYTE]), op)
        counts = list(struct.unpack(f"<{size}Q", lens))
        if sum(counts) > _MPI_LIMIT:  # same verdict on every rank
            raise DistributedError(
                f"allgather {op.name!r}: {sum(counts)} bytes in all is too much for one collective (limit 2 GiB); "
                f"gather to one rank instead"
            )
        displs = _displacements(counts)
        out = bytearray(max(sum(counts), 1))
        self._run(lambda: self._comm.Iallgatherv([data, MPI.BYTE], [out, (counts, displs), MPI.BYTE]), op)
        return [bytes(out[d : d + c]) for d, c in zip(displs, counts)]

    def _t_bcast(self, data: bytes | memoryview | None, op: _Op, root: int, size: int) -> bytes:
        if self.size == 1:
            assert data is not None
            return bytes(data)
        buf = bytearray(data) if self.rank == root and data is not None else bytearray(size)
        mv = memoryview(buf)
        for a, b in _pieces(size, EXCHANGE_CHUNK):
            self._run(self._ibcast(mv[a:b], root), op)
        return bytes(buf)

    def _ibcast(self, part: memoryview, root: int) -> Callable[[], Any]:
        return lambda: self._comm.Ibcast([part, self._MPI.BYTE], root=root)

    def _t_exchange(self, plan: _Transfers, op: _Op, chunk: int) -> str | None:
        MPI = self._MPI
        self._setup(op)
        reqs, expect = [], []
        try:
            for src, view in plan.recvs:
                for a, b in _pieces(len(view), chunk):
                    reqs.append(self._comm.Irecv([view[a:b], MPI.BYTE], source=src, tag=_TAG_DATA))
                    expect.append((src, b - a))
            for dest, view in plan.sends:
                for a, b in _pieces(len(view), chunk):
                    reqs.append(self._comm.Isend([view[a:b], MPI.BYTE], dest=dest, tag=_TAG_DATA))
            statuses = self._wait(reqs, op, deadline=op.deadline, what="exchange") or []
        except MPI.Exception as exc:
            raise self._break(
                f"exchange {op.name!r} (#{op.seq}): MPI error on rank {self.rank} ({exc}), usually a message longer "
                f"than its receive buffer: each receive must be exactly as long as the matching send",
                relay=True, bye=True,
            ) from exc
        problems = []
        for (src, n), st in zip(expect, statuses):
            got = st.Get_count(MPI.BYTE)
            if got != n:
                problems.append(f"received {got} bytes from rank {src} into a {n}-byte piece")
        return "; ".join(problems) or None

    # -- exit ---------------------------------------------------------------------------
    def _exit_vote(self, abnormal: bool) -> bool | None:
        """Everyone's "I exit abnormally", if every rank votes within EXIT_GRACE; else None."""
        if self._xcomm is None or self.size == 1:
            return None
        MPI = self._MPI
        send, recv = array.array("Q", [int(abnormal)]), array.array("Q", [0])
        req = self._xcomm.Iallreduce([send, MPI.UINT64_T], [recv, MPI.UINT64_T], op=MPI.MAX)
        got = self._wait([req], None, deadline=time.monotonic() + EXIT_GRACE, what="exit", quiet=True)
        return None if got is None else bool(recv[0])

    def _close(self) -> None:
        """Stop the watchdog and withdraw the always-posted receives (before MPI_Finalize)."""
        if self._watchdog is not None:
            self._watchdog.stop()
        for req in (self._notice_req, self._wake_req):
            if req is not None and req != self._MPI.REQUEST_NULL:
                try:
                    req.Cancel()
                    req.Wait()
                except Exception:  # noqa: BLE001
                    log.debug("rank %d: could not cancel a receive", self.rank, exc_info=True)
        self._notice_req = self._wake_req = None


def _slot(data: bytes | memoryview, maxsize: int) -> bytearray:
    """``data`` in a fixed-size slot (8-byte little-endian length, then the bytes) for Igather/Iallgather."""
    sbuf = bytearray(8 + maxsize)
    sbuf[:8] = struct.pack("<Q", len(data))
    sbuf[8 : 8 + len(data)] = data
    return sbuf


def _unslot(rbuf: bytearray, slot: int, size: int) -> list[bytes]:
    """The ``size`` payloads of gathered :func:`_slot` buffers."""
    return [bytes(rbuf[r * slot + 8 : r * slot + 8 + struct.unpack_from("<Q", rbuf, r * slot)[0]]) for r in range(size)]


def _displacements(counts: list[int]) -> list[int]:
    """Gatherv displacements: the running sum (linear; the root of 8,192 ranks computes it per piece)."""
    return [0, *itertools.accumulate(counts[:-1])] if counts else []


# ----------------------------------------------------------------------------------------
# exit status tracking and the exit hook (see "Exiting never hangs" above)

_exit_lock = threading.Lock()
_exit_comms: weakref.WeakSet = weakref.WeakSet()
_exit = {"installed": False, "recorded": False, "status": None, "uncaught": False, "traced": False}


def _record_status(status: Any) -> None:
    _exit["recorded"] = True
    _exit["status"] = status


class _RecordingQuitter:
    """``exit``/``quit`` that record their status, then do what the original does."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __repr__(self) -> str:
        return repr(self._inner)

    def __call__(self, code: Any = None) -> Any:
        _record_status(code)
        return self._inner(code)


def _track_exit(comm: MPIComm) -> None:
    """Remember ``comm`` for the exit hook; on the first call wrap sys.exit/exit/quit and register the hook."""
    with _exit_lock:
        _exit_comms.add(comm)
        if _exit["installed"]:
            return
        _exit["installed"] = True
        original_exit = sys.exit

        def _recording_exit(status: Any = None) -> Any:
            _record_status(status)
            return original_exit(status)

        sys.exit = _recording_exit
        for name in ("exit", "quit"):
            inner = getattr(builtins, name, None)
            if inner is not None and not isinstance(inner, _RecordingQuitter):
                setattr(builtins, name, _RecordingQuitter(inner))
        previous_hook = sys.excepthook

        def _recording_hook(tp, value, tb):
            _exit["uncaught"] = True
            previous_hook(tp, value, tb)

        sys.excepthook = _recording_hook
        atexit.register(_at_exit)


def _trace_exit_status() -> None:
    """After a failure: watch the outermost frame of the main thread for SystemExit (``raise SystemExit(n)``).

    A trace hook costs a Python call per function call, so it is installed only
    once a communicator broke, only on the main thread, never over a debugger's
    or coverage's hook, and it removes itself after :data:`TRACE_WINDOW` seconds
    (a job that goes on after the failure stops paying for it; if it later ends
    with ``raise SystemExit(n)`` outside ``sys.exit``, that is seen as status 0).
    """
    if _exit["traced"] or threading.current_thread() is not threading.main_thread() or sys.gettrace() is not None:
        return
    frame = sys._getframe()
    while frame.f_back is not None:
        frame = frame.f_back
    until = time.monotonic() + TRACE_WINDOW
    calls = [0]

    def local(f: Any, event: str, arg: Any) -> Any:
        if event == "exception" and isinstance(arg[1], SystemExit):
            _record_status(arg[1].code)
        elif event == "line":
            _exit["recorded"] = False  # a SystemExit caught at the top level does not end the process
        return local

    def calls_hook(f: Any, event: str, arg: Any) -> None:
        calls[0] += 1
        if not calls[0] & 0x3FFF and time.monotonic() > until:
            sys.settrace(None)
        return None

    frame.f_trace = local
    frame.f_trace_lines = True
    sys.settrace(calls_hook)
    _exit["traced"] = True


def _exit_code() -> int:
    """The status this process exits with, as Python computes it from what was recorded."""
    if _exit["uncaught"]:
        return 1
    status = _exit["status"] if _exit["recorded"] else None
    if status is None:
        return 0
    if isinstance(status, int):
        return status
    return 1  # Python printed the message itself


def _libmpi() -> Any:
    """ctypes handle of the MPI library this process loaded (Linux), or None."""
    try:
        import ctypes

        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libmpi.so"):
                    return ctypes.CDLL(path)
    except Exception:  # noqa: BLE001
        log.debug("could not locate the MPI library", exc_info=True)
    return None


def _finalize_within(seconds: float) -> bool:
    """MPI_Finalize on a helper thread (ctypes releases the GIL); False if it did not finish in time."""
    lib = _libmpi()
    if lib is None:
        return True  # cannot bound it; every rank is at exit, so mpi4py's own finalize completes
    worker = threading.Thread(target=lib.MPI_Finalize, name="distckpt-finalize", daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive()


def _flush_files() -> None:
    """Flush every open Python file object (os._exit skips the interpreter's own teardown)."""
    import gc
    import io

    for obj in [sys.stdout, sys.stderr, *gc.get_objects()]:
        try:
            if isinstance(obj, io.IOBase) and not obj.closed and obj.writable():
                obj.flush()
        except Exception:  # noqa: BLE001 - a broken pipe, a detached buffer: nothing to save
            pass


def _run_other_hooks() -> None:
    """Run the atexit hooks registered before ours now (they would run after it, still before MPI_Finalize)."""
    atexit.unregister(_at_exit)
    try:
        atexit._run_exitfuncs()
    except Exception:  # noqa: BLE001
        pass


def _leave(code: int) -> None:
    """End the process now, with ``code``, without MPI_Finalize."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code & 0xFF)


def _at_exit() -> None:
    """Before mpi4py's MPI_Finalize: tell the others, vote, and leave without finalizing when that could hang.

    The vote is the MAX of "I exit with a non-zero status".  Completed with 0 (every
    rank is here and exits with 0): finalize, which cannot hang then (bounded anyway
    if a communicator broke).  Completed with 1: every rank leaves at once with its
    own status (mpirun ends a job at its first non-zero exit anyway).  Incomplete (a
    rank is busy, stuck or gone): a healthy rank finalizes as MPI prescribes, a rank
    that failed or exits non-zero leaves.  Whatever leaving needs besides
    ``os._exit`` (the other atexit hooks, flushing files) is done before the vote,
    so that all ranks leave within microseconds of learning its outcome.
    """
    MPI = sys.modules.get("mpi4py.MPI")
    try:
        if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized():
            return
    except Exception:  # noqa: BLE001
        return
    comms = sorted((c for c in list(_exit_comms) if c.size > 1), key=lambda c: -c.size)
    if not comms:
        return
    code = _exit_code()
    broken = any(c._broken is not None for c in comms)
    vote = None
    try:
        if broken or code != 0:
            for c in comms:
                if not c._settled:
                    c._send_bye(code)
        _run_other_hooks()
        _flush_files()
        vote = comms[0]._exit_vote(code != 0)
    except Exception:  # noqa: BLE001 - never let the hook itself hang or crash the exit
        log.debug("exit vote failed", exc_info=True)
    for c in comms:
        c._close()
    if vote is None:
        if broken or code != 0:
            _leave(code)
        return
    if vote or (broken and not _finalize_within(FINALIZE_GRACE)):
        _leave(code)


# ----------------------------------------------------------------------------------------
# selection


def _mindspore_initialised() -> bool:
    """True if mindspore is imported *and* ``mindspore.communication.init()`` has run (never imports it)."""
    if "mindspore" not in sys.modules:
        return False
    try:
        from mindspore.communication._comm_helper import GlobalComm  # type: ignore

        return bool(GlobalComm.INITED)
    except Exception:  # noqa: BLE001
        return False


def _registered(name: str) -> Any:
    """The communicator class registered under ``name`` (imported now)."""
    module, _, attr = COMM_REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def __getattr__(name: str) -> Any:
    if name == "MindSporeComm":  # moved to distckpt.mindspore.comm; still importable from here
        return _registered("mindspore")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    if forced in COMM_REGISTRY:
        return _registered(forced)()
    if forced:
        raise DistributedError(f"{ENV_COMM}={forced!r}: expected single, mpi or mindspore")
    if _under_mpirun():
        return MPIComm()
    if _mindspore_initialised():
        return _registered("mindspore")()
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
