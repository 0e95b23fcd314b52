"""Open any SRC the CLI accepts as one virtual index of chunks.

Kinds of SRC:

* ``distckpt``   -- a committed distckpt checkpoint (``distckpt.index.json``);
* ``native``     -- a MindSpore distributed directory ``rank_*/`` of ``.ckpt`` or
  ``.safetensors`` files, with a strategy (given, or found inside);
* ``file``       -- one ``.ckpt`` or ``.safetensors`` file;
* ``pretrained`` -- a MindFormers ``save_pretrained`` directory (``*.yaml`` +
  ``*.ckpt``, or ``config.json`` + ``mindspore_model.ckpt[.index.json]``), or a
  HuggingFace-style ``model.safetensors[.index.json]`` directory.

Only headers are read here; tensor bytes are read later, by box.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import DistCkptError, FormatError, NotCommittedError, StrategyError
from .formats import Entry
from .formats.ckpt import scan_ckpt
from .formats.safetensors import read_safetensors_header
from .index import INDEX_NAME, MAX_INDEX_BYTES, Chunk, Index, TensorInfo
from .layout import Box, Strategy, check_tiling, full_box
from .storage import Storage, open_storage, safe_name, split_url
from .strategy import load_strategy, strategy_from_json

__all__ = ["Source", "open_source", "CONFIG_FILES"]

CONFIG_FILES = ("config.json", "generation_config.json")
_RANK_DIR = re.compile(r"^rank_(\d+)$")
_DATA_FILE = re.compile(r"^data-[0-9A-Za-z]+-[0-9a-f]+-\d{5}\.safetensors$")  # api._data_name
_STRATEGY_FILE = re.compile(r".*strateg.*\.(ckpt|pb|json)$", re.IGNORECASE)
_TRAILING_NUM = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class Source:
    """A readable checkpoint: storage, virtual index, the strategy it was saved with."""

    storage: Storage
    index: Index
    kind: str
    strategy: Strategy | None = None
    config_files: list[str] = field(default_factory=list)
    name: str = "mindspore_model"
    world_size: int = 1

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.index.tensors

    @property
    def values(self) -> dict[str, Any]:
        return self.index.values


def _file_entries(storage: Storage, fname: str) -> tuple[list[Entry], dict | None]:
    """Scan a .ckpt or .safetensors file's headers."""
    where = storage.child_url(fname)
    try:
        size = storage.size(fname)
        if size == 0:
            raise FormatError(f"{where}: empty file (0 bytes); it holds no checkpoint")
        f = storage.open_read(fname)
    except FileNotFoundError:
        raise NotCommittedError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise FormatError(f"{where}: is a directory, expected a .ckpt or .safetensors file") from None
    with f:
        if fname.endswith(".safetensors"):
            entries, meta = read_safetensors_header(f, size=size, name=where)
            return entries, meta
        return scan_ckpt(f, size=size, name=where), None


def _entry_value(storage: Storage, fname: str, e: Entry) -> Any:
    """A ``str`` entry's Python value (small, read whole)."""
    data = bytearray()
    for start, length in e.segments:
        if length > (64 << 20):
            raise FormatError(f"{storage.child_url(fname)}: string value {e.name!r} is {length} bytes; refusing")
        data += storage.read_range(fname, start, length)
    if len(data) % 4:
        raise FormatError(f"{storage.child_url(fname)}: string value {e.name!r} has {len(data)} bytes, not UTF-32")
    try:
        return bytes(data).decode("utf-32-le")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{storage.child_url(fname)}: string value {e.name!r} is not valid UTF-32 ({exc})") from None


def _full_chunk(fname: str, e: Entry) -> Chunk:
    return Chunk(full_box(e.shape), fname, tuple(e.segments))


def _from_files(storage: Storage, files: list[str], kind: str) -> Index:
    """Full tensors from one or several files (MindFormers shards, single files)."""
    tensors: dict[str, TensorInfo] = {}
    values: dict[str, Any] = {}
    for fname in files:
        entries, _ = _file_entries(storage, fname)
        for e in entries:
            if e.name in tensors or e.name in values:
                raise FormatError(f"{storage.child_url(fname)}: tensor {e.name!r} appears in more than one file")
            if e.dtype == "str":
                values[e.name] = _entry_value(storage, fname, e)
            else:
                tensors[e.name] = TensorInfo(e.name, e.dtype, tuple(e.shape), (_full_chunk(fname, e),))
    return Index(tensors=tensors, values=values)


def _pick_rank_file(storage: Storage, rank_dir: str) -> str:
    try:
        names = [n for n in storage.listdir(rank_dir) if n.endswith((".ckpt", ".safetensors"))]
    except NotADirectoryError:
        raise FormatError(f"{storage.child_url(rank_dir)}: is a file; a rank directory must be a directory") from None
    ckpts = sorted(n for n in names if n.endswith(".ckpt"))
    if ckpts:  # MindSpore takes the last name in sort order
        return f"{rank_dir}/{ckpts[-1]}"
    sts = [n for n in names if n.endswith(".safetensors")]
    if sts:  # ... and the safetensors file with the largest trailing number
        def key(n: str):
            m = _TRAILING_NUM.search(n[: -len(".safetensors")])
            return (int(m.group(1)) if m else -1, n)

        return f"{rank_dir}/{max(sts, key=key)}"
    raise FormatError(f"{storage.child_url(rank_dir)}: no .ckpt or .safetensors file in this rank directory")


def _find_strategy(storage: Storage) -> str | None:
    cands = [n for n in storage.listdir() if _STRATEGY_FILE.match(n) and not storage.isdir(n)]
    if not cands:
        if storage.isdir("strategy"):
            sub = [n for n in storage.listdir("strategy") if n.endswith((".ckpt", ".pb", ".json"))]
            if sub:
                return storage.child_url("strategy")
        return None
    if len(cands) > 1:
        raise StrategyError(
            f"{storage.url}: several strategy files ({', '.join(cands)}); pass the one this job saved with as --src-strategy"
        )
    return storage.child_url(cands[0])


def _from_native(storage: Storage, rank_dirs: dict[int, str], strategy: Strategy | None) -> tuple[Index, Strategy]:
    if strategy is None:
        raise StrategyError(
            f"{storage.url}: a MindSpore distributed checkpoint ({len(rank_dirs)} rank directories) needs its "
            "parallel strategy: pass --src-strategy FILE (the strategy this job saved with)"
        )
    world = strategy.world_size
    have = sorted(rank_dirs)
    missing = list(itertools.islice((r for r in range(world) if r not in rank_dirs), 9))
    if missing:
        shown = f"rank_{have[0]}..rank_{have[-1]}" if have else "no rank directories"
        raise StrategyError(
            f"strategy has {world} ranks but {storage.url} has {shown} (missing "
            f"{', '.join(f'rank_{r}' for r in missing[:8])}{'...' if len(missing) > 8 else ''}): "
            "pass the strategy this job saved with"
        )
    tensors: dict[str, TensorInfo] = {}
    values: dict[str, Any] = {}
    chunks: dict[str, dict[tuple, Chunk]] = {}
    seen: dict[str, set[int]] = {}
    for r in range(world):
        fname = _pick_rank_file(storage, rank_dirs[r])
        entries, _ = _file_entries(storage, fname)
        for e in entries:
            where = f"{storage.child_url(fname)}: tensor {e.name!r}"
            if e.dtype == "str":
                values.setdefault(e.name, _entry_value(storage, fname, e))
                continue
            if e.name not in strategy:
                if e.name not in tensors:
                    tensors[e.name] = TensorInfo(e.name, e.dtype, tuple(e.shape), (_full_chunk(fname, e),))
                continue
            if not strategy.holds(e.name, r):
                continue  # another stage's copy; MindSpore ignores it too
            try:
                shape = strategy.global_shape(e.name, e.shape)
                spec = strategy.params[e.name]
                if spec.shape is not None and tuple(spec.shape) != shape:
                    raise StrategyError(
                        f"strategy says global shape {list(spec.shape)} but rank {r} holds {list(e.shape)} "
                        f"(x splits {list(spec.layout.full_splits())} = {list(shape)})"
                    )
                spec.layout.validate(shape, e.name)
            except DistCkptError as exc:
                raise StrategyError(f"{where}: {exc}") from None
            prev = tensors.get(e.name)
            if prev is not None and (prev.shape != shape or prev.dtype != e.dtype):
                raise StrategyError(
                    f"{where}: rank {r} implies {e.dtype}{list(shape)}, other ranks {prev.dtype}{list(prev.shape)}"
                )
            tensors[e.name] = TensorInfo(e.name, e.dtype, shape)
            box = strategy.box(e.name, r, shape)
            assert box is not None
            if tuple(box.sizes) != tuple(e.shape):
                raise StrategyError(f"{where}: rank {r} holds shape {list(e.shape)}, the strategy gives it {list(box.sizes)}")
            chunks.setdefault(e.name, {}).setdefault(box.offsets, Chunk(box, fname, tuple(e.segments), rank=r))
            seen.setdefault(e.name, set()).add(r)
    for name in strategy.params:
        holders = strategy.ranks_holding(name)
        got = seen.get(name, set())
        lacking = [int(r) for r in holders if int(r) not in got]
        if got and lacking:
            r = lacking[0]
            raise StrategyError(
                f"{storage.child_url(rank_dirs[r])}: rank {r}'s file has no parameter {name!r}, "
                "which the strategy places on it"
            )
    for name, info in list(tensors.items()):
        if name in chunks:
            cs = tuple(chunks[name].values())
            check_tiling(info.shape, [c.box for c in cs], name=name)
            tensors[name] = TensorInfo(name, info.dtype, info.shape, cs)
    return Index(tensors=tensors, values=values, world_size=world), strategy


def _pretrained_files(storage: Storage, names: list[str]) -> tuple[list[str], str] | None:
    """Weights of a MindFormers / HuggingFace directory, and the model name stem."""
    yamls = [n for n in names if n.endswith((".yaml", ".yml"))]
    stem = os.path.splitext(yamls[0])[0] if yamls else "mindspore_model"
    for idx_name in ("mindspore_model.ckpt.index.json", "model.safetensors.index.json") + tuple(
        n for n in names if n.endswith((".ckpt.index.json", ".safetensors.index.json"))
    ):
        if idx_name in names:
            try:
                doc = json.loads(storage.read_bytes(idx_name, limit=MAX_INDEX_BYTES))
                wm = doc["weight_map"]
                files = sorted({safe_name(v, what=f"shard name in {idx_name}") for v in wm.values()})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise FormatError(f"{storage.child_url(idx_name)}: malformed weight index ({exc})") from None
            return files, idx_name.split(".")[0] if not yamls else stem
    ckpts = sorted(n for n in names if n.endswith(".ckpt") and not _STRATEGY_FILE.match(n))
    if ckpts:
        pick = f"{stem}.ckpt" if f"{stem}.ckpt" in ckpts else ckpts[0]
        return [pick], stem
    sts = sorted(n for n in names if n.endswith(".safetensors"))
    if sts:
        return sts, stem if yamls else os.path.splitext(sts[0])[0].split("-")[0]
    return None


def open_source(
    src,
    *,
    src_strategy=None,
    storage_options: Mapping | None = None,
) -> Source:
    """Open SRC (see module doc); raise a clear error for anything else."""
    if isinstance(src, Source):
        return src
    url = os.fspath(src)
    opts = dict(storage_options or {})
    if url.endswith((".ckpt", ".safetensors")):
        parent, base = split_url(url)
        storage = open_storage(parent, opts)
        if not storage.exists(base):
            raise NotCommittedError(f"{url}: no such file")
        if not storage.isdir(base):  # a directory named x.ckpt is read as a directory below
            index = _from_files(storage, [base], "file")
            return Source(storage, index, "file", name=os.path.splitext(base)[0])
    storage = open_storage(url, opts)
    names = storage.listdir()
    if not names and not storage.exists():
        raise NotCommittedError(f"{url}: no such file or directory")
    strategy = load_strategy(src_strategy, storage_options=opts) if src_strategy is not None else None
    configs = [n for n in names if n.endswith((".yaml", ".yml")) or n in CONFIG_FILES]
    if INDEX_NAME in names:
        storage.confined = True  # data files are named by the index: never follow a symlink out
        index = Index.loads(storage.read_bytes(INDEX_NAME, limit=MAX_INDEX_BYTES), where=storage.child_url(INDEX_NAME))
        for fname in index.files:
            safe_name(fname, what=f"data file name in {storage.child_url(INDEX_NAME)}")
        saved = strategy_from_json(index.strategy) if index.strategy else None
        stem = index.metadata.get("name") if isinstance(index.metadata.get("name"), str) else None
        return Source(storage, index, "distckpt", strategy or saved, configs, stem or _stem(configs), index.world_size)
    if any(_DATA_FILE.match(n) for n in names) or any(n.startswith(".manifest-") for n in names):
        raise NotCommittedError(
            f"not a committed checkpoint: {url} has data files but no {INDEX_NAME} "
            "(the save did not finish; run `distckpt finalize` for rank-mode saves, or `distckpt gc` to clean up)"
        )
    rank_dirs = {int(m.group(1)): n for n in names if (m := _RANK_DIR.match(n))}
    if rank_dirs:
        if strategy is None:
            found = _find_strategy(storage)
            if found is not None:
                strategy = load_strategy(found, storage_options=opts)
        index, strategy = _from_native(storage, rank_dirs, strategy)
        return Source(storage, index, "native", strategy, configs, _stem(configs), strategy.world_size)
    got = _pretrained_files(storage, names)
    if got is not None:
        files, stem = got
        index = _from_files(storage, files, "pretrained")
        return Source(storage, index, "pretrained", strategy, configs, stem)
    if any(n.startswith("data-") for n in names) or any(n.startswith(".manifest-") for n in names):
        raise NotCommittedError(
            f"not a committed checkpoint: {url} has data files but no {INDEX_NAME} "
            "(the save did not finish; run `distckpt finalize` for rank-mode saves, or `distckpt gc` to clean up)"
        )
    raise NotCommittedError(
        f"not a checkpoint: {url} holds no {INDEX_NAME}, no rank_*/ directories, and no .ckpt/.safetensors weights"
    )


def _stem(configs: list[str]) -> str:
    for n in configs:
        if n.endswith((".yaml", ".yml")):
            return os.path.splitext(n)[0]
    return "mindspore_model"


def box_of(tensor: TensorInfo, strategy: Strategy | None, rank: int) -> Box | None:
    """The box of ``tensor`` that ``rank`` holds under ``strategy`` (full when absent from it)."""
    if strategy is None or tensor.name not in strategy:
        return full_box(tensor.shape)
    if not strategy.holds(tensor.name, rank):
        return None
    spec = strategy.params[tensor.name]
    try:
        spec.layout.validate(tensor.shape, tensor.name)
    except DistCkptError as exc:
        raise StrategyError(f"destination strategy does not fit the checkpoint: {exc}") from None
    return spec.layout.box(rank, tensor.shape)
