"""A small threaded HTTP file server for tests (127.0.0.1, random free port).

Features the hub tests need and nothing from the outside network:

* GET and HEAD of files under one directory (404 for anything else),
* ``Range: bytes=N-`` / ``bytes=N-M`` / ``bytes=-S`` → 206 + ``Content-Range``,
  416 + ``Content-Range: bytes */size`` for an unsatisfiable or malformed range,
* ``range_supported = False`` → ranges ignored, always 200 with the whole body,
* ``cut_once(path, nbytes)`` → the next GET of ``path`` sends its headers (with the
  full ``Content-Length``) but only ``nbytes`` of body, then closes the connection,
* ``fail_next(path, status, times)`` → the next ``times`` requests of ``path`` get ``status``
  (e.g. 503) with an empty body,
* ``throttle`` → seconds to sleep after every 64 KiB block (widens race windows),
* ``requests`` → a thread-safe log of ``(method, path, range header or None)``.

Use it as a context manager::

    with FileServer(directory) as srv:
        url = srv.url          # "http://127.0.0.1:PORT"
        ...
        srv.requests           # [("GET", "/m/config.json", None), ...]

or as a pytest fixture through :func:`file_server_fixture`.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

__all__ = ["FileServer", "file_server_fixture"]

_BLOCK = 64 * 1024
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        range_header = self.headers.get("Range")
        owner._log(self.command, path, range_header)
        status_override = owner._take_failure(path)
        if status_override is not None:
            self._send_empty(HTTPStatus(status_override))
            return
        file = owner._local_path(path)
        if file is None:
            self._send_empty(HTTPStatus.NOT_FOUND)
            return
        size = file.stat().st_size
        start, end = 0, size  # end exclusive
        status = HTTPStatus.OK
        if range_header is not None and owner.range_supported:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                self._send_empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                return
            start, end = parsed
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes" if owner.range_supported else "none")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        cut = None if head else owner._take_cut(path)
        if cut is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        remaining = end - start
        if cut is not None:
            remaining = min(remaining, cut)
        with open(file, "rb") as f:
            f.seek(start)
            while remaining > 0:
                block = f.read(min(_BLOCK, remaining))
                if not block:
                    break
                try:
                    self.wfile.write(block)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return
                remaining -= len(block)
                if owner.throttle:
                    time.sleep(owner.throttle)
        if cut is not None:
            self.close_connection = True
            self.wfile.flush()
            try:
                self.connection.shutdown(2)
            except OSError:
                pass

    def _send_empty(self, status: HTTPStatus, headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _parse_range(header: str, size: int) -> Optional[tuple[int, int]]:
    """``bytes=a-b`` → (start, end-exclusive), or None when malformed/unsatisfiable."""
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size
    start = int(first)
    if start >= size:
        return None
    end = size if not last else min(size, int(last) + 1)
    if end <= start:
        return None
    return start, end


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: FileServer


class FileServer:
    """Serve ``directory`` over HTTP on 127.0.0.1 with a random free port."""

    def __init__(self, directory: os.PathLike | str, *, range_supported: bool = True, throttle: float = 0.0):
        self.directory = Path(directory).resolve()
        self.range_supported = range_supported
        self.throttle = throttle
        self._log_lock = threading.Lock()
        self._requests: list[tuple[str, str, Optional[str]]] = []
        self._cuts: dict[str, int] = {}
        self._failures: dict[str, list[int]] = {}  # path -> [status, remaining]
        self._httpd: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FileServer:
        if self._httpd is not None:
            return self
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FileServer is not running; call start() or use it as a context manager")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- test controls ----------------------------------------------------------------------
    def cut_once(self, path: str, nbytes: int) -> None:
        """The next GET of ``path`` (URL path, e.g. ``/m/w.ckpt``) stops after ``nbytes`` of body."""
        with self._log_lock:
            self._cuts["/" + path.lstrip("/")] = int(nbytes)

    def fail_next(self, path: str, status: int, times: int = 1) -> None:
        """The next ``times`` requests of ``path`` are answered with ``status`` and no body."""
        with self._log_lock:
            self._failures["/" + path.lstrip("/")] = [int(status), int(times)]

    @property
    def requests(self) -> list[tuple[str, str, Optional[str]]]:
        with self._log_lock:
            return list(self._requests)

    def clear_log(self) -> None:
        with self._log_lock:
            self._requests.clear()

    def gets(self, path: Optional[str] = None) -> list[tuple[str, str, Optional[str]]]:
        """Logged GETs, optionally only those of one URL path."""
        return [r for r in self.requests if r[0] == "GET" and (path is None or r[1] == path)]

    # -- internals --------------------------------------------------------------------------
    def _log(self, method: str, path: str, range_header: Optional[str]) -> None:
        with self._log_lock:
            self._requests.append((method, path, range_header))

    def _take_failure(self, path: str) -> Optional[int]:
        with self._log_lock:
            rule = self._failures.get(path)
            if not rule or rule[1] <= 0:
                return None
            rule[1] -= 1
            return rule[0]

    def _take_cut(self, path: str) -> Optional[int]:
        with self._log_lock:
            return self._cuts.pop(path, None)

    def _local_path(self, url_path: str) -> Optional[Path]:
        rel = url_path.lstrip("/")
        if not rel or "\\" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
            return None
        candidate = (self.directory / rel).resolve()
        if self.directory not in candidate.parents or not candidate.is_file():
            return None
        return candidate


def file_server_fixture(subdir: str = "hub", **options: Any):
    """Build a pytest fixture serving ``tmp_path / subdir`` (created empty).

    In a test module write ``http_hub = file_server_fixture()``; a test taking the
    argument ``http_hub`` then gets a running :class:`FileServer` (``.url``, ``.directory``).
    """
    import pytest

    @pytest.fixture
    def _fixture(tmp_path: Path) -> Iterator[FileServer]:
        root = tmp_path / subdir
        root.mkdir(parents=True, exist_ok=True)
        with FileServer(root, **options) as srv:
            yield srv

    return _fixture
