"""Model-name resolution and a download cache, the way ``from_pretrained`` does it.

``resolve("llama_tiny")`` maps a model name to files on a *hub* (any fsspec URL,
``http(s)://`` included, from ``hub_url=`` or ``$DISTCKPT_HUB_URL``; there is no
default public hub), downloads them once into a local cache and returns the local
directory.  A local directory, or an fsspec URL that is not under the hub, is
returned unchanged: the caller reads it directly.

Hub layout: the files of model ``name`` live at ``{hub}/{name}/{file}``;
``{hub}/models.json`` (a JSON list of names, or a dict) lists the models
(:func:`list_models`).  ``{hub}/{name}/files.json``, when present, is a JSON list
of the model's file names and is taken as the exact file list.

Resolution order (HF style): config (``config.json``, ``{last name part}.yaml``,
``mindspore_model.yaml``: every one that exists, at least one required), then the
first weight set found among ``mindspore_model.ckpt.index.json`` + the shards of
its ``weight_map``, ``mindspore_model.ckpt``, ``model.safetensors.index.json`` +
shards, ``model.safetensors``, ``distckpt.index.json`` + the keys of its
``files`` object; then the optional tokenizer/generation files by known name.
File names read from an index or listing are untrusted: each is checked by
:func:`distckpt.storage.safe_name` (no ``..``, absolute paths or backslashes) and
refused with :class:`~distckpt.errors.DownloadError`.

Transport, retries and temp files come from :mod:`distckpt.storage`: the hub is a
:class:`~distckpt.storage.Store` (``HttpStore`` for http(s), any other backend
otherwise) read with ``open_stream`` (``Range`` resume); each file is downloaded
with the storage :class:`~distckpt.storage.RetryPolicy` (``MAX_ATTEMPTS``
attempts, every attempt resuming from the partial file) into a local store
writer that checks every byte (``open_write(..., resume_at=)``), moved into
place with ``Store.replace`` and recorded with ``Store.put_atomic``.

Cache layout (root: ``cache_dir=`` or ``$DISTCKPT_CACHE`` or ``~/.cache/distckpt``)::

    {cache}/{hub_id}/{name}/{file}                    downloaded files (name may hold "/")
    {cache}/{hub_id}/{name}/{file}.incomplete         partial download, continued by a Range request
    {cache}/{hub_id}/{name}/.distckpt-complete.json   manifest {file: size}, written last
    {cache}/.locks/{hub_id}/{name}/{file}.lock        fcntl.flock lock files (one downloader per file)

``hub_id`` is ``{scheme}--{host and path, sanitized}--{sha256(hub url)[:10]}``,
e.g. ``http--127.0.0.1_8000_models--1a2b3c4d5e``.  A model is served from the
cache, with no network access at all, only when its manifest exists and every
file it lists is present with the recorded size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import DownloadError, StorageError
from .storage import (
    SMALL_FILE_LIMIT,
    RetryExhausted,
    RetryPolicy,
    Store,
    Stream,
    TransientError,
    open_storage,
    safe_name,
)
from .storage.http import HttpStore
from .storage.local import LocalStore

try:  # POSIX; elsewhere downloads are not serialized across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["resolve", "list_models", "default_cache_dir", "HUB_ENV", "CACHE_ENV", "MANIFEST_NAME"]

HUB_ENV = "DISTCKPT_HUB_URL"
CACHE_ENV = "DISTCKPT_CACHE"
MANIFEST_NAME = ".distckpt-complete.json"
LISTING_NAME = "files.json"
MODELS_NAME = "models.json"

BLOCK_SIZE = 8 << 20  # bytes per streamed block
MAX_ATTEMPTS = 4  # per file; later attempts resume from the partial file
FIRST_RETRY_DELAY = 0.5  # seconds before the second attempt; doubles, at most MAX_RETRY_DELAY
MAX_RETRY_DELAY = 4.0
LOCK_TIMEOUT = 6 * 3600.0  # seconds to wait for another process's download of the same file

_CONFIG_JSON = "config.json"
_DEFAULT_YAML = "mindspore_model.yaml"
_CKPT_INDEX = "mindspore_model.ckpt.index.json"
_CKPT = "mindspore_model.ckpt"
_ST_INDEX = "model.safetensors.index.json"
_ST = "model.safetensors"
_DISTCKPT_INDEX = "distckpt.index.json"
_WEIGHT_FILES = (_CKPT_INDEX, _CKPT, _ST_INDEX, _ST, _DISTCKPT_INDEX)
_OPTIONAL_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "generation_config.json",
)
_INCOMPLETE = ".incomplete"
_HTTP_HUB_OPTIONS = ("headers", "timeout", "verify")


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    """``$DISTCKPT_CACHE`` if set, else ``~/.cache/distckpt`` (user-expanded, absolute)."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "distckpt")
    return os.path.abspath(os.path.expanduser(root))


def resolve(
    name_or_path: str | os.PathLike[str],
    *,
    hub_url: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike[str]] = None,
    force_download: bool = False,
    resume_download: bool = True,
    proxies: Optional[Mapping[str, str]] = None,
    local_files_only: bool = False,
    storage_options: Optional[Mapping[str, Any]] = None,
    progress: Optional[bool] = None,
) -> str:
    """Return a directory (or URL) holding the model ``name_or_path``.

    A local directory or a non-hub fsspec URL comes back unchanged.  A model name
    (``llama_tiny``, ``org/model``; or a URL under the hub) is downloaded into the
    cache (see the module docstring for the layout) and the cache directory is
    returned.  ``proxies`` (requests style, ``{"http": ..., "https": ...}``) applies to
    http(s) hubs; ``storage_options`` go to fsspec for other hubs, and for http(s)
    hubs may hold ``headers``, ``timeout`` and ``verify``.  ``progress=None`` shows a
    tqdm bar only when stderr is a TTY.
    """
    raw = os.fspath(name_or_path)
    if not raw:
        raise DownloadError("empty model name or path; pass a local directory, a URL or a hub model name")
    if "://" not in raw and os.path.isdir(raw):
        return raw
    hub = _hub_url(hub_url)
    name = _name_from(raw, hub)
    if name is None:
        return raw
    _check_model_name(name)
    cache_root = os.path.abspath(os.path.expanduser(os.fspath(cache_dir))) if cache_dir else default_cache_dir()

    if hub is None:
        if local_files_only:
            found = _find_cached_any_hub(cache_root, name)
            if found is not None:
                return found
        raise DownloadError(
            f"{raw!r} is not a local directory and no model hub is configured; "
            f"set {HUB_ENV} or pass hub_url= (looked in the cache {cache_root} too)"
            if local_files_only
            else f"{raw!r} is not a local directory and no model hub is configured; set {HUB_ENV} or pass hub_url="
        )

    hub_id = _hub_id(hub)
    model_dir = os.path.join(cache_root, hub_id, *name.split("/"))
    manifest = os.path.join(model_dir, MANIFEST_NAME)
    if (local_files_only or not force_download) and _cache_complete(model_dir):
        return model_dir  # local_files_only wins over force_download, as in transformers
    if local_files_only:
        raise DownloadError(
            f"model {name!r} from hub {hub} is not fully cached (tried {manifest}) and local_files_only=True; "
            f"run once with network access or drop local_files_only"
        )

    cache = LocalStore(model_dir)
    if force_download:
        cache.remove([MANIFEST_NAME])
    store = _open_hub(hub, proxies, storage_options)
    try:
        fetcher = _Fetcher(
            store=store,
            name=name,
            cache=cache,
            lock_dir=os.path.join(cache_root, ".locks", hub_id, *name.split("/")),
            force=force_download,
            resume=resume_download,
            show_progress=_stderr_is_tty() if progress is None else bool(progress),
        )
        files = fetcher.run()
    finally:
        store.close()
    record = {"format": "distckpt-hub-cache/1", "hub": hub, "name": name, "files": files, "time": time.time()}
    cache.put_atomic(MANIFEST_NAME, json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
    return model_dir


def list_models(
    hub_url: Optional[str] = None,
    *,
    proxies: Optional[Mapping[str, str]] = None,
    storage_options: Optional[Mapping[str, Any]] = None,
) -> list[str]:
    """Model names listed by ``{hub}/models.json`` (like ``MindFormerBook.get_model_support_list``).

    The file holds a JSON list of names (strings or ``{"name": ...}`` objects) or a dict;
    a dict value that is a list contributes its names (MindFormers ``{"llama": [...]}``
    style), any other value contributes its key.
    """
    hub = _hub_url(hub_url)
    if hub is None:
        raise DownloadError(f"no model hub is configured; set {HUB_ENV} or pass hub_url=")
    store = _open_hub(hub, proxies, storage_options)
    try:
        url = store.child_url(MODELS_NAME)
        try:
            raw = _policy().call(f"reading {url}", lambda: store.read_bytes(MODELS_NAME, limit=SMALL_FILE_LIMIT))
        except FileNotFoundError:
            raise DownloadError(f"hub {hub} has no model list (tried {url}); publish a JSON list there") from None
        except RetryExhausted as exc:
            raise DownloadError(f"could not read the model list {url}: {_last_failure(exc)}") from None
        except StorageError as exc:
            raise DownloadError(f"could not read the model list {url}: {exc}") from None
    finally:
        store.close()
    data = _loads(raw, url)
    items: list[Any] = []
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict):
        for key, value in data.items():
            items.extend(value if isinstance(value, list) else [key])
    else:
        raise DownloadError(f"model list {url} must be a JSON list or object, got {type(data).__name__}")
    names: list[Any] = [item.get("name") if isinstance(item, dict) else item for item in items]
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise DownloadError(f"model list {url} holds invalid names {bad[:3]!r}; names must be non-empty strings")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------
# names, hubs, cache
# ----------------------------------------------------------------------------------------------
def _hub_url(hub_url: Optional[str]) -> Optional[str]:
    hub = (hub_url if hub_url is not None else os.environ.get(HUB_ENV, "")).strip()
    if not hub:
        return None
    if "://" not in hub:  # a plain local path
        return os.path.abspath(os.path.expanduser(hub)).rstrip(os.sep) or os.sep
    scheme, rest = hub.split("://", 1)
    rest = rest.rstrip("/")
    return f"{scheme.lower()}://{rest}"


def _join(base: str, rel: str) -> str:
    return base + rel if base.endswith(("/", "://")) else f"{base}/{rel}"


def _name_from(raw: str, hub: Optional[str]) -> Optional[str]:
    """The model name in ``raw``, or None when ``raw`` is a URL outside the hub."""
    if "://" not in raw:
        return raw
    if hub is not None:
        prefix = _join(hub, "")
        if raw.startswith(prefix) and raw.rstrip("/") != hub:
            return raw[len(prefix) :].rstrip("/")
    return None


def _check_model_name(name: str) -> None:
    try:
        safe_name(name, what="model name", allow_subdirs=True)
    except StorageError:
        raise DownloadError(
            f"{name!r} is neither a local directory nor a valid model name "
            f"(a name uses only A-Z a-z 0-9 . _ + = @ - and '/', with no '.' or '..' part and no leading '/')"
        ) from None


def _check_file_name(rel: Any, source: str) -> str:
    """Validate an untrusted relative file name from an index or listing."""
    if not isinstance(rel, str) or not rel:
        raise DownloadError(f"{source} names an invalid file {rel!r}; expected a non-empty relative path")
    try:
        safe_name(rel, what=f"file name in {source}", allow_subdirs=True)
        ok = rel.rsplit("/", 1)[-1] != MANIFEST_NAME and not rel.endswith((_INCOMPLETE, ".lock"))
    except StorageError:
        ok = False
    if not ok:
        raise DownloadError(
            f"{source} names the file {rel!r}, which is not a plain relative path "
            f"(no '..', no absolute path, no backslash); refusing to download it"
        )
    return rel


def _hub_id(hub: str) -> str:
    scheme, rest = hub.split("://", 1) if "://" in hub else ("file", hub)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", rest).strip("._-")[:64] or "root"
    digest = hashlib.sha256(hub.encode("utf-8")).hexdigest()[:10]
    return f"{scheme}--{slug}--{digest}"


def _read_manifest(cache: Store) -> Optional[dict[str, int]]:
    try:
        data = _loads(cache.read_bytes(MANIFEST_NAME, limit=SMALL_FILE_LIMIT), MANIFEST_NAME)
    except (OSError, ValueError):  # DownloadError is an OSError: a bad cache manifest means "not cached"
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    return files


def _cache_complete(model_dir: str) -> bool:
    cache = LocalStore(model_dir)
    files = _read_manifest(cache)
    if files is None:
        return False
    for rel, size in files.items():
        try:
            _check_file_name(rel, "cache manifest")
            if cache.size(rel) != size:
                return False
        except (DownloadError, OSError):
            return False
    return True


def _find_cached_any_hub(cache_root: str, name: str) -> Optional[str]:
    """A complete cached copy of ``name`` from any hub, when exactly one exists."""
    try:
        hubs = [e for e in LocalStore(cache_root).listdir() if not e.startswith(".")]
    except OSError:
        return None
    found = [d for d in (os.path.join(cache_root, h, *name.split("/")) for h in hubs) if _cache_complete(d)]
    return found[0] if len(found) == 1 else None


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr and sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _loads(raw: bytes, url: str) -> Any:
    from . import jsonutil  # strict: duplicate keys and NaN refused

    try:
        return jsonutil.loads(raw, where=url, error=DownloadError)
    except DownloadError as exc:
        raise DownloadError(f"{exc}; fix or re-publish it on the hub") from None


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``path`` (created if needed); no-op without fcntl."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DownloadError(
                        f"timed out after {LOCK_TIMEOUT:.0f}s waiting for lock {path}; "
                        f"another process is downloading the same file — remove the lock if it is gone"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# the hub as a store; the retry policy
# ----------------------------------------------------------------------------------------------
def _open_hub(hub: str, proxies: Optional[Mapping[str, str]], storage_options: Optional[Mapping[str, Any]]) -> Store:
    """The hub as a read store.  Its own retries are off: :func:`_policy` retries whole downloads."""
    opts = dict(storage_options or {})
    store: Store
    if hub.startswith(("http://", "https://")):
        unknown = set(opts) - set(_HTTP_HUB_OPTIONS)
        if unknown:
            from .errors import ConfigError

            raise ConfigError(
                f"storage_options {sorted(unknown)} are not supported for the http hub {hub}; use headers, timeout, verify"
            )
        store = HttpStore(hub, opts, proxies=proxies)
    else:
        store = open_storage(hub, opts)
    store.retry_policy = RetryPolicy(attempts=1)
    return store


def _last_failure(exc: RetryExhausted) -> BaseException:
    """The failure under nested retry wrappers (the hub store's single attempt inside the hub policy)."""
    last: BaseException = exc
    while isinstance(last, RetryExhausted) and last.last is not None:
        last = last.last
    return last


def _policy() -> RetryPolicy:
    """Attempts per file (``MAX_ATTEMPTS``, read at call time), backoff from ``FIRST_RETRY_DELAY``."""
    return RetryPolicy(attempts=MAX_ATTEMPTS, first_delay=FIRST_RETRY_DELAY, max_delay=MAX_RETRY_DELAY)


# ----------------------------------------------------------------------------------------------
# the download itself
# ----------------------------------------------------------------------------------------------
@dataclass
class _Fetcher:
    store: Store
    name: str
    cache: LocalStore
    lock_dir: str
    force: bool
    resume: bool
    show_progress: bool
    tried: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)

    # -- steps ---------------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        listing = self._listing()
        configs = self._configs(listing)
        if not configs:
            raise DownloadError(f"model {self.name!r} has no config on the hub; tried {', '.join(self.tried)}")
        if not self._weights(listing):
            if listing is not None:
                raise DownloadError(
                    f"{self.url(LISTING_NAME)} lists no weights for model {self.name!r} "
                    f"(expected one of {', '.join(_WEIGHT_FILES)}); fix the listing on the hub"
                )
            raise DownloadError(f"model {self.name!r} has no weights on the hub; tried {', '.join(self.tried)}")
        for rel in listing if listing is not None else _OPTIONAL_FILES:
            if rel not in self.files:
                self.get(rel, required=listing is not None)
        return dict(sorted(self.files.items()))

    def _listing(self) -> Optional[list[str]]:
        if not self.get(LISTING_NAME):
            return None
        source = self.url(LISTING_NAME)
        data = _loads(self._read_local(LISTING_NAME), source)
        if not isinstance(data, list):
            raise DownloadError(f"{source} must be a JSON list of file names, got {type(data).__name__}")
        return list(dict.fromkeys(_check_file_name(rel, source) for rel in data))

    def _configs(self, listing: Optional[list[str]]) -> list[str]:
        last = self.name.rsplit("/", 1)[-1]
        if listing is not None:
            wanted = [r for r in listing if r == _CONFIG_JSON or (r.endswith(".yaml") and "/" not in r)]
        else:
            wanted = list(dict.fromkeys([_CONFIG_JSON, f"{last}.yaml", _DEFAULT_YAML]))
        return [rel for rel in wanted if self.get(rel, required=listing is not None)]

    def _weights(self, listing: Optional[list[str]]) -> bool:
        candidates: list[tuple[str, Optional[Callable[[Any, str], Iterable[Any]]]]] = [
            (_CKPT_INDEX, _weight_map_files),
            (_CKPT, None),
            (_ST_INDEX, _weight_map_files),
            (_ST, None),
            (_DISTCKPT_INDEX, _distckpt_files),
        ]
        found = False
        for rel, shards_of in candidates:
            if listing is not None and rel not in listing:
                continue
            if not self.get(rel, required=listing is not None):
                continue
            found = True
            if shards_of is not None:
                source = self.url(rel)
                data = _loads(self._read_local(rel), source)
                shards = list(dict.fromkeys(_check_file_name(s, source) for s in shards_of(data, source)))
                if not shards:
                    raise DownloadError(f"{source} names no data files; re-publish the checkpoint")
                for shard in shards:
                    if not self.get(shard, required=True):
                        raise DownloadError(
                            f"{source} names {shard!r} but {self.url(shard)} does not exist; re-publish the checkpoint"
                        )
            if listing is None:
                break  # first weight set found wins, like from_pretrained
        return found

    # -- helpers -------------------------------------------------------------------------------
    def _rel(self, rel: str) -> str:
        return f"{self.name}/{rel}"

    def url(self, rel: str) -> str:
        return self.store.child_url(self._rel(rel))

    def _read_local(self, rel: str) -> bytes:
        return self.cache.read_bytes(rel, limit=SMALL_FILE_LIMIT)

    def get(self, rel: str, required: bool = False) -> bool:
        """Make ``rel`` present in the cache; False when the hub does not have it."""
        url = self.url(rel)
        self.tried.append(url)
        if not _download(self, rel, url):
            if required:
                raise DownloadError(f"{url} does not exist although the hub lists it for model {self.name!r}")
            return False
        self.files[rel] = self.cache.size(rel)
        return True

    def _lock(self, rel: str) -> str:
        return os.path.join(self.lock_dir, *rel.split("/")) + ".lock"


def _is_file(cache: Store, rel: str) -> bool:
    st = cache.stat(rel)
    return st is not None and st.kind == "file"


def _download(f: _Fetcher, rel: str, url: str) -> bool:
    """Download ``rel`` into the cache (resuming ``rel.incomplete``); False when the hub lacks it."""
    cache = f.cache
    if not f.force and _is_file(cache, rel):
        return True
    tmp = rel + _INCOMPLETE
    with _file_lock(f._lock(rel)):
        if not f.force and _is_file(cache, rel):
            return True  # another process finished it while we waited
        if f.force or not f.resume:
            cache.remove([tmp])

        def attempt() -> None:
            st = cache.stat(tmp) if f.resume else None
            body = f.store.open_stream(f._rel(rel), st.size if st is not None and st.kind == "file" else 0, block=BLOCK_SIZE)
            try:
                _stream(body, cache, tmp, url, f.show_progress)
            finally:
                body.close()

        try:
            _policy().call(f"downloading {url}", attempt)
        except DownloadError:
            raise
        except FileNotFoundError:
            cache.remove([tmp])
            return False
        except RetryExhausted as exc:
            raise DownloadError(
                f"downloading {url} failed after {exc.attempts} attempts ({_last_failure(exc)}); "
                f"run again to resume{' from ' + cache.path(tmp) if f.resume else ''}"
            ) from None
        except StorageError as exc:
            hint = ""
            if getattr(exc, "status", None):
                hint = f" (a hub that answers {exc.status} for absent files should publish {{model}}/{LISTING_NAME} so nothing is probed)"  # type: ignore[attr-defined]
            raise DownloadError(f"{exc}{hint}") from None
        cache.replace(tmp, rel)
        return True


def _stream(body: Stream, cache: Store, tmp: str, url: str, show_progress: bool) -> None:
    """Write ``body`` to ``tmp`` (continuing at ``body.start``), commit it, check the size."""
    bar = None
    if show_progress:
        with contextlib.suppress(ImportError):
            from tqdm.auto import tqdm

            bar = tqdm(
                total=body.total,
                initial=body.start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=url.rsplit("/", 1)[-1],
                leave=False,
            )
    w = cache.open_write(tmp, resume_at=body.start)  # abort keeps the bytes: the next attempt resumes
    try:
        for block in body.chunks:
            w.write(block)
            if bar is not None:
                bar.update(len(block))
        size = w.tell()
        w.commit()
    except BaseException:
        w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    if body.total is not None and size != body.total:
        raise TransientError(f"got {size} of {body.total} bytes")


def _weight_map_files(data: Any, source: str) -> Iterable[Any]:
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict):
        raise DownloadError(f"{source} has no 'weight_map' object; re-publish the checkpoint")
    return wmap.values()


def _distckpt_files(data: Any, source: str) -> Iterable[Any]:
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise DownloadError(f"{source} has no 'files' object; re-publish the checkpoint")
    return files.keys()
