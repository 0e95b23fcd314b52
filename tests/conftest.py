"""Shared fixtures: a real S3-protocol server (moto) on 127.0.0.1, and a backend-parametrized URL.

``s3_server`` runs moto's S3 app behind a tiny WSGI wrapper that counts the
body bytes of every GET it serves, so tests can check range reads on the
server side.  s3fs talks to it over real HTTP; the usual AWS_* variables are
set for the session (fake credentials, AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

BUCKET = "distckpt-test"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    requests: list[tuple[str, str, str, int]] = field(default_factory=list)  # (method, path, query, body bytes)
    lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: int = 0
    max_inflight: int = 0
    get_delay: float = 0.0  # seconds each object GET is held (to make concurrency observable)
    failures: list[list] = field(default_factory=list)  # [method, path prefix, remaining] -> 500 InternalError

    def fail_next(self, method: str, prefix: str, times: int) -> None:
        """Answer the next ``times`` ``method`` requests on keys under ``prefix`` with 500 InternalError."""
        with self.lock:
            self.failures.append([method, f"/{self.bucket}/{prefix}", times])

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket,) + parts)

    def get_bytes(self, prefix: str) -> tuple[int, int]:
        """(bytes, requests) of object GETs whose key starts with ``prefix`` (listings excluded)."""
        want = f"/{self.bucket}/{prefix}"
        with self.lock:
            hits = [n for m, p, q, n in self.requests if m == "GET" and p.startswith(want) and "list-type" not in q and n >= 0]
        return sum(hits), len(hits)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.failures.clear()
            self.max_inflight = 0
            self.get_delay = 0.0


class _Counting:
    """WSGI middleware: record method, path and response body size of every request."""

    def __init__(self, app, server: S3Server):
        self.app, self.server = app, server

    def __call__(self, environ, start_response):
        srv = self.server
        method, path, query = environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        with srv.lock:
            for rule in srv.failures:
                if rule[0] == method and path.startswith(rule[1]) and rule[2] > 0:
                    rule[2] -= 1
                    srv.requests.append((method, path, query, -1))
                    start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
                    return [b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"]
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            if method == "GET" and srv.get_delay and "list-type" not in query:
                time.sleep(srv.get_delay)
            body = self.app(environ, start_response)
            # moto answers from memory: take the whole body now, so the count is
            # recorded before the client can see the last byte
            pieces = list(body)
            if hasattr(body, "close"):
                body.close()
        finally:
            with srv.lock:
                srv.inflight -= 1
        with srv.lock:
            srv.requests.append((method, path, query, sum(len(p) for p in pieces)))
        return pieces


@pytest.fixture(scope="session")
def s3_server():
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = S3Server(endpoint="", bucket=BUCKET)
    app = _Counting(DomainDispatcherApplication(create_backend_app), srv)
    httpd = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    srv.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    env = {
        "AWS_ENDPOINT_URL": srv.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield srv
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["local", "memory", "s3"])
def storage_url(request, tmp_path) -> str:
    """A fresh, empty directory URL on each backend: a local path, ``memory://``, ``s3://`` (moto)."""
    tag = uuid.uuid4().hex[:10]
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://distckpt-test/{tag}"
    srv = request.getfixturevalue("s3_server")
    return srv.url(tag)
