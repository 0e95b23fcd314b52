"""The one retry policy: exponential backoff with jitter, transient versus permanent failures.

Every backend runs its requests through :meth:`RetryPolicy.call` (the store's
``_call``), and :mod:`distckpt.hub` retries a resumable download with the same
class.  :func:`is_transient` is the only classification:

* transient: :class:`TransientError` (a dropped connection, a short body, HTTP
  5xx/408/429), :class:`RetryExhausted` (an inner policy gave up: an outer one
  may try again), I/O and network errors (``OSError`` without a permanent errno,
  botocore / aiohttp errors);
* permanent: every other distckpt error (a truncated file, no space left, a
  refused name), missing files, permissions, a full disk or quota
  (``ENOSPC``/``EDQUOT``), a read-only file system, bad arguments.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, TypeVar

from ..errors import DistCkptError, StorageError

__all__ = ["RetryPolicy", "TransientError", "RetryExhausted", "is_transient", "PERMANENT_ERRNOS"]

T = TypeVar("T")

#: errno values that no retry can fix
PERMANENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOENT", "EEXIST", "EACCES", "EPERM", "EISDIR", "ENOTDIR", "ENOSPC", "EDQUOT", "EROFS", "EFBIG",
        "ENAMETOOLONG", "ELOOP", "EINVAL", "EBADF", "ENOTEMPTY", "EXDEV", "ENXIO", "ESPIPE",
    )
    if hasattr(errno, name)
)

_PERMANENT_TYPES = (
    FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
    ValueError, TypeError, KeyError, AttributeError, NotImplementedError, ImportError, MemoryError,
    AssertionError, RecursionError,
)


class TransientError(StorageError):
    """A failure worth retrying: a dropped connection, a short body, a server error."""

    transient = True


class RetryExhausted(StorageError):
    """Every attempt failed transiently; ``attempts`` and ``last`` (the last error) say how.

    It counts as transient itself, so an outer policy (a resumable download)
    may start the whole operation again.
    """

    transient = True

    def __init__(self, message: str, *, attempts: int = 0, last: Optional[BaseException] = None):
        super().__init__(message)  # one positional argument: callers re-raise type(exc)(new message)
        self.attempts, self.last = attempts, last


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` can help (see the module docstring)."""
    if not isinstance(exc, Exception):
        return False  # KeyboardInterrupt, SystemExit, GeneratorExit
    marked = getattr(exc, "transient", None)
    if marked is not None:
        return bool(marked)
    if isinstance(exc, DistCkptError):
        return False
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return False
    return not isinstance(exc, _PERMANENT_TYPES)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the n-th retry waits ``first_delay * 2**(n-1)`` seconds
    (at most ``max_delay``), times a random factor in ``[1 - jitter, 1 + jitter]``."""

    attempts: int = 5
    first_delay: float = 0.05
    max_delay: float = 8.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be an int >= 1, got {self.attempts!r}")
        if self.first_delay < 0 or self.max_delay < 0:
            raise ValueError(f"RetryPolicy delays must be >= 0, got {self.first_delay!r}, {self.max_delay!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, retry: int, rng: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        base = min(self.max_delay, self.first_delay * (2.0**retry))
        return base * rng(1.0 - self.jitter, 1.0 + self.jitter)

    def call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        on_retry: Callable[[BaseException], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """``fn()``, retried on transient failures; permanent ones propagate at once.

        After the last failed attempt raises :class:`RetryExhausted` naming ``what``.
        """
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified by is_transient
                if not is_transient(exc):
                    raise
                if attempt == self.attempts - 1:
                    raise RetryExhausted(
                        f"{what} failed after {self.attempts} attempt(s): {type(exc).__name__}: {exc}",
                        attempts=self.attempts,
                        last=exc,
                    ) from exc
                if on_retry is not None:
                    on_retry(exc)
                sleep(self.delay(attempt))
        raise AssertionError("unreachable")
