"""Read-only HTTP(S) through ``requests``: ranged GETs, streaming downloads with ``Range`` resume.

Used for ``http(s)://`` URLs by :func:`~distckpt.storage.open_storage` and by
:mod:`distckpt.hub` as its transport.  A server has no directory listing, so
only single files can be read (a ``.ckpt`` or ``.safetensors``, a hub's named
files).  Status codes are classified once: 404/410 mean absent
(``FileNotFoundError``), 5xx/408/429 and dropped connections are transient
(:class:`~distckpt.storage.retry.TransientError`, retried by the store's
policy), any other 4xx is permanent (``StorageError`` with ``status``).

Storage options: ``headers`` (dict), ``timeout`` (seconds or (connect, read)),
``verify`` (bool or CA bundle path), ``proxies`` (requests style).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from ..errors import ConfigError, StorageError, require
from .base import Capabilities, Stat, Store, Stream, Writer
from .retry import TransientError

__all__ = ["HttpStore", "HTTP_TIMEOUT", "HTTP_OPTIONS"]

HTTP_TIMEOUT = (10.0, 60.0)  # connect, read (seconds)
HTTP_OPTIONS = ("headers", "timeout", "verify", "proxies")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")


class HttpStore(Store):
    """Files under one base URL on an HTTP(S) server; read-only, no listing."""

    caps = Capabilities(
        local=False,
        atomic_rename=False,
        random_write=False,
        server_copy=False,
        listing=False,
        writable=False,
        per_request=5e-3,
        per_byte=1 / 1e8,
        concurrency=8,
    )

    def __init__(
        self, url: str, storage_options: Optional[Mapping[str, Any]] = None, *, proxies: Optional[Mapping[str, str]] = None
    ):
        requests = require("requests", "http")
        opts = dict(storage_options or {})
        unknown = set(opts) - set(HTTP_OPTIONS)
        if unknown:
            raise ConfigError(
                f"storage_options {sorted(unknown)} are not supported for the http(s) URL {url}; "
                f"use {', '.join(HTTP_OPTIONS)}"
            )
        super().__init__(url, url.rstrip("/"), opts)
        self._requests = requests
        session = requests.Session()
        session.trust_env = True
        for p in (opts.get("proxies"), proxies):
            if p:
                session.proxies.update(dict(p))
        session.headers.update(dict(opts.get("headers") or {}))
        if "verify" in opts:
            session.verify = opts["verify"]
        self._session = session
        self._timeout = opts.get("timeout", HTTP_TIMEOUT)

    def _key(self, name: str) -> str:
        return self.root + "/" + urllib.parse.quote(name, safe="/") if name else self.root

    def child_url(self, name: str) -> str:
        return self._key(name)

    def close(self) -> None:
        self._session.close()

    # -------------------------------------------------------------- requests
    def _failure(self, exc: Exception, url: str) -> StorageError:
        r = self._requests.exceptions
        permanent = (r.InvalidURL, r.MissingSchema, r.InvalidSchema, r.URLRequired, r.InvalidHeader)
        msg = f"{type(exc).__name__}: {exc}"
        return StorageError(f"{url}: {msg}") if isinstance(exc, permanent) else TransientError(msg)

    def _request(self, method: str, url: str, headers: dict[str, str]) -> Any:
        try:
            return self._session.request(method, url, headers=headers, stream=True, timeout=self._timeout)
        except self._requests.RequestException as exc:
            raise self._failure(exc, url) from None

    def _found(self, resp: Any, url: str) -> bool:
        """True for a success; False (response closed) for 404/410; raises for other failures."""
        code = resp.status_code
        if code < 400:
            return True
        resp.close()
        if code in (404, 410):
            return False
        if code >= 500 or code in (408, 429):
            raise TransientError(f"HTTP {code} from {url}")
        err = StorageError(f"HTTP {code} {resp.reason} for {url}; check access rights, headers or proxies")
        err.status = code  # type: ignore[attr-defined]
        raise err

    def _chunks(self, resp: Any, size: int) -> Iterator[bytes]:
        try:
            yield from resp.iter_content(chunk_size=size)
        except (self._requests.RequestException, OSError) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------ primitives
    def _stat(self, key: str) -> Optional[Stat]:
        resp = self._request("HEAD", key, {"Accept-Encoding": "identity"})
        try:
            if resp.status_code not in (405, 501):
                if not self._found(resp, key):
                    return None
                length = resp.headers.get("Content-Length", "")
                if length.isdigit():
                    return Stat("file", int(length))
        finally:
            resp.close()
        resp = self._request("GET", key, {"Accept-Encoding": "identity", "Range": "bytes=0-0"})
        try:
            if resp.status_code == 416:
                m = _UNSATISFIED.match(resp.headers.get("Content-Range", ""))
                if m:
                    return Stat("file", int(m.group(1)))
            if not self._found(resp, key):
                return None
            m2 = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if resp.status_code == 206 and m2 and m2.group(3) != "*":
                return Stat("file", int(m2.group(3)))
            length = resp.headers.get("Content-Length", "")
            if resp.status_code == 200 and length.isdigit():
                return Stat("file", int(length))
        finally:
            resp.close()
        raise StorageError(f"{key}: the server does not tell the file's size (no Content-Length or Content-Range)")

    def _scan(self, key: str) -> dict[str, bool]:
        raise StorageError(f"{key}: an HTTP server has no directory listing")

    def _read_into(self, key: str, start: int, out: memoryview) -> int:
        n = len(out)
        if n == 0:
            return 0
        resp = self._request("GET", key, {"Accept-Encoding": "identity", "Range": f"bytes={start}-{start + n - 1}"})
        try:
            if resp.status_code == 416:
                return 0  # the range starts past the end of the file
            if not self._found(resp, key):
                raise self._not_found(key)
            skip, expect = 0, n
            if resp.status_code == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start:
                    raise TransientError(f"{key}: asked for bytes {start}-, the server answered {m and m.group(0)!r}")
                expect = min(n, int(m.group(2)) - start + 1)
            else:
                skip = start  # the server ignored the range and sends the whole file
            got = 0
            for chunk in self._chunks(resp, 1 << 20):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                k = min(len(chunk), n - got)
                out[got : got + k] = chunk[:k]
                got += k
                if got == n:
                    break
            if got < expect:
                raise TransientError(f"{key}: short body ({got} of {expect} bytes)")
            return got
        finally:
            resp.close()

    def _writer(self, key: str, where: str, resume_at: Optional[int]) -> Writer:
        raise StorageError(f"{where}: HTTP is read-only")

    def _put_atomic(self, key: str, data: Any) -> None:
        raise StorageError(f"{key}: HTTP is read-only")

    def _delete(self, key: str) -> None:
        raise StorageError(f"{key}: HTTP is read-only")

    # -------------------------------------------------------- optional hooks
    def _read_all(self, key: str, where: str, limit: Optional[int]) -> Optional[bytes]:
        resp = self._request("GET", key, {"Accept-Encoding": "identity"})
        try:
            if not self._found(resp, key):
                raise self._not_found(where)
            length = resp.headers.get("Content-Length", "")
            if limit is not None and length.isdigit() and int(length) > limit:
                raise self._too_large(where, int(length), limit)
            data = bytearray()
            for chunk in self._chunks(resp, 1 << 20):
                data += chunk
                if limit is not None and len(data) > limit:
                    raise self._too_large(where, len(data), limit)
            if length.isdigit() and len(data) != int(length):
                raise TransientError(f"{where}: short body ({len(data)} of {length} bytes)")
            return bytes(data)
        finally:
            resp.close()

    def _open_stream(self, key: str, where: str, offset: int, block: int) -> Optional[Stream]:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = self._request("GET", key, headers)
        if offset and resp.status_code == 416:
            m = _UNSATISFIED.match(resp.headers.get("Content-Range", ""))
            resp.close()
            if m and int(m.group(1)) == offset:  # the partial file is already whole
                return Stream(start=offset, total=offset, chunks=iter(()))
            return self._open_stream(key, where, 0, block)
        if not self._found(resp, key):
            raise self._not_found(where)
        start, total = 0, None
        length = resp.headers.get("Content-Length", "")
        if resp.status_code == 206:
            m2 = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m2 or int(m2.group(1)) != offset:
                resp.close()
                return self._open_stream(key, where, 0, block)
            start = offset
            total = int(m2.group(3)) if m2.group(3) != "*" else None
        elif length.isdigit():
            total = int(length)

        def counted() -> Iterator[bytes]:
            self._count(0)
            for chunk in self._chunks(resp, block):
                self._count(len(chunk), 0)
                yield chunk

        return Stream(start=start, total=total, chunks=counted(), close=resp.close)
