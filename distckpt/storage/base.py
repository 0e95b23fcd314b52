"""The abstract :class:`Store`: six primitives a backend implements, everything else derived here.

A backend (``local.py``, ``fsspec.py``, ``http.py``) subclasses :class:`Store`,
declares its :class:`Capabilities` and implements these primitives on *keys*
(``self._key(name)``: a real path on a local disk, ``bucket/prefix/name`` on an
object store, a URL over HTTP):

==========================================  =====================================================
``_stat(key) -> Stat | None``               kind (file, dir, other) and size; None when absent
``_scan(key) -> dict[str, bool]``           one directory level: base name -> is a directory
``_read_into(key, start, out) -> int``      ranged read into a caller buffer; returns the bytes
                                            read (fewer only at the end of the file)
``_writer(key, where, resume_at)``          a sequential :class:`Writer` (every byte checked,
                                            ``commit`` durable and size-checked, ``abort``)
``_put_atomic(key, data)``                  the whole object or nothing (tmp + rename, one PUT)
``_delete(key)``                            a file or a tree; absent is fine; a symlink itself
==========================================  =====================================================

Optional: ``_rename`` (``caps.atomic_rename``), ``_copy`` (``caps.server_copy``),
``_makedirs``, ``_walk``, ``_read_all``, ``_open_read``, ``_read_batch``,
``_open_stream``, ``_invalidate``, ``close``.

The public methods (the names callers use: ``exists``, ``size``, ``listdir``,
``read_bytes``, ``read_into``, ``read_many``, ``open_write``, ``put_atomic``,
``replace``, ...) live on this class only, so a test can wrap one method for
every backend.  They run each primitive through the store's one
:class:`~distckpt.storage.retry.RetryPolicy` (``_call``), count the bytes and
requests read, refuse non-regular files and, with :attr:`Store.confined`, files
a symlink leads outside the root.
"""

from __future__ import annotations

import copy
import errno
import functools
import io
import os
import posixpath
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, ClassVar, Optional, TypeVar

from ..errors import StorageError
from .retry import RetryPolicy
from .urls import protocol_of

__all__ = [
    "Capabilities",
    "Stat",
    "Stream",
    "Writer",
    "Store",
    "space_error",
    "staged_destination",
    "is_space_error",
    "TMP_NAME_RE",
    "STREAM_BLOCK",
]

T = TypeVar("T")

#: a temporary place beside a destination: ``.{base}.tmp-{hex id}`` (Staging, put_atomic)
TMP_NAME_RE = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<id>[0-9a-f]{8,32})$")
#: bytes per block of :meth:`Store.open_stream`
STREAM_BLOCK = 8 << 20
_SPACE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; callers choose strategies from these, never from the class.

    ``local``: names are real paths on this machine (``path()``, ``os`` calls, mmap).
    ``atomic_rename``: ``replace`` is one rename (POSIX), else server-side copies.
    ``random_write``: writers accept ``write_at(offset, data)`` (pwrite).
    ``server_copy``: objects are copied without passing through this process.
    ``listing`` / ``writable``: directories can be listed / the store accepts writes.
    ``per_request`` / ``per_byte``: seconds per request and per byte (a read cost model).
    ``concurrency``: useful parallel requests for :meth:`Store.read_many`.
    """

    local: bool
    atomic_rename: bool
    random_write: bool
    server_copy: bool
    listing: bool = True
    writable: bool = True
    per_request: float = 5e-3
    per_byte: float = 1 / 2e8
    concurrency: int = 16

    def __post_init__(self) -> None:
        if self.per_request < 0 or self.per_byte < 0 or self.concurrency < 1:
            raise ValueError(f"invalid capabilities {self!r}: costs must be >= 0 and concurrency >= 1")


@dataclass(frozen=True)
class Stat:
    """``kind`` is ``"file"`` (a regular file / object), ``"dir"`` or ``"other"`` (FIFO, socket, device)."""

    kind: str
    size: int
    what: str = ""  # for "other": "a FIFO (named pipe)", "a socket", ...

    def __post_init__(self) -> None:
        if self.kind not in ("file", "dir", "other"):
            raise ValueError(f"Stat.kind must be file, dir or other, not {self.kind!r}")


@dataclass
class Stream:
    """A file read from ``start`` on, in blocks (``chunks``); ``total`` is its whole size when known.

    ``start`` may be 0 although a later offset was asked for: the server sent the whole file.
    """

    start: int
    total: Optional[int]
    chunks: Iterator[bytes]
    close: Callable[[], None] = field(default=lambda: None)


def staged_destination(where: str) -> Optional[str]:
    """The destination a temporary place stands for: ``d/.m.ckpt.tmp-1a2b3c4d/x`` -> ``d/m.ckpt``.

    The outermost temporary component wins, and nested temporary names unwrap
    (``d/..m.ckpt.tmp-1a2b3c4d.tmp-5e6f7a8b`` -> ``d/m.ckpt``).
    """
    parts = where.split("/")
    for i, part in enumerate(parts):
        m = TMP_NAME_RE.match(part)
        if not m:
            continue
        while m:
            part = m.group("base")
            m = TMP_NAME_RE.match(part)
        return "/".join(parts[:i] + [part])
    return None


def is_space_error(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT (the disk is full or the quota is used up)."""
    return isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS


def space_error(where: str, exc: Optional[BaseException] = None) -> StorageError:
    """One clear error for a full disk or quota, naming the destination (not its temp name)."""
    dst = staged_destination(where)
    target = f"{dst} (while writing its temporary copy {where})" if dst else where
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "No space left on device"
    err = StorageError(
        f"not enough space to write {target}: {why}; free some space (or raise the quota) there, "
        f"or write the output somewhere else"
    )
    err.errno = exc.errno if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS else errno.ENOSPC
    return err


class Writer:
    """A sequential writer for one new object.

    ``write`` takes every byte or raises; ``commit`` makes the object durable
    (fsync / the final upload), checks its stored size and publishes it;
    ``abort`` (also ``close`` without a commit, and leaving a ``with`` block by
    an exception) removes it -- a writer never publishes a partial object.
    """

    where: str

    def write(self, data: Any) -> int:
        raise NotImplementedError

    def write_at(self, offset: int, data: Any) -> int:
        """Write at ``offset`` (pwrite); only where ``caps.random_write``."""
        raise StorageError(f"{self.where}: this store writes sequentially only (no random writes)")

    def tell(self) -> int:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def flush(self) -> None:
        """A no-op: ``commit`` publishes; kept so writers pass for file objects."""

    def close(self) -> None:
        """Abort unless committed (never publishes); ``abort`` after ``commit`` does nothing."""
        self.abort()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            self.commit()
        else:
            self.abort()


def _bytes_view(data: Any) -> memoryview:
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over :meth:`Store.read_into` (counted, retried)."""

    def __init__(self, store: Store, name: str, size: int):
        self._store, self._name, self._size, self._pos = store, name, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        mv = _bytes_view(b)
        n = max(0, min(len(mv), self._size - self._pos))
        if n:
            self._store.read_into(self._name, self._pos, mv[:n])
            self._pos += n
        return n


class Store:
    """A directory (local or remote) holding one checkpoint or a tree of them."""

    caps: ClassVar[Capabilities]
    #: the retry policy's knobs: attempts per operation (first try included) and the first
    #: backoff in seconds (doubling per attempt, +-25 % jitter); ``retry_policy`` overrides both
    retries = 5
    backoff = 0.05
    retry_policy: Optional[RetryPolicy] = None
    #: object-store reads above this size are cut into pieces read concurrently
    read_piece = 8 << 20
    #: threads for :meth:`read_many` (local disks, other stores)
    local_threads = 2
    remote_threads = 16
    #: local disks only: refuse to read a file whose real path (symlinks resolved)
    #: lies outside :attr:`root`.  Set by readers of checkpoints whose files are
    #: named by untrusted metadata (a distckpt index), so a symlink planted in a
    #: checkpoint cannot pull bytes from elsewhere on the machine into a tensor.
    confined = False

    def __init__(self, url: str, root: str, storage_options: dict[str, Any]):
        self.url = url
        self.root = root
        self.storage_options = storage_options
        self.protocol = protocol_of(url)
        self.bytes_read = 0
        self.read_requests = 0
        self.retried = 0
        self._lock = threading.Lock()
        self._inside: dict[str, bool] = {}

    # ------------------------------------------------------------ primitives
    def _stat(self, key: str) -> Optional[Stat]:
        raise NotImplementedError

    def _scan(self, key: str) -> dict[str, bool]:
        raise NotImplementedError

    def _read_into(self, key: str, start: int, out: memoryview) -> int:
        raise NotImplementedError

    def _writer(self, key: str, where: str, resume_at: Optional[int]) -> Writer:
        raise NotImplementedError

    def _put_atomic(self, key: str, data: Any) -> None:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        raise NotImplementedError

    # ----------------------------------------------------- optional hooks
    def _rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def _copy(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def _makedirs(self, key: str) -> None:
        """Directories are implicit on object stores."""

    def _walk(self, key: str) -> Optional[list[str]]:
        """Every file below ``key`` as names relative to the root, or None to recurse with ``_scan``."""
        return None

    def _read_all(self, key: str, where: str, limit: Optional[int]) -> Optional[bytes]:
        """A whole small file in one request, or None to use ``_stat`` + ``_read_into``."""
        return None

    def _open_read(self, key: str, where: str) -> Optional[BinaryIO]:
        return None

    def _read_batch(self, batch: Sequence[tuple[str, int, memoryview]]) -> None:
        for name, start, out in batch:
            self.read_into(name, start, out)

    def _open_stream(self, key: str, where: str, offset: int, block: int) -> Optional[Stream]:
        return None

    def _invalidate(self, key: str) -> None:
        """Forget cached listings of ``key`` (object stores cache them; other processes write)."""

    def close(self) -> None:
        """Release connections (HTTP sessions); the store stays usable."""

    # ---------------------------------------------------------------- naming
    @property
    def is_local(self) -> bool:
        return self.caps.local

    def _key(self, name: str) -> str:
        return posixpath.join(self.root, name) if name else self.root

    def path(self, name: str = "") -> str:
        """The real file system path of ``name``; local stores only."""
        if not self.caps.local:
            raise StorageError(f"{self.url} is not on a local disk: it has no file system path")
        return self._key(name)

    def child_url(self, name: str) -> str:
        return self.url.rstrip("/") + "/" + name if name else self.url

    def sub(self, name: str) -> Store:
        """The store rooted at ``name`` (fresh counters; options and backend shared)."""
        st = copy.copy(self)
        st._lock = threading.Lock()
        st._inside = {}
        st.root = self._key(name)
        st.url = self.child_url(name)
        st.bytes_read = st.read_requests = st.retried = 0
        return st

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -------------------------------------------------------------- helpers
    @property
    def policy(self) -> RetryPolicy:
        return self.retry_policy or RetryPolicy(attempts=self.retries, first_delay=self.backoff)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self.policy.call(what, fn, on_retry=self._count_retry)

    def _count_retry(self, exc: BaseException) -> None:
        with self._lock:
            self.retried += 1

    def _count(self, n: int, requests: int = 1) -> None:
        with self._lock:
            self.bytes_read += n
            self.read_requests += requests

    def _check_inside(self, key: str) -> None:
        """With :attr:`confined` on a local disk: refuse ``key`` if a symlink leads it outside the root."""
        if not (self.confined and self.caps.local):
            return
        ok = self._inside.get(key)
        if ok is None:
            root = os.path.realpath(self.root)
            real = os.path.realpath(key)
            ok = real == root or real.startswith(root.rstrip(os.sep) + os.sep)
            self._inside[key] = ok
        if not ok:
            raise StorageError(
                f"refusing {key}: it is a symlink (or lies below one) that leads outside the checkpoint directory "
                f"{self.root} (to {os.path.realpath(key)}); copy the file into the checkpoint instead"
            )

    def _need_write(self, what: str) -> None:
        if not self.caps.writable:
            raise StorageError(f"{self.url}: this store is read-only; cannot {what}")

    def _too_large(self, where: str, n: int, limit: int) -> StorageError:
        return StorageError(f"{where}: {n} bytes is larger than the {limit}-byte limit for this kind of file")

    @staticmethod
    def _not_found(where: str) -> FileNotFoundError:
        return FileNotFoundError(errno.ENOENT, "No such file or directory", where)

    def stat(self, name: str = "") -> Optional[Stat]:
        """What ``name`` is (file, dir, other) and its size, or None when absent."""
        k = self._key(name)
        return self._call(f"stat {self.child_url(name)}", lambda: self._stat(k))

    def _file_stat(self, name: str) -> Stat:
        """The stat of a regular file: FileNotFoundError when absent, IsADirectoryError for a
        directory, StorageError for anything else (a FIFO, a socket, a device)."""
        where = self.child_url(name)
        st = self.stat(name)
        if st is None:
            raise self._not_found(where)
        if st.kind == "dir":
            raise IsADirectoryError(errno.EISDIR, "Is a directory, not a file", where)
        if st.kind != "file":
            raise StorageError(f"{where}: is {st.what or 'not a regular file'}, not a regular file; refusing to read it")
        return st

    # -------------------------------------------------------------- reading
    def exists(self, name: str = "") -> bool:
        return self.stat(name) is not None

    def isdir(self, name: str = "") -> bool:
        st = self.stat(name)
        return st is not None and st.kind == "dir"

    def size(self, name: str) -> int:
        """Bytes of the regular file ``name`` (FileNotFoundError when absent)."""
        self._check_inside(self._key(name))
        return self._file_stat(name).size

    def listdir(self, name: str = "") -> list[str]:
        """Base names directly under ``name`` (files and directories), sorted; [] when absent."""
        if not self.caps.listing:
            raise StorageError(
                f"{self.child_url(name)}: {self.protocol}:// has no directory listing; "
                f"name a single file, or publish the checkpoint on a file system or object store"
            )
        k = self._key(name)
        return sorted(self._call(f"list {self.child_url(name)}", lambda: self._scan(k)))

    def walk_files(self, name: str = "") -> list[str]:
        """Every file below ``name``, as names relative to this store's root, sorted."""
        k = self._key(name)
        found = self._call(f"list {self.child_url(name)}", lambda: self._walk(k))
        if found is not None:
            return sorted(found)
        out: list[str] = []
        stack = [name]
        while stack:
            d = stack.pop()
            for base, is_dir in self._call(f"list {self.child_url(d)}", functools.partial(self._scan, self._key(d))).items():
                rel = f"{d}/{base}" if d else base
                (stack if is_dir else out).append(rel)
        return sorted(out)

    def read_bytes(self, name: str, *, limit: Optional[int] = None) -> bytes:
        """A whole small regular file (index, strategy, config); refuse anything above ``limit`` bytes."""
        k, where = self._key(name), self.child_url(name)
        self._check_inside(k)
        data = self._call(f"read {where}", lambda: self._read_all(k, where, limit))
        if data is not None:
            self._count(len(data))
            return data
        n = self._file_stat(name).size
        if limit is not None and n > limit:
            raise self._too_large(where, n, limit)
        buf = bytearray(n)
        self.read_into(name, 0, memoryview(buf))
        return bytes(buf)

    def read_into(self, name: str, start: int, out: Any) -> None:
        """Read exactly ``len(out)`` bytes at ``start`` into ``out`` (no extra copy on local disks)."""
        mv = _bytes_view(out)
        n = len(mv)
        k, where = self._key(name), self.child_url(name)
        self._check_inside(k)
        got = self._call(f"read {where}[{start}:{start + n}]", lambda: self._read_into(k, start, mv))
        if got != n:
            raise StorageError(f"{where}: file ends before byte {start + n} (truncated?)")
        self._count(n)

    def read_range(self, name: str, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(name, start, memoryview(buf))
        return buf

    def read_many(self, jobs: Sequence[tuple[str, int, Any]], *, threads: Optional[int] = None) -> None:
        """Run many ``read_into`` calls: batched per thread on local disks, concurrent elsewhere.

        On other stores a read larger than :attr:`read_piece` is cut into pieces
        read in parallel (one ranged GET each, each retried on its own), so one
        large tensor does not crawl along a single connection.
        """
        if not jobs:
            return
        work = [(name, start, _bytes_view(out)) for name, start, out in jobs]
        workers = threads or (self.local_threads if self.caps.local else self.remote_threads)
        if self.caps.local:
            # one task per batch, not per read: a million tiny reads (a hostile or
            # very fragmented index) cost a pread each, not a thread hand-off each
            size = max(1, -(-len(work) // (workers * 8)))
            batches = [work[i : i + size] for i in range(0, len(work), size)]
            if len(batches) == 1 or workers == 1:
                for b in batches:
                    self._read_batch(b)
                return
            with ThreadPoolExecutor(max_workers=min(workers, len(batches))) as pool:
                list(pool.map(self._read_batch, batches))
            return
        piece = max(1 << 20, self.read_piece)
        cut: list[tuple[str, int, memoryview]] = []
        for name, start, mv in work:
            n = len(mv)
            if n <= piece + piece // 2:
                cut.append((name, start, mv))
                continue
            for off in range(0, n, piece):
                cut.append((name, start + off, mv[off : off + piece]))
        if len(cut) == 1 or workers == 1:
            for name, start, mv in cut:
                self.read_into(name, start, mv)
            return
        with ThreadPoolExecutor(max_workers=min(workers, len(cut))) as pool:
            list(pool.map(lambda j: self.read_into(*j), cut))

    def open_read(self, name: str) -> BinaryIO:
        """A seekable binary file over ``name`` (a regular file); the caller closes it."""
        k, where = self._key(name), self.child_url(name)
        self._check_inside(k)
        f = self._call(f"open {where}", lambda: self._open_read(k, where))
        if f is not None:
            return f
        size = self._file_stat(name).size
        return io.BufferedReader(_RangeFile(self, name, size), buffer_size=1 << 20)  # type: ignore[return-value]

    def open_stream(self, name: str, offset: int = 0, *, block: int = STREAM_BLOCK) -> Stream:
        """``name`` from byte ``offset`` on, in blocks (downloads); ``Stream.start`` says where it starts.

        FileNotFoundError when absent.  An ``offset`` past the end starts again at 0.
        """
        k, where = self._key(name), self.child_url(name)
        self._check_inside(k)
        s = self._call(f"open {where}", lambda: self._open_stream(k, where, offset, block))
        if s is not None:
            return s
        size = self._file_stat(name).size
        start = offset if 0 <= offset <= size else 0

        def chunks() -> Iterator[bytes]:
            pos = start
            while pos < size:
                buf = bytearray(min(block, size - pos))
                self.read_into(name, pos, memoryview(buf))
                pos += len(buf)
                yield bytes(buf)

        return Stream(start=start, total=size, chunks=chunks())

    # -------------------------------------------------------------- writing
    def makedirs(self, name: str = "") -> None:
        self._need_write("create directories")
        k = self._key(name)
        self._call(f"mkdir {self.child_url(name)}", lambda: self._makedirs(k))

    def open_write(self, name: str, *, resume_at: Optional[int] = None) -> Writer:
        """A sequential :class:`Writer` for a new object; finish it with ``commit()``.

        ``resume_at`` (local stores): keep the first ``resume_at`` bytes of an
        existing file and continue after them; ``abort`` then keeps what was
        written, so a later writer can resume (downloads).
        """
        self._need_write("write")
        if resume_at is not None and not self.caps.random_write:
            raise StorageError(f"{self.child_url(name)}: this store cannot resume a partial file")
        k, where = self._key(name), self.child_url(name)
        return self._call(f"open {where} for writing", lambda: self._writer(k, where, resume_at))

    def close_durable(self, f: Any) -> None:
        """Finish a writer from :meth:`open_write` (compat name for ``f.commit()``)."""
        f.commit()
        self._invalidate(getattr(f, "key", self.root))

    def put(self, name: str, data: Any) -> None:
        """Write a whole object through a writer (every byte checked, durable)."""
        w = self.open_write(name)
        try:
            w.write(data)
            w.commit()
        except BaseException:
            w.abort()
            raise
        self._invalidate(self._key(name))

    def put_atomic(self, name: str, data: Any) -> None:
        """Commit: readers see the old object or the new one, never a part.

        POSIX: write a temp file beside it, fsync it, rename over, fsync the dir.
        Object stores: one PUT of the whole object (S3 PUTs are atomic).
        """
        self._need_write("write")
        k = self._key(name)
        self._call(f"commit {self.child_url(name)}", lambda: self._put_atomic(k, data))
        self._invalidate(k)

    def remove(self, names: Iterable[str]) -> None:
        """Delete files or trees; absent names are fine; a symlink is removed itself, never followed."""
        self._need_write("remove")
        for name in names:
            k = self._key(name)
            self._call(f"remove {self.child_url(name)}", functools.partial(self._delete, k))
            self._invalidate(k)

    def rmtree(self) -> None:
        """Delete this store's root and everything below it."""
        self._need_write("remove")
        self._call(f"remove {self.url}", lambda: self._delete(self.root))
        self._invalidate(self.root)

    def replace(self, src: str, dst: str, *, commit_last: Optional[str] = None) -> None:
        """Move ``src`` (a file or a directory tree) to ``dst``, replacing what is there.

        With ``caps.atomic_rename`` (POSIX): one atomic rename; a ``dst`` that is a
        symlink is replaced itself, never followed; a directory is swapped in
        atomically (``renameat2(RENAME_EXCHANGE)``) and the old one deleted.
        Object stores have no rename: each object is copied server-side (each
        copy is atomic), ``commit_last`` (e.g. an index) after every other
        object, and only then are objects of the old ``dst`` that the new one
        lacks removed -- so a committed checkpoint at ``dst`` stays loadable
        throughout.  ``src`` is removed at the end.
        """
        self._need_write("move")
        ks, kd = self._key(src), self._key(dst)
        if self.caps.atomic_rename:
            self._rename(ks, kd)  # not retried: a rename that may have happened is not repeatable
            return
        if not self.caps.server_copy:
            raise StorageError(f"{self.url}: this store can neither rename nor copy objects")
        self._invalidate(ks)
        self._invalidate(kd)
        st = self.stat(src)
        if st is None:
            raise self._not_found(self.child_url(src))
        if st.kind == "file":
            if self.isdir(dst):
                self.remove([dst])
            self._call(f"copy {self.child_url(src)} -> {self.child_url(dst)}", lambda: self._copy(ks, kd))
            self._invalidate(kd)
            self.remove([src])
            return
        prefix = src.rstrip("/") + "/"
        rels = [n[len(prefix) :] for n in self.walk_files(src)]
        rels.sort(key=lambda r: (commit_last is not None and r == commit_last, r))
        before: set[str] = set()
        dst_st = self.stat(dst)
        if dst_st is not None and dst_st.kind == "dir":
            dprefix = dst.rstrip("/") + "/"
            before = {n[len(dprefix) :] for n in self.walk_files(dst)}
        elif dst_st is not None:
            self.remove([dst])
        for r in rels:
            a, b = posixpath.join(ks, r), posixpath.join(kd, r)
            self._call(f"copy {a} -> {b}", functools.partial(self._copy, a, b))
        self._invalidate(kd)
        self.remove([posixpath.join(dst, r) for r in sorted(before - set(rels))])
        self.remove([src])
