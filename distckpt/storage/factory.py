"""Which backend serves a URL, and the one helper for reading small files (configs, strategies, YAML).

``open_storage(url)``: a plain path, ``file://`` or ``local://`` -> :class:`LocalStore`;
``http(s)://`` -> :class:`HttpStore` (read-only); anything else (``s3://``,
``memory://``, chained URLs) -> :class:`FsspecStore`.  A :class:`Store` passed in
comes back unchanged.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .base import Store
from .urls import is_url, protocol_of, split_url

__all__ = ["open_storage", "read_small", "SMALL_FILE_LIMIT"]

#: default cap of :func:`read_small` (bytes)
SMALL_FILE_LIMIT = 64 << 20


def open_storage(path: Any, storage_options: Optional[dict[str, Any]] = None) -> Store:
    """The store for a directory path or URL (see the module docstring)."""
    if isinstance(path, Store):
        return path
    url = os.fspath(path)
    chained = "::" in url
    proto = protocol_of(url)
    if not is_url(url) or (proto in ("file", "local") and not chained):
        from .local import LocalStore

        return LocalStore(url, storage_options)
    if proto in ("http", "https") and not chained:
        from .http import HttpStore

        return HttpStore(url, storage_options)
    from .fsspec import FsspecStore

    return FsspecStore(url, storage_options)


def read_small(path: Any, *, limit: int = SMALL_FILE_LIMIT, storage_options: Optional[dict[str, Any]] = None) -> bytes:
    """The bytes of one small file (config, strategy, YAML, JSON) at a path or URL.

    Only a regular file is read (a FIFO or device is refused by name, never
    waited on); anything above ``limit`` bytes is refused before it is read.
    FileNotFoundError when absent.
    """
    parent, base = split_url(os.fspath(path))
    return open_storage(parent, storage_options).read_bytes(base, limit=limit)
