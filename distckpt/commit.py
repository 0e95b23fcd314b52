"""The commit protocol of a distckpt checkpoint: markers, reports, the index, finalize and gc.

Who does what, in which order, for one save into directory D:

1. (coordinator, before any data file exists) :func:`write_marker` writes
   ``.distckpt-save-{save_id}.json`` -- the proof, for :func:`gc`, that files
   of this save id in D are distckpt's;
2. (every writing rank) writes ``data-{save_id}-{rank}.safetensors`` and
   returns a report (:func:`report`): its file and size, and its chunk records;
3. (coordinator) :func:`build_index` from all reports (checks that the chunks
   tile every tensor exactly), then :func:`commit`: the index is written last
   and atomically -- its presence *is* the commit -- then data files of the
   previous committed save that the new index does not name are removed, and
   this save's marker (the index now proves its files).

A rank-mode save (``save(..., rank=r)`` without a communicator) ends at step 2
with a manifest ``.manifest-{rank}.json`` per rank; :func:`finalize` is step 3.

:func:`gc` deletes only what it can prove distckpt wrote: data files and
manifests of a save whose marker or manifest is present and that the
committed index does not name, markers of saves that can no longer commit,
temp files of the index commit, and leftover staging areas whose own marker
proves them (:func:`distckpt.storage.find_staging_debris`).  A directory with
no index, no marker and no manifest is not a distckpt checkpoint: ``gc``
refuses it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from . import jsonutil, naming
from .errors import DistCkptError, FormatError, NotCommittedError, NotFoundError, StrategyError
from .index import MAX_INDEX_BYTES, Chunk, Index, encode_value
from .layout import check_tiling
from .storage import Store, open_storage

__all__ = ["write_marker", "report", "build_index", "commit", "finalize", "gc", "values_json", "distckpt_files"]


def write_marker(store: Store, save_id: str, *, rank: int | None = None) -> None:
    """Record that a save with ``save_id`` writes into ``store`` (before any of its data files)."""
    doc = {"format": "distckpt-save", "save_id": save_id, "rank": rank, "pid": os.getpid(),
           "host": socket.gethostname(), "time": time.time()}
    store.makedirs()
    store.put(naming.save_marker(save_id), json.dumps(doc).encode())


def report(rank: int, files: Mapping[str, int], tensors: Mapping[str, tuple[str, tuple[int, ...]]],
           chunks: Mapping[str, list[Chunk]]) -> dict:
    """One rank's report to the coordinator: what it wrote (JSON)."""
    return {
        "rank": rank,
        "files": dict(files),
        "tensors": {n: [dt, list(s)] for n, (dt, s) in tensors.items()},
        "chunks": {n: [c.to_json() for c in cs] for n, cs in chunks.items()},
    }


def values_json(values: Mapping[str, Any]) -> dict:
    return {k: encode_value(k, v) for k, v in values.items()}


def build_index(
    reports: list[dict],
    *,
    save_id: str,
    world_size: int,
    checksum: str,
    block_size: int,
    strategy: dict | None,
    metadata: Mapping[str, Any],
    values: dict,
    where: str,
) -> Index:
    """The index of a save from every writing rank's report; refuses chunks that do not tile a tensor."""
    doc_tensors: dict[str, dict] = {}
    files: dict[str, int] = {}
    shapes: dict[str, list] = {}
    for rep in reports:
        for name, ds in rep["tensors"].items():
            if name in shapes and list(shapes[name]) != list(ds):
                raise StrategyError(
                    f"{where}: {name}: rank {rep.get('rank')} saved it as {ds[0]}{list(ds[1])}, another rank as "
                    f"{shapes[name][0]}{list(shapes[name][1])}: every rank must describe the same global tensor"
                )
            shapes[name] = ds
        files.update(rep["files"])
        for name, cs in rep["chunks"].items():
            doc_tensors.setdefault(name, {"chunks": []})["chunks"].extend(cs)
    for name, (dt, shape) in shapes.items():
        doc_tensors.setdefault(name, {"chunks": []}).update({"dtype": dt, "shape": shape})
    doc = {
        "format": "distckpt",
        "version": 1,
        "save_id": save_id,
        "world_size": world_size,
        "checksum": {"algorithm": checksum, "block_size": block_size},
        "files": {k: {"size": v} for k, v in files.items()},
        "tensors": doc_tensors,
        "values": values,
        "strategy": strategy,
        "metadata": dict(metadata),
    }
    index = Index.from_json(doc, where=where)
    for name, t in index.tensors.items():
        check_tiling(t.shape, [c.box for c in t.chunks], name=name)
    return index


def _committed_files(store: Store) -> set[str]:
    if not store.exists(naming.INDEX_NAME):
        return set()
    try:
        return set(Index.loads(store.read_bytes(naming.INDEX_NAME, limit=MAX_INDEX_BYTES)).files)
    except DistCkptError:
        return set()


def commit(store: Store, index: Index) -> None:
    """Write the index last (atomic), then drop data files no committed index names, and the save's marker."""
    old = _committed_files(store)
    store.put_atomic(naming.INDEX_NAME, index.dumps())
    store.remove(sorted(old - set(index.files)))
    if index.save_id:
        store.remove([naming.save_marker(index.save_id)])


def _read_manifest(store: Store, name: str) -> dict:
    where = store.child_url(name)
    doc = jsonutil.loads(store.read_bytes(name, limit=MAX_INDEX_BYTES), where=f"{where}: manifest")
    need = {"rank": int, "save_id": str, "world_size": int, "files": dict, "tensors": dict, "chunks": dict,
            "block_size": int, "checksum": str, "metadata": dict}
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: manifest must be a JSON object")
    for key, typ in need.items():
        if not isinstance(doc.get(key), typ) or isinstance(doc.get(key), bool):
            raise FormatError(f"{where}: manifest field {key!r} is missing or not a {typ.__name__}")
    if doc["rank"] != naming.rank_of_manifest(name):
        raise FormatError(f"{where}: manifest says rank {doc['rank']} but is named for rank {naming.rank_of_manifest(name)}")
    if not naming.SAVE_ID.match(doc["save_id"]):
        raise FormatError(f"{where}: save_id {doc['save_id']!r} is not a distckpt save id")
    for fname, size in doc["files"].items():
        if naming.save_id_of(fname) != doc["save_id"] or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{where}: file entry {fname!r}: {size!r} is not one of this save's data files with a size")
    return doc


def finalize(path, *, storage_options: dict | None = None) -> dict:
    """Commit a rank-mode save once every rank's manifest is present."""
    store = open_storage(path, storage_options)
    names = [n for n in store.listdir() if naming.is_manifest(n)]
    if not names:
        raise NotCommittedError(f"{store.url}: no rank manifests to finalize (did every rank call save(rank=...)?)")
    reports = [_read_manifest(store, n) for n in sorted(names)]
    world = reports[0]["world_size"]
    ranks = sorted(r["rank"] for r in reports)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        extra = sorted(set(ranks) - set(range(world)))
        what = f"rank(s) {missing[:8]} are missing" if missing else f"rank(s) {extra[:8]} are outside the world"
        raise NotCommittedError(
            f"{store.url}: manifests of {what}; every one of the {world} ranks must save before finalize"
        )
    base = reports[0]
    for r in reports:
        if r.get("strategy") != base.get("strategy") or r["world_size"] != world:
            raise StrategyError(f"{store.url}: rank {r['rank']} saved with a different strategy or world size than rank 0")
    index = build_index(
        reports,
        save_id=base["save_id"],
        world_size=world,
        checksum=base["checksum"],
        block_size=base["block_size"],
        strategy=base.get("strategy"),
        metadata=base["metadata"],
        values=base.get("values") or {},
        where=store.child_url(naming.INDEX_NAME),
    )
    for fname, size in index.files.items():
        if not store.exists(fname) or store.size(fname) != size:
            raise NotCommittedError(f"{store.child_url(fname)}: data file missing or of the wrong size; re-run the save")
    commit(store, index)
    markers = [naming.save_marker(r["save_id"]) for r in reports]
    store.remove(names + markers)
    return {"path": store.url, "tensors": len(index.tensors), "files": len(index.files)}


def gc(path, *, storage_options: dict | None = None, dry_run: bool = False) -> list[str]:
    """Remove what failed saves left behind, and only what is provably distckpt's (see the module doc)."""
    from .storage import find_staging_debris

    store = open_storage(path, storage_options)
    if not store.exists():
        raise NotFoundError(f"{store.url}: no such directory")
    if not store.isdir():
        raise NotFoundError(f"{store.url}: is a file; gc takes a checkpoint directory (or the parent of one)")
    names = store.listdir()
    staging = find_staging_debris(store)
    committed: set[str] = set()
    committed_id = ""
    if naming.INDEX_NAME in names:
        try:
            idx = Index.loads(store.read_bytes(naming.INDEX_NAME, limit=MAX_INDEX_BYTES),
                              where=store.child_url(naming.INDEX_NAME))
        except DistCkptError as exc:
            raise FormatError(f"{exc}; gc refuses to guess what to delete next to a corrupt index") from None
        committed, committed_id = set(idx.files), idx.save_id
    markers = {naming.save_id_of(n) for n in names if naming.is_save_marker(n)}
    manifests = [n for n in names if naming.is_manifest(n)]
    proven: set[str] = {s for s in markers if s}
    for m in manifests:
        try:
            proven.add(_read_manifest(store, m)["save_id"])
        except DistCkptError:
            continue  # not provably ours: leave it
    if not committed and not proven and not staging and naming.INDEX_NAME not in names:
        raise NotCommittedError(
            f"{store.url} is not a distckpt checkpoint directory (no {naming.INDEX_NAME}, no save markers, no manifests, "
            "no distckpt staging areas): gc deletes only files distckpt can prove it wrote"
        )
    debris = []
    for n in names:
        sid = naming.save_id_of(n)
        if naming.is_data_file(n) and n not in committed and sid in proven:
            debris.append(n)
        elif naming.is_save_marker(n) and sid != committed_id:
            debris.append(n)  # a save that did not commit (a committed save's marker goes at commit)
        elif naming.is_manifest(n) and committed_id:
            debris.append(n)
        elif (committed or proven) and _our_temp(n):
            debris.append(n)  # a write of one of our files interrupted before its rename
    debris += [n for n in staging if n not in debris]
    if not dry_run:
        store.remove(debris)
    return sorted(debris)



def _our_temp(name: str) -> bool:
    """A temporary name (``.{base}.tmp-{id}``) of a file only distckpt writes (index, manifest, marker, data)."""
    from .storage.base import TMP_NAME_RE

    m = TMP_NAME_RE.match(name)
    if not m:
        return False
    base = m.group("base")
    return (base == naming.INDEX_NAME or naming.is_manifest(base) or naming.is_save_marker(base)
            or naming.is_data_file(base))


def distckpt_files(store: Store) -> list[str]:
    """Every file of a distckpt checkpoint in ``store`` that distckpt can prove it wrote (index last).

    For callers that replace a distributed save with another layout in the same
    directory (``save_pretrained``): the data files the committed index names,
    debris that :func:`gc` would remove, then the index itself.
    """
    names = store.listdir()
    if naming.INDEX_NAME not in names and not any(naming.is_save_marker(n) or naming.is_manifest(n) for n in names):
        return []
    out = gc(store, dry_run=True)
    if naming.INDEX_NAME in names:
        try:
            idx = Index.loads(store.read_bytes(naming.INDEX_NAME, limit=MAX_INDEX_BYTES))
            out += [f for f in idx.files if f not in out]
        except DistCkptError:
            pass
        out.append(naming.INDEX_NAME)
    return out
