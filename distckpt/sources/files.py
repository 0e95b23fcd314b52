"""Sources made of whole tensors in ``.ckpt`` / ``.safetensors`` files.

* ``file``       -- one ``.ckpt`` or ``.safetensors`` file;
* ``pretrained`` -- a MindFormers ``save_pretrained`` directory (``*.yaml`` + ``*.ckpt``,
  or ``config.json`` + ``mindspore_model.ckpt[.index.json]`` + shards), or a
  HuggingFace-style ``model.safetensors[.index.json]`` directory.

Only headers are read here; tensor bytes are read later, by box.
"""

from __future__ import annotations

import os
from typing import Any

from .. import jsonutil, naming
from ..codecs import Entry
from ..codecs.ckpt import scan_ckpt
from ..codecs.safetensors import read_safetensors_header
from ..errors import FormatError, NotFoundError
from ..index import MAX_INDEX_BYTES, Chunk, Index, TensorInfo
from ..layout import full_box
from ..storage import Store, safe_name

__all__ = ["file_entries", "entry_value", "index_of_files", "pretrained_files", "MAX_STRING_BYTES"]

#: A MindSpore string value larger than this is refused (they hold names, not data).
MAX_STRING_BYTES = 64 << 20


def file_entries(storage: Store, fname: str) -> tuple[list[Entry], dict | None]:
    """Scan a .ckpt or .safetensors file's headers: its entries and (safetensors) metadata."""
    where = storage.child_url(fname)
    try:
        size = storage.size(fname)
        if size == 0:
            raise FormatError(f"{where}: empty file (0 bytes); it holds no checkpoint")
        f = storage.open_read(fname)
    except FileNotFoundError:
        raise NotFoundError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise FormatError(f"{where}: is a directory, expected a .ckpt or .safetensors file") from None
    with f:
        if fname.endswith(".safetensors"):
            entries, meta = read_safetensors_header(f, size=size, name=where)
            return entries, meta
        return scan_ckpt(f, size=size, name=where), None


def entry_value(storage: Store, fname: str, e: Entry) -> Any:
    """A ``str`` entry's Python value (small, read whole)."""
    data = bytearray()
    for start, length in e.segments:
        if length > MAX_STRING_BYTES:
            raise FormatError(f"{storage.child_url(fname)}: string value {e.name!r} is {length} bytes; refusing")
        data += storage.read_range(fname, start, length)
    if len(data) % 4:
        raise FormatError(f"{storage.child_url(fname)}: string value {e.name!r} has {len(data)} bytes, not UTF-32")
    try:  # as MindSpore decodes it (a numpy "U" string): trailing NULs are padding ("" is stored as one NUL)
        return bytes(data).decode("utf-32-le").rstrip("\x00")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{storage.child_url(fname)}: string value {e.name!r} is not valid UTF-32 ({exc})") from None


def full_chunk(fname: str, e: Entry) -> Chunk:
    return Chunk(full_box(e.shape), fname, tuple(e.segments))


def index_of_files(storage: Store, files: list[str]) -> Index:
    """Full tensors from one or several files (MindFormers shards, single files)."""
    tensors: dict[str, TensorInfo] = {}
    values: dict[str, Any] = {}
    for fname in files:
        entries, meta = file_entries(storage, fname)
        for e in entries:
            if e.name in tensors or e.name in values:
                raise FormatError(f"{storage.child_url(fname)}: tensor {e.name!r} appears in more than one file")
            if e.dtype == "str":
                values[e.name] = entry_value(storage, fname, e)
            else:
                tensors[e.name] = TensorInfo(e.name, e.dtype, tuple(e.shape), (full_chunk(fname, e),))
        values.update(_metadata_values(meta, tensors, values))
    return Index(tensors=tensors, values=values)


def _metadata_values(meta: dict | None, tensors: dict, values: dict) -> dict[str, Any]:
    """Plain values distckpt stored in a safetensors ``__metadata__`` (see :mod:`distckpt.writers`)."""
    from ..writers import decode_metadata_values

    if not meta:
        return {}
    got = decode_metadata_values(meta)
    return {k: v for k, v in got.items() if k not in tensors and k not in values}


def pretrained_files(storage: Store, names: list[str]) -> tuple[list[str], str] | None:
    """Weights of a MindFormers / HuggingFace directory, and the model name stem."""
    yamls = [n for n in names if naming.is_yaml(n)]
    stem = os.path.splitext(yamls[0])[0] if yamls else naming.DEFAULT_STEM
    candidates: tuple[str, ...] = (naming.weight_index_file(naming.DEFAULT_STEM, "ckpt"),
                                   naming.weight_index_file("model", "safetensors"))
    candidates += tuple(n for n in names if n.endswith((".ckpt.index.json", ".safetensors.index.json")))
    for idx_name in candidates:
        if idx_name in names:
            where = storage.child_url(idx_name)
            doc = jsonutil.loads(storage.read_bytes(idx_name, limit=MAX_INDEX_BYTES), where=where)
            wm = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(wm, dict):
                raise FormatError(f"{where}: malformed weight index (no 'weight_map' object)")
            files = sorted({safe_name(v, what=f"shard name in {idx_name}") for v in wm.values()})
            missing = [f for f in files if f not in names]
            if missing:
                raise NotFoundError(f"{where}: names shard {missing[0]!r}, which is not in {storage.url}")
            return files, idx_name.split(".")[0] if not yamls else stem
    ckpts = sorted(n for n in names if n.endswith(".ckpt") and not naming.STRATEGY_FILE.match(n))
    if ckpts:
        pick = f"{stem}.ckpt" if f"{stem}.ckpt" in ckpts else ckpts[0]
        return [pick], stem
    sts = sorted(n for n in names if n.endswith(".safetensors"))
    if sts:
        return sts, stem if yamls else os.path.splitext(sts[0])[0].split("-")[0]
    return None
