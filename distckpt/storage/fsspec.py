"""Object stores and every other fsspec URL (``s3://``, ``memory://``, ``gs://``, ...).

* writers are :class:`FsspecWriter`: each write is retried with the store's
  policy, checked to have moved the file position by exactly its size, the
  object is published whole by ``commit`` (and its stored size checked), and a
  writer abandoned by an exception is discarded, never published half-written;
* there is no rename: :meth:`~distckpt.storage.base.Store.replace` copies object
  by object (server-side), the commit object last, and drops stale objects only
  afterwards;
* listings and stats bypass the listing cache (s3fs caches; other ranks and
  processes write too).
"""

from __future__ import annotations

import contextlib
import posixpath
from typing import Any, Optional

from ..errors import StorageError
from .base import Capabilities, Stat, Store, Writer, _bytes_view
from .urls import env_storage_options, merge_options, protocol_of

__all__ = ["FsspecStore", "FsspecWriter"]


class FsspecWriter(Writer):
    """A sequential writer on an object store (or any non-local fsspec file).

    * each ``write`` is retried when it fails transiently: if the file did not
      take the bytes (its position did not move) the write is repeated,
      otherwise the buffered bytes are pushed again with ``flush`` (a part
      upload is idempotent);
    * :meth:`commit` finishes the object (the final flush, retried; S3 makes a
      multipart object visible only then, whole) and checks its stored size;
    * :meth:`abort` discards the object (aborts a multipart upload, drops
      buffers) instead of publishing a partial one.
    """

    def __init__(self, store: FsspecStore, key: str, where: str, f: Any):
        self._st, self.key, self.where, self._f = store, key, where, f
        self._state = "open"

    @property
    def closed(self) -> bool:
        return self._state != "open"

    def write(self, data: Any) -> int:
        if self._state != "open":
            raise StorageError(f"write {self.where}: the writer is {self._state}")
        f = self._f
        mv = _bytes_view(data)
        n = len(mv)
        before = f.tell()

        def once() -> int:
            pos = f.tell()
            if pos == before:
                f.write(mv)
            elif pos == before + n:
                f.flush()  # the bytes are buffered; the failed part upload is pushed again
            if f.tell() != before + n:
                raise StorageError(f"write {self.where}: the file took {f.tell() - before} of {n} bytes; cannot resume")
            return n

        try:
            return self._st._call(f"write {self.where}", once)
        except BaseException:
            self._state = "broken"
            raise

    def tell(self) -> int:
        return int(self._f.tell())

    def commit(self) -> None:
        if self._state == "committed":
            return
        if self._state != "open":
            self.abort()
            raise StorageError(f"write {self.where}: an earlier write failed; the object was discarded")
        f = self._f
        expected = f.tell()

        def finish() -> None:
            if getattr(f, "forced", False):
                f.forced = False  # fsspec refuses a second forced flush; a retry needs one
            if hasattr(f, "flush") and "forced" in dir(f):
                f.flush(force=True)
            f.close()

        try:
            self._st._call(f"write {self.where}", finish)
            self._st._invalidate(self.key)
            # a retried upload must not publish duplicated or missing parts
            got = self._st._call(f"size {self.where}", lambda: self._st._fs.size(self.key))
            if got != expected:
                raise StorageError(
                    f"write {self.where}: the stored object has {got} bytes, {expected} were written; it was removed"
                )
        except BaseException:
            self._state = "broken"
            self.abort()
            raise
        self._state = "committed"

    def abort(self) -> None:
        """Throw the object away; never publish it."""
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborted"
        f = self._f
        with contextlib.suppress(Exception):
            if hasattr(f, "discard"):
                f.discard()
        with contextlib.suppress(Exception):
            f.closed = True  # closed without the flush that close() would do
        with contextlib.suppress(Exception):
            self._st._fs.rm_file(self.key)  # usually it was never created
        self._st._invalidate(self.key)


class FsspecStore(Store):
    """A directory on any fsspec file system that is not the local disk."""

    caps = Capabilities(
        local=False,
        atomic_rename=False,
        random_write=False,
        server_copy=True,
        per_request=5e-3,
        per_byte=1 / 2e8,
        concurrency=16,
    )

    def __init__(self, url: str, storage_options: Optional[dict[str, Any]] = None):
        import fsspec

        opts = merge_options(env_storage_options(protocol_of(url)), storage_options)
        fs, root = fsspec.core.url_to_fs(url, **opts)
        super().__init__(url, root.rstrip("/") or "/", opts)
        self._fs = fs

    def _invalidate(self, key: str) -> None:
        with contextlib.suppress(Exception):  # caches are an optimisation
            self._fs.invalidate_cache(key)

    # primitives
    def _stat(self, key: str) -> Optional[Stat]:
        self._invalidate(key)
        try:
            info = self._fs.info(key)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return Stat("dir", 0)
        return Stat("file", int(info.get("size") or 0))

    def _scan(self, key: str) -> dict[str, bool]:
        self._invalidate(key)
        try:
            entries = self._fs.ls(key, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        base = key.rstrip("/")
        out: dict[str, bool] = {}
        for e in entries:
            name = str(e["name"]).rstrip("/")
            if name == base or name == base.lstrip("/"):
                continue
            out[posixpath.basename(name)] = e.get("type") == "directory"
        return out

    def _read_into(self, key: str, start: int, out: memoryview) -> int:
        n = len(out)
        if n == 0:
            return 0
        data = self._fs.cat_file(key, start=start, end=start + n)
        m = min(len(data), n)
        out[:m] = data[:m]
        return m

    def _writer(self, key: str, where: str, resume_at: Optional[int]) -> Writer:
        f = self._fs.open(key, "wb", block_size=32 << 20)
        return FsspecWriter(self, key, where, f)

    def _put_atomic(self, key: str, data: Any) -> None:
        self._fs.pipe_file(key, bytes(data))

    def _delete(self, key: str) -> None:
        self._invalidate(key)
        try:
            if self._fs.isfile(key):
                self._fs.rm_file(key)
            else:
                self._fs.rm(key, recursive=True)
        except FileNotFoundError:
            pass
        self._invalidate(key)

    # optional hooks
    def _copy(self, src: str, dst: str) -> None:
        self._fs.copy(src, dst)

    def _makedirs(self, key: str) -> None:
        self._fs.makedirs(key, exist_ok=True)

    def _walk(self, key: str) -> Optional[list[str]]:
        self._invalidate(key)
        try:
            found = self._fs.find(key)
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        return [f[len(root) :] for f in found if f.startswith(root)]
