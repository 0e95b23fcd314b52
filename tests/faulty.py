"""A fault-injecting fsspec file system: ``faulty://`` = an in-memory store that fails on cue.

Every read (``cat_file``, ``read`` on an open file) and every write (``write``
on a writer, ``pipe_file``) is one numbered operation of its kind.  A rule
makes the k-th operation of a kind (and, for a transient fault, the next
``times - 1`` ones, i.e. the retries) fail with :class:`InjectedFault`, an
``OSError`` -- or, with ``corrupt=True``, silently flip one byte.  A
persistent rule fails every matching operation from the k-th on.  Hooks run
before each operation (to pause a save between its data and its commit, or
to look at the store at that moment).

Writers publish on close, all or nothing, like an S3 upload; ``discard``
drops them.  The store is separate from ``memory://``.

    plan = install()            # registers faulty://, returns the global plan
    plan.fail("write", k=3)     # the 3rd write fails once (a retry succeeds)
    plan.fail("read", k=1, persistent=True, match="data-")
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

__all__ = ["InjectedFault", "FaultPlan", "FaultyFileSystem", "install", "PLAN"]


class InjectedFault(OSError):
    """The failure a rule injects (an OSError, so storage code treats it as transient I/O)."""


@dataclass
class _Rule:
    op: str
    k: int
    times: float
    corrupt: bool
    match: str | None
    fired: int = 0


class FaultPlan:
    """Counters, rules and hooks shared by every ``faulty://`` file system instance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.counts = {"read": 0, "write": 0}
            self.rules: list[_Rule] = []
            self.hooks: list[Callable[[str, str], None]] = []
            self.log: list[tuple[str, int, str, str]] = []  # (op, number, path, what happened)

    def fail(
        self,
        op: str,
        k: int = 1,
        *,
        times: int = 1,
        persistent: bool = False,
        corrupt: bool = False,
        match: str | None = None,
    ) -> _Rule:
        """Fail (or corrupt) the ``k``-th ``op`` ("read"/"write") counted from now, ``times`` times in a row."""
        if op not in ("read", "write"):
            raise ValueError(f"op must be 'read' or 'write', not {op!r}")
        with self._lock:
            rule = _Rule(op, self.counts[op] + k, float("inf") if persistent else times, corrupt, match)
            self.rules.append(rule)
        return rule

    def hook(self, fn: Callable[[str, str], None]) -> None:
        """Call ``fn(op, path)`` before every operation (outside the plan's lock)."""
        self.hooks.append(fn)

    @property
    def injected(self) -> list[tuple[str, int, str, str]]:
        return [e for e in self.log if e[3] != "ok"]

    def before(self, op: str, path: str) -> str:
        """Count one operation; return "ok" or "corrupt", or raise InjectedFault."""
        for fn in list(self.hooks):
            fn(op, path)
        with self._lock:
            self.counts[op] += 1
            n = self.counts[op]
            action = "ok"
            for r in self.rules:
                if r.op != op or n < r.k or r.fired >= r.times or (r.match and r.match not in path):
                    continue
                r.fired += 1
                action = "corrupt" if r.corrupt else "fail"
                break
            self.log.append((op, n, path, action))
        if action == "fail":
            raise InjectedFault(f"injected {op} fault #{n} on {path}")
        return action


PLAN = FaultPlan()


def _flip(data: bytes) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    b[len(b) // 2] ^= 0x40
    return bytes(b)


class _Writer:
    """Buffers bytes, publishes them whole on close (like one S3 upload)."""

    def __init__(self, fs: FaultyFileSystem, path: str):
        self.fs, self.path = fs, path
        self.buf = io.BytesIO()
        self.closed = False

    def write(self, data) -> int:
        if self.closed:
            raise ValueError(f"write to closed file {self.path}")
        raw = bytes(memoryview(data).cast("B"))
        if PLAN.before("write", self.path) == "corrupt":
            raw = _flip(raw)
        return self.buf.write(raw)

    def tell(self) -> int:
        return self.buf.tell()

    def flush(self, force: bool = False) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.fs.store[self.path] = MemoryFile(self.fs, self.path, self.buf.getvalue())

    def discard(self) -> None:
        self.closed = True
        self.buf = io.BytesIO()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.close()
        else:
            self.discard()


class _Reader(io.RawIOBase):
    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else len(self.data) + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        action = PLAN.before("read", self.path)
        end = len(self.data) if n is None or n < 0 else min(len(self.data), self.pos + n)
        out = self.data[self.pos : end]
        self.pos = end
        return _flip(out) if action == "corrupt" else out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class FaultyFileSystem(MemoryFileSystem):
    protocol = "faulty"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]  # type: ignore[misc]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("faulty://"):
            path = path[len("faulty://") :]
        return MemoryFileSystem._strip_protocol("memory://" + path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        p = self._strip_protocol(path)
        action = PLAN.before("read", p)
        data = super().cat_file(path, start=start, end=end, **kwargs)
        return _flip(data) if action == "corrupt" else data

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        p = self._strip_protocol(path)
        raw = bytes(value)
        if PLAN.before("write", p) == "corrupt":
            raw = _flip(raw)
        self.store[p] = MemoryFile(self, p, raw)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        p = self._strip_protocol(path)
        if mode in ("wb", "xb"):
            if p in self.pseudo_dirs:
                raise IsADirectoryError(p)
            return _Writer(self, p)
        if mode == "rb":
            if p not in self.store:
                raise FileNotFoundError(p)
            return io.BufferedReader(_Reader(p, bytes(self.store[p].getbuffer())))
        return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)


def install() -> FaultPlan:
    """Register ``faulty://`` (idempotent), clear its store, and return the reset global plan."""
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
    FaultyFileSystem.store.clear()
    del FaultyFileSystem.pseudo_dirs[1:]
    PLAN.reset()
    return PLAN
