"""Names and URLs: the one validator for names read from storage, URL splitting, storage options.

Who calls what: every module that turns a name read from storage (an index, a
weight map, a hub listing) into a path calls :func:`safe_name` first;
:func:`~distckpt.storage.open_storage` merges :func:`env_storage_options` under
the caller's options with :func:`merge_options`.  Nothing here does I/O.
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["safe_name", "is_url", "split_url", "protocol_of", "env_storage_options", "merge_options"]

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9._+=@-]+$")


def safe_name(name: str, *, what: str = "file name", allow_subdirs: bool = False) -> str:
    """Validate a relative name read from untrusted metadata; never a path outside the root.

    Each component is a plain file name: letters, digits and ``. _ + = @ -``, not
    ``.`` or ``..``; with ``allow_subdirs`` components are joined by ``/``.
    Raises :class:`~distckpt.errors.StorageError` naming ``what`` and the name.
    """
    from ..errors import StorageError

    if not isinstance(name, str) or not name:
        raise StorageError(f"invalid {what} {name!r}: must be a non-empty string")
    parts = name.split("/") if allow_subdirs else [name]
    for part in parts:
        if part in ("", ".", "..") or not _SAFE_COMPONENT.match(part):
            raise StorageError(
                f"refusing {what} {name!r}: only plain relative names are allowed (no '..', '/', '\\\\' or absolute paths)"
            )
    return name


def is_url(path: Any) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain local path."""
    return "://" in str(path)


def protocol_of(url: str) -> str:
    """``s3`` for ``s3://b/k``, ``file`` for a plain path; chained URLs give their outer scheme."""
    if not is_url(url):
        return "file"
    return url.split("://", 1)[0].split("::")[0].lower()


def split_url(url: str) -> tuple[str, str]:
    """(parent, base name) of a local path or URL: ``memory://a/b.ckpt`` -> ``memory://a``, ``b.ckpt``."""
    if is_url(url):
        head, _, base = url.rstrip("/").rpartition("/")
        return head + ("/" if head.endswith(":/") else ""), base
    return os.path.split(os.path.abspath(url))


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
