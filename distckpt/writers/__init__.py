"""Outputs other than a distckpt checkpoint: MindSpore ``.ckpt``, ``.safetensors``, sharded and per-rank layouts.

Every writer takes :class:`OutItem` s -- a tensor's name, dtype, shape and a
``fetch()`` that produces its bytes just before they are written -- so an
output is streamed one tensor at a time in bounded memory, whatever produces
the arrays (a reader of another checkpoint, a rank's state, a transform).

Plain values (``bool``/``int``/``float``/``str``) round-trip exactly:

* ``.ckpt``: ``bool`` -> ``Bool``, ``int`` -> ``Int64``, ``float`` -> ``Float64`` scalar
  tensors (never float32: ``1e300`` stays ``1e300``), ``str`` -> MindSpore string values;
* ``.safetensors``: the same scalar tensors, and strings (which safetensors cannot
  hold) in ``__metadata__["distckpt.values"]``: a JSON object ``{name: string}``.
  MindSpore ignores metadata keys that are not tensor names.

Who calls what: the verbs in :mod:`distckpt.api` build items from a source and a
target layout, then call one of :func:`write_ckpt_file`,
:func:`write_safetensors_file`, :func:`write_sharded`, :func:`write_rank_files`
into a :class:`~distckpt.storage.Staging` area that is moved into place only on
success.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from .. import dtypes, jsonutil, naming
from ..errors import FormatError
from ..storage import Store

__all__ = [
    "OutputJob",
    "OUTPUTS",
    "output_writer",
    "OutItem",
    "constant",
    "value_array",
    "write_ckpt_file",
    "write_safetensors_file",
    "write_sharded",
    "write_weight_index",
    "group_shards",
    "decode_metadata_values",
    "copy_configs",
    "safetensors_layout",
    "VALUES_KEY",
]

#: ``__metadata__`` key of a safetensors file under which distckpt keeps string values.
VALUES_KEY = "distckpt.values"


@dataclass
class OutputJob:
    """Everything an output format needs to write SRC into a staging area.

    ``strategy`` is the target layout (None: one merged checkpoint); ``read(name, box)``
    reads a box of a source tensor (checksums verified and bytes counted as the verb
    asked); ``options`` holds the verb's format-specific options (``dst_iteration``,
    ``plain``, ``model``, ``hf_config``, ``max_shard_size``, ``prefix``, ``quiet``, ...).
    """

    store: Store
    source: Any  # distckpt.sources.Source (not imported: sources import writers)
    strategy: Any
    read: Callable[[str, Any], np.ndarray]
    options: dict


#: Output formats written by a module of their own, by import string (imported on use).
OUTPUTS: dict[str, str] = {
    "mindformers": "distckpt.writers.mindformers:write",
    "hf": "distckpt.writers.hf:write",
}


def output_writer(format: str) -> Callable[[OutputJob], list[str]]:
    """The ``write(job) -> [names written]`` of a registered output format."""
    import importlib

    mod, _, fn = OUTPUTS[format].partition(":")
    return getattr(importlib.import_module(mod), fn)


@dataclass(frozen=True)
class OutItem:
    """One tensor to write: ``fetch()`` returns exactly a ``dtype`` array of ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


def constant(arr: np.ndarray) -> Callable[[], np.ndarray]:
    """A ``fetch`` that returns ``arr``."""
    return lambda: arr


def value_array(name: str, v: Any) -> np.ndarray | str:
    """A plain value as the scalar array a ``.ckpt``/``.safetensors`` holds, or the string itself."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return np.asarray(v, dtype=np.bool_)
    if isinstance(v, int):
        if not -(1 << 63) <= v < 1 << 63:
            raise FormatError(f"value {name!r} = {v} does not fit in int64, the only integer a .ckpt/.safetensors value can hold")
        return np.asarray(v, dtype=np.int64)
    if isinstance(v, float):
        return np.asarray(v, dtype=np.float64)
    raise FormatError(f"value {name!r} has unsupported type {type(v).__name__}; use int, float, bool or str")


@contextmanager
def writing(store: Store, fname: str) -> Iterator[BinaryIO]:
    """A writer for ``fname``: the file appears whole when the block ends (never a part), or not at all.

    On a local disk the bytes go to a temporary name beside ``fname`` that is
    fsynced and renamed over it; on object stores the object is published whole
    by the upload's completion.
    """
    tmp = fname
    if store.is_local:
        head, _, base = fname.rpartition("/")
        tmp = (head + "/" if head else "") + f".{base}.tmp-{uuid.uuid4().hex[:8]}"
    f: Any = store.open_write(tmp)  # a storage Writer; the codecs take any object with write()
    try:
        yield f
        store.close_durable(f)
    except BaseException:
        abort = getattr(f, "abort", None)
        try:
            abort() if abort is not None else f.close()
        finally:
            store.remove([tmp])
        raise
    if tmp != fname:
        store.replace(tmp, fname)


def _check(item: OutItem, arr: np.ndarray) -> np.ndarray:
    if tuple(arr.shape) != tuple(item.shape) or dtypes.name_of(arr.dtype) != item.dtype:
        raise FormatError(
            f"tensor {item.name!r}: produced {dtypes.name_of(arr.dtype)}{list(arr.shape)}, expected "
            f"{item.dtype}{list(item.shape)}"
        )
    return arr if arr.flags.c_contiguous else arr.copy()


def write_ckpt_file(store: Store, fname: str, items: Sequence[OutItem], values: Mapping[str, Any]) -> None:
    """One MindSpore ``.ckpt`` (``mindspore.load_checkpoint`` loads it unchanged)."""
    from ..codecs.ckpt import CkptWriter

    for it in items:
        dtypes.ckpt_name(it.dtype, tensor=it.name)  # refuse what .ckpt cannot hold before writing
    for name, v in values.items():
        if isinstance(v, str) and v.endswith("\x00"):
            raise FormatError(
                f"value {name!r} ends in a NUL character, which a MindSpore .ckpt string cannot hold (MindSpore "
                "drops trailing NULs when it reads one); write .safetensors or a distckpt checkpoint instead"
            )
    with writing(store, fname) as f:
        w = CkptWriter(f, name=store.child_url(fname))
        for it in items:
            w.add_tensor(it.name, it.dtype, it.shape, _check(it, it.fetch()))
        add_values(w, values)
        w.close()


def add_values(w: Any, values: Mapping[str, Any]) -> None:
    """Plain values into a ``.ckpt`` writer: strings as MindSpore string values, the rest as scalar tensors."""
    for name, v in values.items():
        arr = value_array(name, v)
        if isinstance(arr, str):
            w.add_str(name, arr)
        else:
            w.add_tensor(name, dtypes.name_of(arr.dtype), (), arr)


def write_safetensors_file(
    store: Store, fname: str, items: Sequence[OutItem], values: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """One ``.safetensors`` file with MindSpore's ``{"format": "ms"}`` metadata."""
    from ..codecs.safetensors import SafetensorsWriter

    _layout, allitems, meta = safetensors_layout(items, values, metadata)
    with writing(store, fname) as f:
        w = SafetensorsWriter(f, [(it.name, it.dtype, tuple(it.shape)) for it in allitems], metadata=meta,
                              name=store.child_url(fname))
        for it in allitems:
            arr = _check(it, it.fetch())
            w.write(it.name, dtypes.byteview(arr))
        w.close()


def safetensors_layout(items: Sequence[OutItem], values: Mapping[str, Any], metadata: Mapping[str, str] | None = None):
    """The layout of the ``.safetensors`` :func:`write_safetensors_file` writes (header, offsets) and every item
    it holds: ``items``, then the plain values as scalar tensors (strings go to the header's metadata)."""
    from ..codecs.safetensors import SafetensorsWriter

    allitems = list(items)
    strings: dict[str, str] = {}
    for name, v in values.items():
        arr = value_array(name, v)
        if isinstance(arr, str):
            strings[name] = arr
        else:
            allitems.append(OutItem(name, dtypes.name_of(arr.dtype), (), constant(arr)))
    meta = {"format": "ms"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    if strings:
        meta[VALUES_KEY] = json.dumps(strings, ensure_ascii=False)
    layout = SafetensorsWriter(None, [(it.name, it.dtype, tuple(it.shape)) for it in allitems], metadata=meta)
    return layout, allitems, meta


def copy_configs(src: Any, out: Store, *, json_only: bool = False) -> None:
    """Copy SRC's config files.  ``json_only``: no YAML (MindFormers' from_pretrained takes a
    directory with a YAML for a one-file ``.ckpt`` directory and would load only the first shard),
    and a ``config.json`` derived from the YAML when SRC has none."""
    import json

    yamls = [n for n in src.config_files if naming.is_yaml(n)]
    for n in src.config_files:
        if not (json_only and n in yamls):
            out.put_atomic(n, src.storage.read_bytes(n, limit=64 << 20))
    if json_only and yamls and "config.json" not in src.config_files:
        from ..mfconfig import config_json_from_yaml

        pick = f"{src.name}.yaml" if f"{src.name}.yaml" in yamls else sorted(yamls)[0]
        doc = config_json_from_yaml(src.storage, pick)
        out.put_atomic("config.json", (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def decode_metadata_values(meta: Mapping[str, str], *, where: str = "safetensors metadata") -> dict[str, str]:
    """The string values :func:`write_safetensors_file` stored in a file's ``__metadata__``."""
    raw = meta.get(VALUES_KEY)
    if raw is None:
        return {}
    doc = jsonutil.loads(raw, where=f"{where}: {VALUES_KEY}")
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise FormatError(f"{where}: {VALUES_KEY} must be a JSON object of strings")
    return dict(doc)


def group_shards(items: Sequence[OutItem], limit: int) -> list[list[OutItem]]:
    """MindFormers' / HuggingFace's ``shard_checkpoint``: in order, a new shard when the next tensor would overflow."""
    groups: list[list[OutItem]] = [[]]
    size = 0
    for it in items:
        n = it.nbytes
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += n
    return groups


def write_sharded(
    store: Store,
    items: Sequence[OutItem],
    values: Mapping[str, Any],
    *,
    stem: str,
    ext: str,
    max_shard_size: int | None,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """``{stem}.{ext}``, or shards ``{stem}-0000k-of-0000N.{ext}`` + ``{stem}.{ext}.index.json`` (HF's weight map).

    Plain values go to the last shard.  Returns the names written.
    """
    write: Callable[..., None]
    if ext == "ckpt":
        write = write_ckpt_file
    else:
        def write(st, fname, its, vals):  # noqa: E306 - binds the metadata
            write_safetensors_file(st, fname, its, vals, metadata)

    groups = group_shards(items, max_shard_size) if max_shard_size else [list(items)]
    total = len(groups)
    if total == 1:
        fname = f"{stem}.{ext}"
        write(store, fname, items, values)
        return [fname]
    files: list[str] = []
    for k, group in enumerate(groups, 1):
        fname = naming.shard_file(stem, k, total, ext)
        write(store, fname, group, values if k == total else {})
        files.append(fname)
    return files + [write_weight_index(store, groups, values, files, stem=stem, ext=ext)]


def write_weight_index(store: Any, groups: Sequence[Sequence[OutItem]], values: Any, files: list[str], *, stem: str,
                       ext: str) -> str:
    """``{stem}.{ext}.index.json`` for shards ``files`` holding ``groups`` (plain values in the last); its name."""
    weight_map = {it.name: files[k] for k, group in enumerate(groups) for it in group}
    for v in values:
        weight_map[v] = files[-1]
    total = sum(it.nbytes for group in groups for it in group)
    idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
    idx_name = naming.weight_index_file(stem, ext)
    store.put_atomic(idx_name, (json.dumps(idx, indent=2, sort_keys=True) + "\n").encode())
    return idx_name
