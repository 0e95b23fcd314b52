"""Storage on any fsspec URL, with one commit protocol for disks and object stores.

Required primitives (what a backend must do), everything else is derived:

1. ``read_range(name, start, length)``       -- ranged GET / pread
2. ``open_write(name)``                      -- a sequential writer for a new object
3. ``put_atomic(name, data)``                -- the commit: tmp + fsync + rename on POSIX,
                                                one PUT on object stores (all-or-nothing)
4. ``listdir()``, ``exists(name)``, ``size(name)``, ``remove(name)``

Who calls what, in which order, for one save (see ``distckpt.api``):

1. (all ranks) ``open_write`` their own data files, named with a fresh save id,
   so nothing a committed index refers to is ever overwritten;
2. (coordinator) after every rank reported success, ``put_atomic`` the index;
3. (coordinator) remove data files the new index no longer names.

Readers only trust what the index names, so debris of a failed save is
invisible; ``gc`` removes it.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

from .errors import StorageError

__all__ = ["Storage", "open_storage", "safe_name", "env_storage_options", "is_url"]

T = TypeVar("T")

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9._+=@-]+$")


def safe_name(name: str, *, what: str = "file name", allow_subdirs: bool = False) -> str:
    """Validate a relative name read from untrusted metadata; never a path outside the root."""
    if not isinstance(name, str) or not name:
        raise StorageError(f"invalid {what} {name!r}: must be a non-empty string")
    parts = name.split("/") if allow_subdirs else [name]
    for part in parts:
        if part in ("", ".", "..") or not _SAFE_COMPONENT.match(part):
            raise StorageError(
                f"refusing {what} {name!r}: only plain relative names are allowed (no '..', '/', '\\\\' or absolute paths)"
            )
    return name


def is_url(path: str) -> bool:
    return "://" in str(path)


def env_storage_options(protocol: str) -> dict[str, Any]:
    """Storage options from the usual environment (AWS_ENDPOINT_URL, ... for s3)."""
    if protocol not in ("s3", "s3a"):
        return {}
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
    if os.environ.get("AWS_SECRET_ACCESS_KEY"):
        opts["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    return opts


def _transient(exc: BaseException) -> bool:
    return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError))


class Storage:
    """A directory (local or remote) holding one checkpoint or a tree of them."""

    retries = 4
    backoff = 0.05

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        url = os.fspath(url)
        protocol = url.split("://", 1)[0] if is_url(url) else "file"
        opts = {**env_storage_options(protocol), **(storage_options or {})}
        self.storage_options = opts
        self.fs, root = fsspec.core.url_to_fs(url, **opts)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            root = os.path.abspath(root)
        self.root = root.rstrip("/") or "/"
        self.url = url
        self.protocol = protocol
        self.bytes_read = 0
        self.read_requests = 0
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- naming
    def child_url(self, name: str) -> str:
        if self.is_local and not is_url(self.url):
            return os.path.join(self.root, name)
        return self.url.rstrip("/") + "/" + name

    def sub(self, name: str) -> Storage:
        st = Storage.__new__(Storage)
        st.__dict__.update(self.__dict__)
        st._lock = threading.Lock()
        st.root = self.path(name)
        st.url = self.child_url(name)
        st.bytes_read = 0
        st.read_requests = 0
        return st

    def path(self, name: str) -> str:
        if self.is_local:
            return os.path.join(self.root, name)
        return posixpath.join(self.root, name)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # ------------------------------------------------------------- retrying
    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        delay = self.backoff
        for attempt in range(self.retries):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _transient(exc) or attempt == self.retries - 1:
                    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
                        raise
                    raise StorageError(f"{what} failed after {attempt + 1} attempt(s): {type(exc).__name__}: {exc}") from exc
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # ------------------------------------------------------------- reading
    def exists(self, name: str = "") -> bool:
        p = self.path(name) if name else self.root
        return bool(self._retry(f"exists {p}", lambda: self.fs.exists(p)))

    def isdir(self, name: str = "") -> bool:
        p = self.path(name) if name else self.root
        return bool(self._retry(f"isdir {p}", lambda: self.fs.isdir(p)))

    def size(self, name: str) -> int:
        p = self.path(name)
        if self.is_local:
            return os.path.getsize(p)
        return int(self._retry(f"size {p}", lambda: self.fs.size(p)))

    def listdir(self, name: str = "") -> list[str]:
        """Base names directly under ``name`` (files and directories)."""
        p = self.path(name) if name else self.root
        if self.is_local:
            try:
                return sorted(os.listdir(p))
            except FileNotFoundError:
                return []
        try:
            entries = self._retry(f"list {p}", lambda: self.fs.ls(p, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        base = p.rstrip("/")
        out = []
        for e in entries:
            e = e.rstrip("/")
            if e == base:
                continue
            out.append(posixpath.basename(e))
        return sorted(set(out))

    def open_read(self, name: str) -> BinaryIO:
        p = self.path(name)
        if self.is_local:
            return open(p, "rb")  # noqa: SIM115 - caller closes
        return self._retry(f"open {p}", lambda: self.fs.open(p, "rb", block_size=1 << 20, cache_type="readahead"))

    def read_bytes(self, name: str, *, limit: int | None = None) -> bytes:
        """Whole small object (index, strategy, config); refuse anything above ``limit``."""
        if limit is not None:
            n = self.size(name)
            if n > limit:
                raise StorageError(f"{self.path(name)}: {n} bytes is larger than the {limit}-byte limit for this kind of file")
        p = self.path(name)
        data = self._retry(f"read {p}", lambda: self.fs.cat_file(p))
        self._count(len(data))
        return data

    def _count(self, n: int, requests: int = 1) -> None:
        with self._lock:
            self.bytes_read += n
            self.read_requests += requests

    def read_into(self, name: str, start: int, out: memoryview) -> None:
        """Read exactly ``len(out)`` bytes at ``start`` into ``out`` (no extra copy on local disks)."""
        n = len(out)
        p = self.path(name)
        if self.is_local:
            # os.preadv into the destination buffer: no intermediate copy
            # (fsspec's local file would read into a new bytes object first).
            def _local():
                fd = os.open(p, os.O_RDONLY)
                try:
                    got = 0
                    while got < n:
                        k = os.preadv(fd, [out[got:]], start + got)
                        if k == 0:
                            raise StorageError(f"{p}: file ends before byte {start + n} (truncated?)")
                        got += k
                finally:
                    os.close(fd)

            self._retry(f"read {p}[{start}:{start + n}]", _local)
        else:
            data = self._retry(f"read {p}[{start}:{start + n}]", lambda: self.fs.cat_file(p, start=start, end=start + n))
            if len(data) != n:
                raise StorageError(f"{p}: file ends before byte {start + n} (truncated?)")
            out[:] = data
        self._count(n)

    def read_range(self, name: str, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(name, start, memoryview(buf))
        return buf

    def read_many(self, jobs: Sequence[tuple[str, int, memoryview]], *, threads: int | None = None) -> None:
        """Run many ``read_into`` calls; concurrent on object stores."""
        if not jobs:
            return
        workers = threads or (2 if self.is_local else 16)
        if len(jobs) == 1 or workers == 1:
            for name, start, out in jobs:
                self.read_into(name, start, out)
            return
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            list(pool.map(lambda j: self.read_into(*j), jobs))

    # ------------------------------------------------------------- writing
    def makedirs(self, name: str = "") -> None:
        p = self.path(name) if name else self.root
        if self.is_local:
            os.makedirs(p, exist_ok=True)
        else:
            self._retry(f"mkdir {p}", lambda: self.fs.makedirs(p, exist_ok=True))

    def open_write(self, name: str) -> BinaryIO:
        """A writer for a new object.  Local files are fsynced on close by :func:`close_durable`."""
        p = self.path(name)
        if self.is_local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            return open(p, "wb", buffering=0)  # noqa: SIM115 - caller closes
        return self.fs.open(p, "wb", block_size=32 << 20)

    def close_durable(self, f: BinaryIO) -> None:
        if self.is_local:
            f.flush()
            os.fsync(f.fileno())
        f.close()

    def put(self, name: str, data: bytes) -> None:
        p = self.path(name)
        if self.is_local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return
        self._retry(f"write {p}", lambda: self.fs.pipe_file(p, data))

    def put_atomic(self, name: str, data: bytes) -> None:
        """Commit: readers see the old object or the new one, never a part.

        POSIX: write a temp file beside it, fsync it, rename over, fsync the dir.
        Object stores: one PUT of the whole object (S3 PUTs are atomic).
        """
        p = self.path(name)
        if self.is_local:
            d = os.path.dirname(p)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{os.path.basename(p)}.{uuid.uuid4().hex[:12]}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        self._retry(f"commit {p}", lambda: self.fs.pipe_file(p, data))

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            p = self.path(name)
            try:
                if self.is_local:
                    if os.path.isdir(p):
                        import shutil

                        shutil.rmtree(p)
                    else:
                        os.unlink(p)
                else:
                    self.fs.rm(p, recursive=True)
            except FileNotFoundError:
                pass

    def rmtree(self) -> None:
        if self.is_local:
            import shutil

            shutil.rmtree(self.root, ignore_errors=True)
        elif self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


def open_storage(path, storage_options: dict | None = None) -> Storage:
    if isinstance(path, Storage):
        return path
    return Storage(os.fspath(path), storage_options)
