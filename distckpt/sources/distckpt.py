"""A committed distckpt checkpoint: ``distckpt.index.json`` plus the files it names (data files; in
index version 2 also the chunk table and the checksum column, opened here, mapped on local disks)."""

from __future__ import annotations

from .. import naming
from ..errors import NotCommittedError
from ..index import MAX_INDEX_BYTES, Index
from ..storage import Store, safe_name

__all__ = ["read_index", "uncommitted_debris"]


def read_index(storage: Store) -> Index:
    """Parse and validate the committed index (either version; a version-2 chunk table is opened, not
    read per chunk); data files are then read only through it."""
    storage.confined = True  # data files are named by the index: never follow a symlink out
    where = storage.child_url(naming.INDEX_NAME)
    index = Index.loads(storage.read_bytes(naming.INDEX_NAME, limit=MAX_INDEX_BYTES), where=where, store=storage)
    for fname in index.files:
        safe_name(fname, what=f"data file name in {where}")
    return index


def uncommitted_debris(storage: Store, names: list[str]) -> None:
    """Refuse a directory that holds a distckpt save's files but no index (a save that did not finish)."""
    if any(naming.is_data_file(n) or naming.is_manifest(n) or naming.is_save_marker(n) or naming.is_index_blob(n)
           or naming.is_manifest_table(n) for n in names):
        raise NotCommittedError(
            f"not a committed checkpoint: {storage.url} has data files but no {naming.INDEX_NAME} "
            "(the save did not finish; run `distckpt finalize` for rank-mode saves, or `distckpt gc` to clean up)"
        )
