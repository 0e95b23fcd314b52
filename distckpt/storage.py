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

Object stores (s3://, and any non-local fsspec URL):

* writers are :class:`_RetryingWriter`: each write is retried with backoff,
  the object is published whole by ``close_durable`` (and its stored size
  checked), and a writer abandoned by an exception is discarded, never
  published half-written;
* there is no rename: :meth:`Storage.replace` copies object by object, the
  commit object (the index) last, and drops stale objects only afterwards;
* listings and ``exists``/``size`` bypass s3fs's listing cache (other ranks
  and processes write too);
* :meth:`Storage.read_many` issues ranged GETs from a thread pool and cuts
  large ranges into :attr:`Storage.read_piece` pieces; every request is
  retried on transient errors (exponential backoff with jitter); the bytes
  and requests are counted in :attr:`Storage.bytes_read` / ``read_requests``.

Storage options come from the caller (API ``storage_options=``, CLI
``--storage-options JSON``, YAML ``checkpoint.storage_options``) merged over
the environment (:func:`env_storage_options`: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...).  :mod:`distckpt.testing` checks a backend
against this contract.
"""

from __future__ import annotations

import functools
import os
import posixpath
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

from .errors import StorageError

__all__ = ["Storage", "open_storage", "safe_name", "env_storage_options", "merge_options", "is_url", "split_url"]

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
    """Storage options from the usual environment (AWS_ENDPOINT_URL, ... for s3).

    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION``.  Explicit storage options win (see :func:`merge_options`).
    """
    if protocol not in ("s3", "s3a"):
        return {}
    env = os.environ
    opts: dict[str, Any] = {}
    client: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
    if env.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = env["AWS_ACCESS_KEY_ID"]
    if env.get("AWS_SECRET_ACCESS_KEY"):
        opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
    if env.get("AWS_SESSION_TOKEN"):
        opts["token"] = env["AWS_SESSION_TOKEN"]
    return opts


def merge_options(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` updated by ``override``; nested dicts (``client_kwargs``, ``config_kwargs``) merge key by key."""
    out = dict(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_options(out[k], v)
        else:
            out[k] = v
    return out


_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def _transient(exc: BaseException) -> bool:
    """Worth retrying: I/O, network and server errors; not missing files, permissions or bad arguments."""
    from .errors import DistCkptError

    if isinstance(exc, DistCkptError) and not isinstance(exc, StorageError):
        return False
    return isinstance(exc, Exception) and not isinstance(exc, _PERMANENT)


class _RetryingWriter:
    """A sequential writer on an object store (or any non-local fsspec file).

    * each ``write`` is retried with backoff when it fails transiently: if the
      file did not take the bytes (its position did not move) the write is
      repeated, otherwise the buffered bytes are pushed again with ``flush``
      (a part upload is idempotent);
    * :meth:`commit` finishes the object (the final flush, retried; S3 makes a
      multipart object visible only then, whole);
    * :meth:`close` without a commit -- after a failed write, or while an
      exception propagates -- *discards* the object instead of publishing a
      partial one (plain fsspec files upload whatever they buffered on close).
    """

    def __init__(self, storage: Storage, path: str, f: Any):
        self._st, self._path, self._f = storage, path, f
        self._broken = False
        self.closed = False

    def write(self, data) -> int:
        f = self._f
        before = f.tell()
        n = len(memoryview(data).cast("B")) if not isinstance(data, (bytes, bytearray)) else len(data)

        def once() -> int:
            pos = f.tell()
            if pos == before:
                f.write(data)
            elif pos == before + n:
                f.flush()  # the bytes are buffered; the failed part upload is pushed again
            else:  # pragma: no cover - a file that took part of the bytes cannot be repaired
                raise StorageError(f"write {self._path}: the file took {pos - before} of {n} bytes; cannot resume")
            return n

        try:
            return self._st._retry(f"write {self._path}", once)
        except BaseException:
            self._broken = True
            raise

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        pass  # fsspec files flush whole blocks by themselves; commit() publishes

    def commit(self) -> None:
        if self.closed:
            return
        if self._broken:
            self.discard()
            raise StorageError(f"write {self._path}: an earlier write failed; the object was discarded")
        f = self._f
        expected = f.tell()

        def finish() -> None:
            if getattr(f, "forced", False):
                f.forced = False  # fsspec refuses a second forced flush; a retry needs one
            if hasattr(f, "flush") and "forced" in dir(f):
                f.flush(force=True)
            f.close()

        try:
            self._st._retry(f"write {self._path}", finish)
        except BaseException:
            self._broken = True
            self.discard()
            raise
        self.closed = True
        self._st._invalidate(self._path)
        # a retried upload must not publish duplicated or missing parts
        got = self._st._retry(f"size {self._path}", lambda: self._st.fs.size(self._path))
        if got != expected:
            self.closed = False
            self.discard()
            raise StorageError(
                f"write {self._path}: the stored object has {got} bytes, {expected} were written; it was removed"
            )

    def discard(self) -> None:
        """Throw the object away (abort a multipart upload, drop buffers); never publish it."""
        if self.closed:
            return
        self.closed = True
        f = self._f
        try:
            if hasattr(f, "discard"):
                f.discard()
        except Exception:  # noqa: BLE001 - best effort, the name is removed below anyway
            pass
        try:
            # mark closed without the flush that close() would do
            f.closed = True
        except Exception:  # noqa: BLE001
            pass
        try:
            self._st.fs.rm_file(self._path)
        except Exception:  # noqa: BLE001 - usually it was never created
            pass
        self._st._invalidate(self._path)

    def close(self) -> None:
        if self.closed:
            return
        if self._broken or sys.exc_info()[0] is not None:
            self.discard()
        else:
            self.commit()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.commit()
        else:
            self.discard()
        return False


class Storage:
    """A directory (local or remote) holding one checkpoint or a tree of them."""

    #: attempts per operation (first try included) and the first backoff delay in
    #: seconds; the delay doubles per attempt, with +-25 % jitter
    retries = 5
    backoff = 0.05
    #: object-store reads above this size are cut into pieces read concurrently
    read_piece = 8 << 20
    #: threads for :meth:`read_many` (local disks, object stores)
    local_threads = 2
    remote_threads = 16
    #: local disks only: refuse to read a file whose real path (symlinks resolved)
    #: lies outside :attr:`root`.  Set by readers of checkpoints whose files are
    #: named by untrusted metadata (a distckpt index), so a symlink planted in a
    #: checkpoint cannot pull bytes from elsewhere on the machine into a tensor.
    confined = False

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        url = os.fspath(url)
        protocol = url.split("://", 1)[0] if is_url(url) else "file"
        opts = merge_options(env_storage_options(protocol), storage_options)
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
        self.retried = 0
        self._lock = threading.Lock()
        self._inside: dict[str, bool] = {}

    # ----------------------------------------------------------------- naming
    def child_url(self, name: str) -> str:
        if self.is_local and not is_url(self.url):
            return os.path.join(self.root, name)
        return self.url.rstrip("/") + "/" + name

    def sub(self, name: str) -> Storage:
        st = Storage.__new__(Storage)
        st.__dict__.update(self.__dict__)
        st._lock = threading.Lock()
        st._inside = {}
        st.root = self.path(name)
        st.url = self.child_url(name)
        st.bytes_read = 0
        st.read_requests = 0
        st.retried = 0
        return st

    def path(self, name: str) -> str:
        if self.is_local:
            return os.path.join(self.root, name)
        return posixpath.join(self.root, name)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def _check_inside(self, p: str) -> None:
        """With :attr:`confined` on a local disk: refuse ``p`` if a symlink leads it outside the root."""
        if not (self.confined and self.is_local):
            return
        ok = self._inside.get(p)
        if ok is None:
            root = os.path.realpath(self.root)
            real = os.path.realpath(p)
            ok = real == root or real.startswith(root.rstrip(os.sep) + os.sep)
            self._inside[p] = ok
        if not ok:
            raise StorageError(
                f"refusing {p}: it is a symlink (or lies below one) that leads outside the checkpoint directory "
                f"{self.root} (to {os.path.realpath(p)}); copy the file into the checkpoint instead"
            )

    # ------------------------------------------------------------- retrying
    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        delay = self.backoff
        for attempt in range(self.retries):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _transient(exc):
                    raise
                if attempt == self.retries - 1:
                    if isinstance(exc, StorageError):
                        raise
                    raise StorageError(f"{what} failed after {attempt + 1} attempt(s): {type(exc).__name__}: {exc}") from exc
                with self._lock:
                    self.retried += 1
                time.sleep(delay * random.uniform(0.75, 1.25))
                delay *= 2
        raise AssertionError("unreachable")

    # ------------------------------------------------------------- reading
    def _invalidate(self, p: str) -> None:
        """Forget cached listings of ``p`` and its parents (s3fs caches them; other processes write)."""
        if not self.is_local:
            try:
                self.fs.invalidate_cache(p)
            except Exception:  # noqa: BLE001 - caches are an optimisation
                pass

    def exists(self, name: str = "") -> bool:
        p = self.path(name) if name else self.root
        if self.is_local:
            return os.path.exists(p)
        self._invalidate(p)
        return bool(self._retry(f"exists {p}", lambda: self.fs.exists(p)))

    def isdir(self, name: str = "") -> bool:
        p = self.path(name) if name else self.root
        if self.is_local:
            return os.path.isdir(p)
        self._invalidate(p)
        return bool(self._retry(f"isdir {p}", lambda: self.fs.isdir(p)))

    def size(self, name: str) -> int:
        p = self.path(name)
        if self.is_local:
            self._check_inside(p)
            return os.path.getsize(p)
        self._invalidate(p)
        return int(self._retry(f"size {p}", lambda: self.fs.size(p)))

    def walk_files(self, name: str = "") -> list[str]:
        """Every file below ``name``, as names relative to this storage's root, sorted."""
        p = self.path(name) if name else self.root
        if self.is_local:
            out = []
            for d, _dirs, files in os.walk(p):
                for f in files:
                    out.append(os.path.relpath(os.path.join(d, f), self.root).replace(os.sep, "/"))
            return sorted(out)
        self._invalidate(p)
        try:
            found = self._retry(f"list {p}", lambda: self.fs.find(p))
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(f[len(root):] for f in found if f.startswith(root))

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
            self._check_inside(p)
            return open(p, "rb")  # noqa: SIM115 - caller closes
        return self._retry(f"open {p}", lambda: self.fs.open(p, "rb", block_size=1 << 20, cache_type="readahead"))

    def read_bytes(self, name: str, *, limit: int | None = None) -> bytes:
        """Whole small object (index, strategy, config); refuse anything above ``limit``."""
        if limit is not None:
            n = self.size(name)
            if n > limit:
                raise StorageError(f"{self.path(name)}: {n} bytes is larger than the {limit}-byte limit for this kind of file")
        p = self.path(name)
        self._check_inside(p)
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
            self._check_inside(p)

            def _local():
                fd = os.open(p, os.O_RDONLY)
                try:
                    self._pread_exact(fd, p, start, out)
                finally:
                    os.close(fd)

            self._retry(f"read {p}[{start}:{start + n}]", _local)
        else:
            data = self._retry(f"read {p}[{start}:{start + n}]", lambda: self.fs.cat_file(p, start=start, end=start + n))
            if len(data) != n:
                raise StorageError(f"{p}: file ends before byte {start + n} (truncated?)")
            out[:] = data
        self._count(n)

    @staticmethod
    def _pread_exact(fd: int, p: str, start: int, out: memoryview) -> None:
        """os.preadv into the destination buffer: no intermediate copy
        (fsspec's local file would read into a new bytes object first)."""
        n = len(out)
        got = 0
        while got < n:
            k = os.preadv(fd, [out[got:]], start + got)
            if k == 0:
                raise StorageError(f"{p}: file ends before byte {start + n} (truncated?)")
            got += k

    def _read_local_batch(self, batch: Sequence[tuple[str, int, memoryview]]) -> None:
        """Many local reads in one thread, reusing the open file while the name repeats."""
        cur_p, fd, total = None, -1, 0
        try:
            for name, start, out in batch:
                p = self.path(name)
                if p != cur_p:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    self._check_inside(p)
                    fd = self._retry(f"open {p}", functools.partial(os.open, p, os.O_RDONLY))
                    cur_p = p
                n = len(out)
                self._retry(f"read {p}[{start}:{start + n}]", functools.partial(self._pread_exact, fd, p, start, out))
                total += n
        finally:
            if fd >= 0:
                os.close(fd)
            self._count(total, len(batch))

    def read_range(self, name: str, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(name, start, memoryview(buf))
        return buf

    def read_many(self, jobs: Sequence[tuple[str, int, memoryview]], *, threads: int | None = None) -> None:
        """Run many ``read_into`` calls; concurrent (threads) on object stores.

        On object stores a read larger than :attr:`read_piece` is cut into
        pieces read in parallel (one ranged GET each), so one large tensor
        does not crawl along a single connection.  Each piece is retried on
        its own.
        """
        if not jobs:
            return
        if not self.is_local:
            piece = max(1 << 20, self.read_piece)
            cut: list[tuple[str, int, memoryview]] = []
            for name, start, out in jobs:
                n = len(out)
                if n <= piece + piece // 2:
                    cut.append((name, start, out))
                    continue
                for off in range(0, n, piece):
                    cut.append((name, start + off, out[off : off + piece]))
            jobs = cut
        workers = threads or (self.local_threads if self.is_local else self.remote_threads)
        if self.is_local and len(jobs) > 1:
            # one task per batch, not per read: a million tiny reads (a hostile or
            # very fragmented index) cost a pread each, not a thread hand-off each
            size = max(1, -(-len(jobs) // (workers * 8)))
            batches = [jobs[i : i + size] for i in range(0, len(jobs), size)]
            if len(batches) == 1 or workers == 1:
                for b in batches:
                    self._read_local_batch(b)
                return
            with ThreadPoolExecutor(max_workers=min(workers, len(batches))) as pool:
                list(pool.map(self._read_local_batch, batches))
            return
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
        """A sequential writer for a new object; finish it with :meth:`close_durable`.

        Local: a plain file, fsynced by ``close_durable``.  Elsewhere: a
        :class:`_RetryingWriter` -- writes retried, and a plain ``close()``
        after a failure discards the object instead of publishing a part.
        """
        p = self.path(name)
        if self.is_local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            return open(p, "wb", buffering=0)  # noqa: SIM115 - caller closes
        f = self._retry(f"open {p} for writing", lambda: self.fs.open(p, "wb", block_size=32 << 20))
        return _RetryingWriter(self, p, f)  # type: ignore[return-value]

    def close_durable(self, f: BinaryIO) -> None:
        """Finish a writer from :meth:`open_write`: fsync on disks, complete the upload elsewhere."""
        if isinstance(f, _RetryingWriter):
            f.commit()
            return
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
        self._invalidate(p)

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
        self._invalidate(p)

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
                    self._remove_one(p)
            except FileNotFoundError:
                pass

    def replace(self, src: str, dst: str, *, commit_last: str | None = None) -> None:
        """Move ``src`` (a file or a directory tree) to ``dst``, replacing what is there.

        Local: ``os.replace`` (atomic for files; directories are swapped with
        two renames).  Object stores have no rename: each object is copied
        server-side (each copy is atomic), ``commit_last`` (e.g. an index) is
        copied after every other object, and only then are objects of the old
        ``dst`` that the new one lacks removed -- so a committed checkpoint at
        ``dst`` stays loadable throughout.  ``src`` is removed at the end.
        """
        if self.is_local:
            s, d = self.path(src), self.path(dst)
            old = None
            if os.path.lexists(d):
                old = os.path.join(os.path.dirname(d), f".{os.path.basename(d)}.old-{uuid.uuid4().hex[:8]}")
                os.replace(d, old)
            os.replace(s, d)
            if old is not None:
                if os.path.isdir(old) and not os.path.islink(old):
                    import shutil

                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.unlink(old)
            return
        sp, dp = self.path(src), self.path(dst)
        self._invalidate(sp)
        self._invalidate(dp)
        if self.fs.isfile(sp):
            self._copy(sp, dp)
            self._invalidate(dp)
            self.remove([src])
            return
        new = self.walk_files(src)
        prefix = src.rstrip("/") + "/"
        rels = [n[len(prefix):] for n in new]
        rels.sort(key=lambda r: (commit_last is not None and r == commit_last, r))
        before: set[str] = set()
        if self.isdir(dst):
            dprefix = dst.rstrip("/") + "/"
            before = {n[len(dprefix):] for n in self.walk_files(dst)}
        elif self.exists(dst):
            self.remove([dst])
        for r in rels:
            a, b = posixpath.join(sp, r), posixpath.join(dp, r)
            self._copy(a, b)
        self._invalidate(dp)
        stale = sorted(before - set(rels))
        self.remove([posixpath.join(dst, r) for r in stale])
        self.remove([src])

    def _copy(self, a: str, b: str) -> None:
        self._retry(f"copy {a} -> {b}", lambda: self.fs.copy(a, b))

    def _remove_one(self, p: str) -> None:
        self._invalidate(p)
        if self.fs.isfile(p):
            self._retry(f"remove {p}", lambda: self.fs.rm_file(p))
        else:
            self._retry(f"remove {p}", lambda: self.fs.rm(p, recursive=True))
        self._invalidate(p)

    def rmtree(self) -> None:
        if self.is_local:
            import shutil

            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self._invalidate(self.root)
            if self.fs.exists(self.root):
                self._retry(f"remove {self.root}", lambda: self.fs.rm(self.root, recursive=True))
            self._invalidate(self.root)


def split_url(url: str) -> tuple[str, str]:
    """(parent, base name) of a local path or URL: ``memory://a/b.ckpt`` -> ``memory://a``, ``b.ckpt``."""
    if is_url(url):
        head, _, base = url.rstrip("/").rpartition("/")
        return head + ("/" if head.endswith(":/") else ""), base
    return os.path.split(os.path.abspath(url))


def open_storage(path, storage_options: dict | None = None) -> Storage:
    if isinstance(path, Storage):
        return path
    return Storage(os.fspath(path), storage_options)


#: The name the rest of the package uses (the storage package makes Store the abstract base).
Store = Storage


def find_staging_debris(store: Storage) -> list[str]:  # replaced by the storage package
    return []


class Staging:  # interim; the storage package replaces it (same interface)
    """Build an output beside DST, move it into place on success."""

    def __init__(self, dst, *, kind: str = "dir", overwrite: bool = False, storage_options: dict | None = None,
                 marker: dict | None = None):
        from .errors import DestinationExistsError

        self.dst = os.fspath(dst)
        self.kind = kind
        parent, base = split_url(self.dst)
        self.parent = open_storage(parent, storage_options)
        self.base = base
        if self.parent.exists(base) and not overwrite:
            raise DestinationExistsError(f"{self.dst} already exists; pass --overwrite to replace it")
        self.tmp_name = f".{base}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self):
        if self.kind == "file":
            self.parent.makedirs()
            self.store = self.parent
            self.name = self.tmp_name
        else:
            self.store = self.parent.sub(self.tmp_name)
            self.store.makedirs()
            self.name = ""
        return self

    def __exit__(self, et, ev, tb):
        if et is not None:
            self.parent.remove([self.tmp_name])
            return False
        self.parent.replace(self.tmp_name, self.base, commit_last="distckpt.index.json")
        return False


import contextlib  # noqa: E402
import signal  # noqa: E402


@contextlib.contextmanager
def handle_termination():  # interim; the storage package replaces it
    """SIGTERM raises KeyboardInterrupt in the main thread while the block runs (so staging cleans up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
