"""distckpt: distributed checkpoints for MindSpore / MindFormers models.

Save from every rank at once, merge, split, reshard, and load into any
parallel layout, reading only the bytes each rank needs.  The core is numpy
only; MindSpore, mpi4py, s3fs and matplotlib are imported lazily.
"""

from .api import finalize, gc, inspect, load, merge, reshard, save, split, verify
from .errors import (
    ChecksumError,
    ConfigError,
    DestinationExistsError,
    DistCkptError,
    DistributedError,
    DownloadError,
    FormatError,
    LayoutError,
    MissingDependencyError,
    NotCommittedError,
    StorageError,
    StrategyError,
)
from .execute import ReadStats
from .layout import Box, ParamSpec, Strategy, TensorLayout
from .strategy import load_strategy, save_strategy

__version__ = "0.1.0"

__all__ = [
    "save",
    "load",
    "merge",
    "split",
    "reshard",
    "verify",
    "inspect",
    "finalize",
    "gc",
    "CheckpointManager",
    "load_strategy",
    "save_strategy",
    "ReadStats",
    "Box",
    "TensorLayout",
    "ParamSpec",
    "Strategy",
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
]


def __getattr__(name):
    if name == "CheckpointManager":
        from .manager import CheckpointManager

        return CheckpointManager
    raise AttributeError(f"module 'distckpt' has no attribute {name!r}")
