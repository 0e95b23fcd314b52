"""A moto S3 server on 127.0.0.1 that counts the body bytes of every GET it serves.

Used by ``bench/peers.py`` for the cooperative-load row: the parent starts it in a thread,
children (``mpirun`` ranks) reach it through the ``AWS_*`` variables of :meth:`CountingS3.env`,
and the parent reads :meth:`CountingS3.get_bytes` after each load.  The same idea as the
``s3_server`` fixture in ``tests/conftest.py``, without pytest.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["CountingS3"]


class CountingS3:
    """``with CountingS3() as s3: ...``; ``s3.url(key)`` names an object, ``s3.env`` reaches it."""

    def __init__(self, bucket: str = "distckpt-bench"):
        self.bucket = bucket
        self.endpoint = ""
        self._lock = threading.Lock()
        self._gets: list[tuple[str, int]] = []  # (path, body bytes) of object GETs

    # -------------------------------------------------------------- WSGI
    def _wrap(self, app):
        def counting(environ, start_response):
            method, path, query = environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
            body = app(environ, start_response)
            pieces = list(body)
            if hasattr(body, "close"):
                body.close()
            if method == "GET" and "list-type" not in query:
                with self._lock:
                    self._gets.append((path, sum(len(p) for p in pieces)))
            return pieces

        return counting

    def __enter__(self) -> CountingS3:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = self._wrap(DomainDispatcherApplication(create_backend_app))
        self._httpd = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=self.bucket)
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------- access
    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket, *parts))

    def reset(self) -> None:
        with self._lock:
            self._gets.clear()

    def get_bytes(self, prefix: str) -> tuple[int, int]:
        """(body bytes, requests) of object GETs whose key starts with ``prefix``."""
        want = f"/{self.bucket}/{prefix}"
        with self._lock:
            hits = [n for p, n in self._gets if p.startswith(want)]
        return sum(hits), len(hits)
