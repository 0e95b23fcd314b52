"""Staging: build an output in a temporary place beside DST, then move it into place, or leave nothing.

The one "write to a temporary place, then move into place" of distckpt (small
single objects use :meth:`~distckpt.storage.base.Store.put_atomic`)::

    with Staging("out/m.ckpt", kind="file", overwrite=True, marker={"verb": "merge"}) as stg:
        w = stg.open_write()              # writes stg.name (".m.ckpt.tmp-<id>") in stg.store
        ...; w.commit()
    with Staging("out/model", kind="dir", commit_last="distckpt.index.json") as stg:
        stg.store.put("config.json", ...)  # stg.store is the temporary directory

In order, :meth:`Staging.__enter__`:

1. notes which parent directories of DST do not exist yet (local disks) and creates them;
2. writes a marker first -- ``.distckpt-staging.json`` inside the temporary
   directory, or a sidecar ``.{base}.tmp-{id}.distckpt-staging.json`` beside a
   temporary file -- holding the caller's ``marker`` dict, pid, host and time,
   so :func:`find_staging_debris` (``gc`` on DST's parent) can prove a leftover
   ``.{base}.tmp-{id}`` is distckpt's;
3. hands out the temporary place.

On success :meth:`Staging.__exit__` drops the marker and moves the output into
place (:meth:`~distckpt.storage.base.Store.replace`): a POSIX rename -- a DST
that is a symlink is replaced itself, atomically, never followed -- or, on
object stores, server-side copies with ``commit_last`` last and stale objects
dropped after.  On any failure (an exception, Ctrl-C, SIGTERM under
:func:`handle_termination`) it removes the temporary place, its marker, and
every parent directory it created; a full disk becomes one error naming DST.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from .. import jsonutil
from ..errors import DestinationExistsError, StorageError
from .base import TMP_NAME_RE, Store, Writer, is_space_error, space_error
from .factory import open_storage
from .urls import split_url

__all__ = [
    "Staging",
    "find_staging_debris",
    "handle_termination",
    "Terminated",
    "MARKER_NAME",
    "MARKER_FORMAT",
    "STALE_AFTER",
]

MARKER_NAME = ".distckpt-staging.json"
MARKER_FORMAT = "distckpt-staging/1"
#: a marker older than this (seconds) is debris even if its pid is alive or on another host
STALE_AFTER = 24 * 3600.0
_MARKER_LIMIT = 64 << 10
#: copied last when a directory is committed on an object store: the distckpt index
#: (``naming.INDEX_NAME``); a name the output lacks changes nothing
COMMIT_LAST = "distckpt.index.json"


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception by :func:`handle_termination` (handled like Ctrl-C)."""


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread, so cleanups run.

    Does nothing outside the main thread (Python delivers signals there only).
    The previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Staging:
    """A temporary place beside ``dst`` (``.{base}.tmp-{id}``), committed on success, removed on failure.

    ``kind="dir"``: :attr:`store` is the temporary directory to write into.
    ``kind="file"``: write :attr:`name` in :attr:`store` (or call :meth:`open_write`).
    ``overwrite``: replace an existing DST, else :class:`DestinationExistsError`.
    ``marker``: JSON-able facts saved in the marker (save id, verb, ...).
    ``commit_last``: on object stores, the file copied after all others (default: the distckpt index).
    """

    def __init__(
        self,
        dst: Any,
        *,
        kind: str = "dir",
        overwrite: bool = False,
        storage_options: Optional[dict[str, Any]] = None,
        marker: Optional[Mapping[str, Any]] = None,
        commit_last: Optional[str] = COMMIT_LAST,
    ):
        if kind not in ("dir", "file"):
            raise ValueError(f"Staging kind must be 'dir' or 'file', not {kind!r}")
        self.dst = os.fspath(dst)
        parent_url, base = split_url(self.dst)
        if base in ("", ".", "..") or "/" in base or os.sep in base:
            raise StorageError(f"{self.dst}: not a valid destination; it must end in a file or directory name")
        self.kind, self.overwrite, self.commit_last = kind, overwrite, commit_last
        self.marker = dict(marker or {})
        json.dumps(self.marker)  # fail now, not half-way
        self.parent: Store = open_storage(parent_url, storage_options)
        self.base = base
        if not overwrite and self.parent.exists(base):
            raise DestinationExistsError(f"{self.dst} already exists; pass --overwrite to replace it")
        self.id = uuid.uuid4().hex[:12]
        self.tmp_name = f".{base}.tmp-{self.id}"
        self.store: Store = self.parent
        self.name = self.tmp_name if kind == "file" else ""
        self._created: list[str] = []
        self._state = "new"

    @property
    def marker_name(self) -> str:
        """The marker's name in :attr:`parent`."""
        if self.kind == "dir":
            return f"{self.tmp_name}/{MARKER_NAME}"
        return self.tmp_name + MARKER_NAME

    def __repr__(self) -> str:
        return f"Staging({self.dst!r}, kind={self.kind!r}, tmp={self.tmp_name!r}, {self._state})"

    def _missing_parents(self) -> list[str]:
        """Parent directories of DST that do not exist yet, deepest first (local disks only)."""
        if not self.parent.caps.local:
            return []
        out = []
        p = self.parent.root
        while not os.path.lexists(p):
            out.append(p)
            up = os.path.dirname(p)
            if up == p:
                break
            p = up
        return out

    def __enter__(self) -> Staging:
        if self._state != "new":
            raise StorageError(f"{self!r} was already used; make a new Staging per output")
        self._state = "open"
        try:
            self._created = self._missing_parents()
            self.parent.makedirs()
            body = {
                "format": MARKER_FORMAT,
                "dst": self.base,
                "tmp": self.tmp_name,
                "kind": self.kind,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "time": time.time(),
                "marker": self.marker,
            }
            self.parent.put(self.marker_name, json.dumps(body, sort_keys=True).encode())
            if self.kind == "dir":
                self.store = self.parent.sub(self.tmp_name)
                self.store.makedirs()
        except BaseException as exc:
            self._cleanup()
            self._raise_space(exc)
            raise
        return self

    def open_write(self) -> Writer:
        """``kind="file"``: a writer for the temporary file."""
        if self.kind != "file" or self._state != "open":
            raise StorageError(f"{self!r}: open_write is for an open Staging of kind 'file'")
        return self.parent.open_write(self.tmp_name)

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            try:
                self._commit()
            except BaseException as exc:
                self._cleanup()
                self._raise_space(exc)
                raise
            return
        self._cleanup()
        if ev is not None:
            self._raise_space(ev)

    def _raise_space(self, exc: BaseException) -> None:
        """A full disk that no writer named: one error naming DST."""
        if is_space_error(exc) and not isinstance(exc, StorageError):
            raise space_error(self.dst, exc) from exc

    def _commit(self) -> None:
        p = self.parent
        if not self.overwrite and p.exists(self.base):
            raise DestinationExistsError(f"{self.dst} appeared while it was being written; pass --overwrite to replace it")
        if self.kind == "dir":
            p.remove([self.marker_name])
            p.replace(self.tmp_name, self.base, commit_last=self.commit_last)
        else:
            p.replace(self.tmp_name, self.base)
            p.remove([self.marker_name])
        self._state = "committed"

    def _cleanup(self) -> None:
        """Remove the temporary place, its marker and the parents this Staging created (best effort)."""
        self._state = "failed"
        with contextlib.suppress(Exception):
            self.parent.remove([self.tmp_name])
        if self.kind == "file":
            with contextlib.suppress(Exception):
                self.parent.remove([self.marker_name])
        for d in self._created:  # deepest first; stops mattering once one is not empty
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _read_marker(store: Store, name: str) -> Optional[dict[str, Any]]:
    """The parsed marker ``name``, or None when absent or not a valid marker."""
    try:
        data = jsonutil.loads(store.read_bytes(name, limit=_MARKER_LIMIT), where=name)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    types: dict[str, Any] = {"tmp": str, "kind": str, "host": str, "pid": int, "time": (int, float)}
    if any(not isinstance(data.get(k), t) or isinstance(data.get(k), bool) for k, t in types.items()):
        return None
    return data


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(marker: dict[str, Any], now: float) -> bool:
    if now - float(marker["time"]) > STALE_AFTER:
        return True
    if marker["host"] != socket.gethostname():
        return False  # it may still be running there
    return not _pid_alive(int(marker["pid"]))


def find_staging_debris(store: Store) -> list[str]:
    """Names in ``store`` (a DST's parent) that are abandoned Staging leftovers, proven by their marker.

    A ``.{base}.tmp-{id}`` directory counts when its ``.distckpt-staging.json``
    names it; a temporary file when its sidecar marker names it (both are
    returned); a sidecar whose file is gone counts alone.  Only markers whose
    process is not alive on this host, or older than :data:`STALE_AFTER`, count.
    Anything without a valid marker is never returned.
    """
    names = store.listdir()
    present = set(names)
    now = time.time()
    out: set[str] = set()
    for n in names:
        if TMP_NAME_RE.match(n):
            is_dir = store.isdir(n)
            marker = _read_marker(store, f"{n}/{MARKER_NAME}" if is_dir else n + MARKER_NAME)
            if marker is None or marker["tmp"] != n or marker["kind"] != ("dir" if is_dir else "file"):
                continue
            if _abandoned(marker, now):
                out.add(n)
                if not is_dir:
                    out.add(n + MARKER_NAME)
        elif n.endswith(MARKER_NAME) and n != MARKER_NAME:
            tmp = n[: -len(MARKER_NAME)]
            if not TMP_NAME_RE.match(tmp) or tmp in present:
                continue
            marker = _read_marker(store, n)
            if marker is not None and marker["tmp"] == tmp and marker["kind"] == "file" and _abandoned(marker, now):
                out.add(n)
    return sorted(out)
