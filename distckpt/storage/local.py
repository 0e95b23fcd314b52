"""Local disks: real paths, pread/pwrite, fsync, atomic rename; only regular files are read.

Reads open with ``O_NONBLOCK`` and ``fstat`` the descriptor: a FIFO, socket or
device planted where a data file, index, strategy or config should be is
refused by name instead of blocking the process.  Writers check that every
byte landed (a short write is a full disk), turn ``ENOSPC``/``EDQUOT`` into one
:class:`~distckpt.errors.StorageError` naming the destination, refuse to write
through a symlink, and fsync the file and its directory on ``commit``.
:func:`replace_path` is the one "move into place": atomic for files, a
``renameat2(RENAME_EXCHANGE)`` swap for directories, and a symlink at the
destination is replaced itself, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat as stat_mod
import sys
import threading
import uuid
from collections.abc import Sequence
from typing import Any, BinaryIO, Optional

from ..errors import StorageError
from .base import Capabilities, Stat, Store, Writer, _bytes_view, is_space_error, space_error
from .urls import is_url

__all__ = ["LocalStore", "LocalWriter", "open_regular", "replace_path", "fsync_dir"]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_SMALL_WRITE = 64 << 10  # writes below this are gathered ...
_WRITE_BUFFER = 1 << 20  # ... into a buffer of this size


def _kind_of(mode: int) -> tuple[str, str]:
    if stat_mod.S_ISREG(mode):
        return "file", ""
    if stat_mod.S_ISDIR(mode):
        return "dir", "a directory"
    for test, what in (
        (stat_mod.S_ISFIFO, "a FIFO (named pipe)"),
        (stat_mod.S_ISSOCK, "a socket"),
        (stat_mod.S_ISCHR, "a character device"),
        (stat_mod.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return "other", what
    return "other", "a special file"


def open_regular(path: str, where: Optional[str] = None) -> int:
    """Open ``path`` for reading without ever blocking; refuse anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC)
    try:
        kind, what = _kind_of(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if kind != "file":
        os.close(fd)
        if kind == "dir":
            raise IsADirectoryError(errno.EISDIR, "Is a directory, not a file", where or path)
        raise StorageError(f"{where or path}: is {what}, not a regular file; refusing to read it")
    return fd


def fsync_dir(path: str) -> None:
    """fsync a directory (makes renames and new names in it durable); best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path or ".", os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pread_exact(fd: int, out: memoryview, start: int) -> int:
    """preadv into the caller's buffer (no intermediate copy); returns the bytes read (short at EOF)."""
    n, got = len(out), 0
    while got < n:
        k = os.preadv(fd, [out[got:]], start + got)
        if k == 0:
            break
        got += k
    return got


# ------------------------------------------------------------------ rename
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2_fn: Any = None
_renameat2_lock = threading.Lock()


def _renameat2() -> Any:
    global _renameat2_fn
    if _renameat2_fn is None:
        with _renameat2_lock:
            fn: Any = False
            if sys.platform.startswith("linux"):
                try:
                    import ctypes

                    fn = ctypes.CDLL(None, use_errno=True).renameat2
                    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                    fn.restype = ctypes.c_int
                except (OSError, AttributeError, ImportError):
                    fn = False
            _renameat2_fn = fn
    return _renameat2_fn


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (any types); False when the kernel or file system cannot."""
    fn = _renameat2()
    if not fn:
        return False
    import ctypes

    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, getattr(errno, "EOPNOTSUPP", errno.EINVAL)):
        return False
    raise OSError(e, os.strerror(e), a, None, b)


def _delete_path(p: str) -> None:
    """Remove a file, a symlink (itself) or a directory tree; absent is fine."""
    try:
        if os.path.islink(p) or not os.path.isdir(p):
            os.unlink(p)
        else:
            shutil.rmtree(p)
    except FileNotFoundError:
        pass


def _real_dir(p: str) -> bool:
    return os.path.isdir(p) and not os.path.islink(p)


def replace_path(src: str, dst: str) -> None:
    """Move ``src`` onto ``dst`` atomically; a ``dst`` that is a symlink is replaced itself.

    A file over a file or a symlink: one ``rename``.  A directory on either
    side: ``renameat2(RENAME_EXCHANGE)`` swaps the two in one step, then what
    was at ``dst`` (now at ``src``) is deleted -- a symlink by unlinking it.
    Without ``renameat2`` (old kernels, some file systems): two renames through
    ``.{dst}.old-{id}``, undone if the second fails.
    """
    parent = os.path.dirname(dst)
    if not os.path.lexists(dst) or (not _real_dir(src) and not _real_dir(dst)):
        os.replace(src, dst)
        fsync_dir(parent)
        return
    if _exchange(src, dst):
        fsync_dir(parent)
        with contextlib.suppress(OSError):
            _delete_path(src)
        return
    old = os.path.join(parent, f".{os.path.basename(dst)}.old-{uuid.uuid4().hex[:12]}")
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    fsync_dir(parent)
    with contextlib.suppress(OSError):
        _delete_path(old)


# ------------------------------------------------------------------ writer
class LocalWriter(Writer):
    """A new local file: buffered small writes, every byte checked, fsync + size check on commit."""

    def __init__(self, path: str, where: str, *, resume_at: Optional[int] = None, sync_dir: bool = True):
        self.key, self.where, self._sync_dir = path, where, sync_dir
        self._resumable = resume_at is not None
        flags = os.O_WRONLY | os.O_CREAT | _O_CLOEXEC | _O_NOFOLLOW | _O_NONBLOCK
        if resume_at is None:
            flags |= os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise self._error(exc, "open") from exc
        try:
            st = os.fstat(fd)
            kind, what = _kind_of(st.st_mode)
            if kind != "file":
                raise StorageError(f"{where}: is {what}, not a regular file; refusing to write to it")
            if resume_at is not None:
                if not 0 <= resume_at <= st.st_size:
                    raise StorageError(f"{where}: cannot resume at byte {resume_at}; the file has {st.st_size} bytes")
                os.ftruncate(fd, resume_at)
                os.lseek(fd, resume_at, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._pos = self._end = resume_at or 0
        self._buf = bytearray()
        self._state = "open"
        self._lock = threading.Lock()

    def _error(self, exc: OSError, what: str) -> StorageError:
        if is_space_error(exc):
            return space_error(self.where, exc)
        if exc.errno == errno.ELOOP:
            return StorageError(f"{self.where}: is a symlink; refusing to write through it")
        if exc.errno == errno.ENXIO:  # a FIFO without a reader (O_NONBLOCK), or a device
            try:
                what = _kind_of(os.stat(self.key).st_mode)[1]
            except OSError:
                what = "a FIFO or a device"
            return StorageError(f"{self.where}: is {what}, not a regular file; refusing to write to it")
        err = StorageError(f"{what} {self.where}: {exc.strerror or exc}")
        err.errno = exc.errno
        return err

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"write {self.where}: the writer is {self._state}")

    def _write_all(self, mv: memoryview) -> None:
        off, n = 0, len(mv)
        while off < n:
            try:
                k = os.write(self._fd, mv[off:])
            except OSError as exc:
                raise self._error(exc, "write") from exc
            if k <= 0:  # the kernel took nothing: the file system is full
                raise space_error(self.where)
            off += k

    def _drain(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._write_all(memoryview(buf))

    def write(self, data: Any) -> int:
        self._check_open()
        mv = _bytes_view(data)
        n = len(mv)
        try:
            if n < _SMALL_WRITE:
                self._buf += mv
                if len(self._buf) >= _WRITE_BUFFER:
                    self._drain()
            else:
                self._drain()
                self._write_all(mv)
        except BaseException:
            self._state = "broken"
            raise
        self._pos += n
        return n

    def write_at(self, offset: int, data: Any) -> int:
        """pwrite ``data`` at ``offset`` (thread-safe; does not move :meth:`tell`)."""
        self._check_open()
        mv = _bytes_view(data)
        off, n = 0, len(mv)
        try:
            while off < n:
                try:
                    k = os.pwrite(self._fd, mv[off:], offset + off)
                except OSError as exc:
                    raise self._error(exc, "write") from exc
                if k <= 0:
                    raise space_error(self.where)
                off += k
        except BaseException:
            self._state = "broken"
            raise
        with self._lock:
            self._end = max(self._end, offset + n)
        return n

    def tell(self) -> int:
        return self._pos

    @property
    def closed(self) -> bool:
        return self._state != "open"

    def commit(self) -> None:
        if self._state == "committed":
            return
        if self._state != "open":
            self.abort()
            raise StorageError(f"write {self.where}: an earlier write failed; the file was not kept")
        try:
            self._drain()
            try:
                os.fsync(self._fd)
                size = os.fstat(self._fd).st_size
            except OSError as exc:
                raise self._error(exc, "fsync") from exc
            want = max(self._pos, self._end)
            if size != want:
                raise StorageError(f"write {self.where}: the file has {size} bytes after {want} were written")
            os.close(self._fd)
        except BaseException:
            self._state = "broken"
            self.abort()
            raise
        self._state = "committed"
        if self._sync_dir:
            fsync_dir(os.path.dirname(self.key))

    def abort(self) -> None:
        if self._state in ("committed", "aborted"):
            return
        was_open = self._state == "open"
        self._state = "aborted"
        if self._resumable and was_open:
            with contextlib.suppress(OSError, StorageError):
                self._drain()
                os.fsync(self._fd)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if not self._resumable:
            with contextlib.suppress(OSError):
                os.unlink(self.key)


# ------------------------------------------------------------------ store
class LocalStore(Store):
    """A directory on a local disk (a plain path or ``file://``)."""

    caps = Capabilities(
        local=True,
        atomic_rename=True,
        random_write=True,
        server_copy=False,
        per_request=20e-6,
        per_byte=1 / 2e9,
        concurrency=2,
    )

    def __init__(self, url: str, storage_options: Optional[dict[str, Any]] = None):
        url = os.fspath(url)
        path = url
        for prefix in ("file://", "local://"):
            if url.startswith(prefix):
                path = url[len(prefix) :]
        root = os.path.abspath(path).rstrip(os.sep) or os.sep
        super().__init__(url, root, dict(storage_options or {}))

    def _key(self, name: str) -> str:
        return os.path.join(self.root, name) if name else self.root

    def child_url(self, name: str) -> str:
        if not name:
            return self.url if is_url(self.url) else self.root
        if not is_url(self.url):
            return os.path.join(self.root, name)
        return self.url.rstrip("/") + "/" + name

    # primitives
    def _stat(self, key: str) -> Optional[Stat]:
        try:
            st = os.stat(key)
        except (FileNotFoundError, NotADirectoryError):
            return None
        kind, what = _kind_of(st.st_mode)
        return Stat(kind, st.st_size if kind == "file" else 0, what)

    def _scan(self, key: str) -> dict[str, bool]:
        try:
            with os.scandir(key) as it:
                return {e.name: e.is_dir() for e in it}
        except FileNotFoundError:
            return {}

    def _read_into(self, key: str, start: int, out: memoryview) -> int:
        fd = open_regular(key)
        try:
            return _pread_exact(fd, out, start)
        finally:
            os.close(fd)

    def _writer(self, key: str, where: str, resume_at: Optional[int]) -> Writer:
        try:
            os.makedirs(os.path.dirname(key), exist_ok=True)
        except OSError as exc:
            if is_space_error(exc):
                raise space_error(where, exc) from exc
            raise
        return LocalWriter(key, where, resume_at=resume_at)

    def _put_atomic(self, key: str, data: Any) -> None:
        d = os.path.dirname(key)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(key)}.tmp-{uuid.uuid4().hex[:12]}")
        w = LocalWriter(tmp, key, sync_dir=False)
        try:
            w.write(data)
            w.commit()
            os.replace(tmp, key)
        except BaseException:
            w.abort()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(d)

    def _delete(self, key: str) -> None:
        _delete_path(key)

    # optional hooks
    def _rename(self, src: str, dst: str) -> None:
        replace_path(src, dst)

    def _makedirs(self, key: str) -> None:
        os.makedirs(key, exist_ok=True)

    def _walk(self, key: str) -> Optional[list[str]]:
        out = []
        for d, _dirs, files in os.walk(key):
            for f in files:
                out.append(os.path.relpath(os.path.join(d, f), self.root).replace(os.sep, "/"))
        return out

    def _read_all(self, key: str, where: str, limit: Optional[int]) -> Optional[bytes]:
        fd = open_regular(key, where)
        try:
            n = os.fstat(fd).st_size
            if limit is not None and n > limit:
                raise self._too_large(where, n, limit)
            buf = bytearray(n)
            got = _pread_exact(fd, memoryview(buf), 0)
            return bytes(buf[:got])
        finally:
            os.close(fd)

    def _open_read(self, key: str, where: str) -> Optional[BinaryIO]:
        fd = open_regular(key, where)
        return os.fdopen(fd, "rb")

    def _read_batch(self, batch: Sequence[tuple[str, int, memoryview]]) -> None:
        """Many reads in one thread, reusing the open file while the name repeats."""
        cur, fd, total, count = None, -1, 0, 0
        try:
            for name, start, out in batch:
                key, where = self._key(name), self.child_url(name)
                if key != cur:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    self._check_inside(key)
                    fd = self._call(f"open {where}", functools.partial(open_regular, key, where))
                    cur = key
                n = len(out)
                got = self._call(f"read {where}[{start}:{start + n}]", functools.partial(_pread_exact, fd, out, start))
                if got != n:
                    raise StorageError(f"{where}: file ends before byte {start + n} (truncated?)")
                total += n
                count += 1
        finally:
            if fd >= 0:
                os.close(fd)
            self._count(total, count)
