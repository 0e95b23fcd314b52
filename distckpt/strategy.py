"""Reading and writing MindSpore parallel strategy files (the bytes are :mod:`distckpt.codecs.strategy`).

* :func:`load_strategy` -- a :class:`~distckpt.layout.Strategy` from a Strategy, a
  dict (distckpt or MindSpore JSON form), a file (protobuf or JSON, told apart by
  content) or a directory of per-stage files, local or any fsspec URL;
* :func:`save_strategy` -- one file (protobuf, or JSON when the name ends in ``.json``);
* :func:`save_stage_strategy_files` -- one protobuf file per pipeline stage, named as
  MindFormers names them, so the directory feeds ``mindspore.merge_pipeline_strategys``.

Every read goes through :mod:`distckpt.storage` (regular files only, size cap
before reading); every write is atomic (``put_atomic``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Union

from . import naming
from .codecs.strategy import (
    MAX_STRATEGY_BYTES,
    dump_merged_strategy_json,
    dump_merged_strategy_proto,
    dump_strategy_json,
    dump_strategy_proto,
    merge_strategies,
    parse_strategy,
    strategy_from_json,
    strategy_from_obj,
    strategy_to_json,
)
from .errors import NotFoundError, StrategyError, UsageError
from .layout import Strategy
from .storage import open_storage, split_url

__all__ = [
    "load_strategy",
    "save_strategy",
    "save_stage_strategy_files",
    "stage_file_name",
    "parse_strategy",
    "strategy_to_json",
    "strategy_from_json",
    "dump_strategy_proto",
    "dump_merged_strategy_proto",
    "MAX_STRATEGY_BYTES",
]

_SUFFIXES = (".ckpt", ".pb", ".json")


def load_strategy(
    src: Union[Strategy, Mapping, str, os.PathLike],
    *,
    storage_options: Mapping | None = None,
) -> Strategy:
    """A Strategy from whatever describes one.

    ``src`` is a :class:`Strategy` (returned as is), a dict (distckpt or
    MindSpore JSON form), or a local path / fsspec URL to a strategy file
    (protobuf or JSON, detected from the content) or to a directory of
    per-stage files (its ``*.ckpt``, ``*.pb`` and ``*.json`` files, merged as
    ``mindspore.merge_pipeline_strategys`` does, each file's stage taken from
    the file).  Files over :data:`MAX_STRATEGY_BYTES` are refused.
    """
    if isinstance(src, Strategy):
        return src
    if isinstance(src, Mapping):
        return strategy_from_obj(dict(src), name="<dict>")
    if not isinstance(src, (str, os.PathLike)):
        raise UsageError(f"load_strategy: expected a Strategy, dict, path or URL, got {type(src).__name__}")
    display = os.fspath(src)
    opts = dict(storage_options or {})
    whole = open_storage(display, opts)
    if whole.isdir():
        files = [
            n for n in whole.listdir()
            if n.lower().endswith(_SUFFIXES) and not n.startswith(".") and not whole.isdir(n)
        ]
        if not files:
            raise StrategyError(f"{display}: directory holds no strategy files (*.ckpt, *.pb, *.json)")
        parsed = [parse_strategy(_read(whole, f), name=whole.child_url(f)) for f in files]
        return merge_strategies(parsed, name=display)
    parent, base = split_url(display)
    st = open_storage(parent, opts)
    if not st.exists(base):
        raise NotFoundError(f"strategy file not found: {display}")
    return parse_strategy(_read(st, base), name=display)


def _read(store, name: str) -> bytes:
    n = store.size(name)
    if n > MAX_STRATEGY_BYTES:
        raise StrategyError(
            f"{store.child_url(name)}: {n} bytes is larger than the {MAX_STRATEGY_BYTES}-byte limit for a strategy file"
        )
    return store.read_bytes(name, limit=MAX_STRATEGY_BYTES)


def stage_file_name(strategy: Strategy, stage: int) -> str:
    """``ckpt_strategy_rank_{r}.ckpt`` with ``r`` the first rank of ``stage`` (MindFormers' naming)."""
    return naming.strategy_file(stage * strategy.stage_device_num)


def strategy_bytes(strategy: Strategy, *, format: str = "proto") -> bytes:
    """The whole strategy as one file's bytes (the merged pipeline form when it has several stages)."""
    if format == "proto":
        return dump_merged_strategy_proto(strategy) if strategy.num_stages > 1 else dump_strategy_proto(strategy)
    if format == "json":
        obj = dump_merged_strategy_json(strategy) if strategy.num_stages > 1 else dump_strategy_json(strategy)
        return json.dumps(obj, indent=2).encode("utf-8")
    raise UsageError(f"save_strategy: format must be 'proto' or 'json', got {format!r}")


def save_strategy(
    strategy: Strategy,
    path: Union[str, os.PathLike],
    *,
    format: str | None = None,
    storage_options: Mapping | None = None,
) -> str:
    """Write ``strategy`` to one file (atomically) and return its path.

    ``format`` is ``"proto"`` or ``"json"``; by default ``"json"`` if the name
    ends in ``.json`` (MindSpore decides by that suffix too), else ``"proto"``.
    A multi-stage strategy is written in the merged form
    (``"{stage}-"``-prefixed names) that ``mindspore.merge_pipeline_strategys``
    produces; a single-stage one as a stage-0 file.
    """
    path = os.fspath(path)
    if format is None:
        format = "json" if path.lower().endswith(".json") else "proto"
    data = strategy_bytes(strategy, format=format)
    parent, base = split_url(path)
    st = open_storage(parent, dict(storage_options or {}))
    st.put_atomic(base, data)
    return path


def save_stage_strategy_files(
    strategy: Strategy,
    directory: Union[str, os.PathLike],
    *,
    storage_options: Mapping | None = None,
) -> list[str]:
    """Write one protobuf strategy file per pipeline stage into ``directory``.

    Files are named :func:`stage_file_name` (``ckpt_strategy_rank_{first rank
    of the stage}.ckpt``); the directory can be given to
    ``mindspore.merge_pipeline_strategys`` or to :func:`load_strategy`.
    Returns the paths written, in stage order.
    """
    st = open_storage(os.fspath(directory), dict(storage_options or {}))
    out = []
    for s in range(strategy.num_stages):
        fname = stage_file_name(strategy, s)
        st.put_atomic(fname, dump_strategy_proto(strategy, stage=s))
        out.append(st.child_url(fname))
    return out
