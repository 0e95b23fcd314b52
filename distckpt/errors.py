"""Every exception distckpt raises on purpose.

Each class doubles as the matching built-in (zarr style), so callers that catch
``FileNotFoundError`` or ``ValueError`` keep working.  Messages name the file,
the tensor and the problem, and where possible the fix.
"""

from __future__ import annotations

__all__ = [
    "DistCkptError",
    "FormatError",
    "LayoutError",
    "StrategyError",
    "NotCommittedError",
    "ChecksumError",
    "StorageError",
    "DestinationExistsError",
    "DistributedError",
    "ConfigError",
    "DownloadError",
    "MissingDependencyError",
    "NotFoundError",
    "UsageError",
    "OutOfSpaceError",
]


class DistCkptError(Exception):
    """Base of every distckpt error."""


class FormatError(DistCkptError, ValueError):
    """A file is malformed: bad header, bad protobuf, bad JSON, bad sizes."""


class LayoutError(DistCkptError, ValueError):
    """A layout is inconsistent: shapes that do not divide, chunks that do not tile."""


class StrategyError(DistCkptError, ValueError):
    """A parallel strategy file is malformed or does not fit the tensors."""


class NotFoundError(DistCkptError, FileNotFoundError):
    """A path, file or tensor that was named does not exist."""


class NotCommittedError(NotFoundError):
    """A path holds no committed checkpoint (no index)."""


class ChecksumError(DistCkptError, ValueError):
    """Stored bytes do not match their checksum."""


class StorageError(DistCkptError, OSError):
    """A storage operation failed after retries."""


class OutOfSpaceError(StorageError):
    """The destination ran out of space (ENOSPC, EDQUOT) while writing."""


class DestinationExistsError(DistCkptError, FileExistsError):
    """An output path already exists and ``overwrite`` was not given."""


class DistributedError(DistCkptError, RuntimeError):
    """One or more ranks failed; raised identically on every rank."""

    def __init__(self, message: str, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


class ConfigError(DistCkptError, ValueError):
    """A YAML job config or option is invalid."""


class UsageError(DistCkptError, TypeError, ValueError):
    """The caller passed options that cannot work together or a wrong argument; the CLI exits 2."""


class DownloadError(DistCkptError, FileNotFoundError):
    """A model name or file could not be resolved or downloaded."""


class MissingDependencyError(DistCkptError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str):
    """Import an optional dependency, or fail with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is required for this operation but is not installed: "
            f"pip install 'distckpt[{extra}]' ({exc})"
        ) from exc
