"""MindFormers 1.9's own distributed checkpoint (``mindformers.checkpoint``) as a source.

What SRC may be (see ``docs/mindformers_format.md``):

* a **root**: ``latest_checkpointed_iteration.txt`` (the tracker, the only commit marker) and/or
  ``iteration_{N:08d}/`` directories.  The tracker's iteration is read, or ``iteration=N``
  (CLI ``--src-iteration N``);
* an **iteration directory**: MindFormers data files ``[prefix-]model|opt-{i:07d}-{n:07d}.safetensors``
  with ``metadata.json`` and/or ``common.json``, read directly.

Who calls what, in order (:func:`open_mindformers`, registered in :mod:`distckpt.sources`):

1. :func:`claims` looks at SRC's listing only;
2. :func:`resolve_iteration` reads the tracker (root) and names the iteration directory;
3. ``metadata.json`` is parsed by :func:`distckpt.codecs.mindformers.parse_metadata`; every file
   it names must exist, and each file's safetensors header must hold each chunk it is named for,
   with the chunk's dtype and shape; the header gives the chunk's byte range.  Without
   ``metadata.json`` every ``*.safetensors`` file of the directory holds whole tensors, as
   MindFormers' own ``generate_default_metadata_from_checkpoint`` reads it (a tensor in two files is
   refused, as MindFormers refuses it);
4. the layouts of ``metadata.json`` become the :class:`~distckpt.sources.Source`'s strategy where a
   distckpt :class:`~distckpt.layout.TensorLayout` can say them (aligned ``rank_list`` blocks, no
   interleaving); ``common.json`` and the iteration go to ``info["inspect"]``.

Tensor bytes are read later, by box, through :meth:`Source.read` (only the chunks a box overlaps).
The format has no checksums: ``verify`` checks structure, files and readability only.

:func:`list_iterations` is what ``distckpt list ROOT`` and ``CheckpointManager(layout="mindformers")``
read: every ``iteration_*`` directory with its state (``committed``: the tracker's;
``previous``: older than the tracker with its ``common.json``, an earlier commit;
``uncommitted``: anything else).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..codecs import Entry
from ..codecs import mindformers as mf
from ..errors import FormatError, NotCommittedError, NotFoundError, UsageError
from ..index import MAX_INDEX_BYTES, Chunk, Index, TensorInfo
from ..layout import ParamSpec, Strategy, full_box
from ..storage import Store, split_url
from . import Probe, Source, SourceKind
from .files import file_entries

__all__ = [
    "claims",
    "open_mindformers",
    "resolve_iteration",
    "list_iterations",
    "is_root",
    "IterationState",
    "read_tracker",
]

#: The tracker holds one number; anything larger than this is not a tracker.
_TRACKER_LIMIT = 4096
_COMMON_LIMIT = 1 << 20
#: ``info["inspect"]`` keys this kind adds to ``inspect --json``.
INSPECT_KEYS = ("iteration", "common", "files")


# --------------------------------------------------------------------------- what SRC is
def is_root(names: list[str]) -> bool:
    """A MindFormers checkpoint root: a tracker or canonical ``iteration_*`` directories."""
    return mf.TRACKER in names or any(mf.parse_iteration_dir(n) is not None for n in names)


def _is_iteration_dir(names: list[str]) -> bool:
    return (mf.METADATA in names or mf.COMMON in names) and any(mf.parse_file_name(n) is not None for n in names)


def claims(p: Probe) -> bool:
    return is_root(p.names) or _is_iteration_dir(p.names)


# --------------------------------------------------------------------------- root
def read_tracker(store: Store) -> int:
    """The iteration the tracker names (FormatError naming the tracker if it is not a number)."""
    where = store.child_url(mf.TRACKER)
    return mf.parse_tracker(store.read_bytes(mf.TRACKER, limit=_TRACKER_LIMIT), where=where)


@dataclass(frozen=True)
class IterationState:
    """One ``iteration_*`` directory of a root: its number, name and state."""

    iteration: int
    name: str
    state: str  # "committed" | "previous" | "uncommitted" | "missing"


def list_iterations(store: Store, names: list[str] | None = None) -> list[IterationState]:
    """Every canonical ``iteration_*`` directory of a root, ascending, with its state.

    ``committed``: the tracker's; ``previous``: older than the tracker and holding ``common.json``
    (MindFormers writes it before the tracker, so it was committed once); ``uncommitted``: newer
    than the tracker, without ``common.json``, or in a root without a tracker; ``missing``: the
    tracker's iteration when its directory does not exist.
    """
    names = store.listdir() if names is None else names
    tracked = read_tracker(store) if mf.TRACKER in names else None
    found = sorted((n, name) for name in names if (n := mf.parse_iteration_dir(name)) is not None)
    out = []
    for n, name in found:
        if n == tracked:
            state = "committed"
        elif tracked is not None and n < tracked and store.exists(f"{name}/{mf.COMMON}"):
            state = "previous"
        else:
            state = "uncommitted"
        out.append(IterationState(n, name, state))
    if tracked is not None and tracked not in {s.iteration for s in out}:
        out.append(IterationState(tracked, mf.iteration_dir(tracked), "missing"))
        out.sort(key=lambda s: s.iteration)
    return out


def _present(found: list[int]) -> str:
    if not found:
        return "no iteration_* directory is present"
    shown = ", ".join(map(str, found[-8:]))
    return f"iterations present: {'..., ' if len(found) > 8 else ''}{shown}"


def resolve_iteration(store: Store, names: list[str], iteration: int | None) -> tuple[int, str]:
    """``(N, directory name)`` of the iteration to read in a root: ``iteration`` or the tracker's."""
    found = sorted(n for name in names if (n := mf.parse_iteration_dir(name)) is not None)
    if iteration is not None:
        try:
            d = mf.iteration_dir(iteration)
        except FormatError as exc:
            raise UsageError(f"--src-iteration: {exc}") from None
        if d not in names or not store.isdir(d):
            raise NotFoundError(f"{store.child_url(d)}: no such iteration in this MindFormers root ({_present(found)})")
        return iteration, d
    if mf.TRACKER not in names:
        raise NotCommittedError(
            f"{store.url}: MindFormers root without {mf.TRACKER}, so no iteration is committed ({_present(found)}); "
            "pass --src-iteration N to read one anyway"
        )
    n = read_tracker(store)
    d = mf.iteration_dir(n)
    if d not in names or not store.isdir(d):
        raise NotFoundError(
            f"{store.child_url(mf.TRACKER)} names iteration {n}, but {store.child_url(d)} does not exist "
            f"({_present(found)}); pass --src-iteration N to read another"
        )
    return n, d


# --------------------------------------------------------------------------- one iteration
def _headers(store: Store, files: list[str], names: set[str], where: str) -> dict[str, tuple[dict[str, Entry], dict]]:
    """Each file's safetensors entries by tensor name (and its ``__metadata__``), refusing missing files."""
    out: dict[str, tuple[dict[str, Entry], dict]] = {}
    for fname in files:
        if fname not in names:
            raise NotFoundError(f"{store.child_url(fname)}: data file named by {where} is missing")
        entries, meta = file_entries(store, fname)
        out[fname] = ({e.name: e for e in entries}, meta or {})
    return out


def _chunk_of(store: Store, t: mf.MFTensor, c: mf.MFChunk, s: mf.MFStorage, headers, where: str) -> Chunk:
    entries, _ = headers[s.file_name]
    e = entries.get(t.name)
    url = store.child_url(s.file_name)
    if e is None:
        raise FormatError(
            f"{url}: holds no tensor {t.name!r}, but {where} places its chunk {c.index} there"
        )
    if e.dtype != t.dtype or tuple(e.shape) != c.box.sizes:
        raise FormatError(
            f"{url}: tensor {t.name!r} is {e.dtype}{list(e.shape)}, but {where} describes chunk {c.index} as "
            f"{t.dtype}{list(c.box.sizes)}"
        )
    return Chunk(c.box, s.file_name, tuple(e.segments), rank=s.storage_rank)


def _from_metadata(store: Store, names: set[str]) -> tuple[dict[str, TensorInfo], mf.MFMetadata, dict, list[str]]:
    """Tensors of ``metadata.json``, and the names it describes that none of its files holds.

    MindFormers' own metadata may describe parameters no file holds (e.g. ``accu_grads.*`` a
    compiled graph reports); its loader never looks them up, so they are skipped here too (the
    verbs warn about them).  A tensor that some of its files hold and others lack is refused.
    """
    where = store.child_url(mf.METADATA)
    md = mf.parse_metadata(store.read_bytes(mf.METADATA, limit=MAX_INDEX_BYTES), where=where)
    headers = _headers(store, list(md.files), names, where)
    tensors: dict[str, TensorInfo] = {}
    absent: list[str] = []
    for t in md.tensors:
        if not any(t.name in headers[s.file_name][0] for c in t.chunks for s in c.storage):
            absent.append(t.name)
            continue
        chunks = []
        for c in t.chunks:
            got = [_chunk_of(store, t, c, s, headers, where) for s in c.storage]  # every copy is checked
            chunks.append(got[0])
        tensors[t.name] = TensorInfo(t.name, t.dtype, t.shape, tuple(chunks))
    return tensors, md, headers, absent


def _standalone(store: Store, names: set[str]) -> tuple[dict[str, TensorInfo], dict]:
    """No ``metadata.json``: every ``*.safetensors`` holds whole tensors (MindFormers reads them all)."""
    files = sorted(n for n in names if n.endswith(".safetensors"))
    if not files:
        raise NotCommittedError(f"{store.url}: no metadata.json and no .safetensors data file")
    headers = _headers(store, files, names, store.url)
    described = {f: [(e.name, e.dtype, e.shape) for e in ents.values()] for f, (ents, _) in headers.items()}
    mf.standalone_metadata(described, where=store.url)  # a tensor in two files is refused
    tensors = {}
    for fname, (ents, _) in headers.items():
        for e in ents.values():
            tensors[e.name] = TensorInfo(e.name, e.dtype, tuple(e.shape), (Chunk(full_box(e.shape), fname, tuple(e.segments)),))
    return tensors, headers


def _values(headers: Mapping[str, tuple[dict, dict]], store: Store) -> dict[str, Any]:
    """String values distckpt kept in a data file's ``__metadata__`` (see :mod:`distckpt.writers`)."""
    from ..writers import decode_metadata_values

    out: dict[str, Any] = {}
    for fname, (_, meta) in headers.items():
        for k, v in decode_metadata_values(meta, where=store.child_url(fname)).items():
            out.setdefault(k, v)
    return out


def _strategy(described: list[mf.MFTensor]) -> Strategy | None:
    """The layouts a TensorLayout can say, over the most common stage size (others stay without a layout)."""
    specs: dict[int, dict[str, ParamSpec]] = collections.defaultdict(dict)
    for t in described:
        lay = t.layout
        if lay is None:
            continue
        n = lay.device_num
        specs[n][t.name] = ParamSpec(t.name, lay, (t.mf_layout.rank_list[0] // n,), t.shape)
    if not specs:
        return None
    size = max(specs, key=lambda k: (len(specs[k]), k))
    params = specs[size]
    return Strategy(params, max(max(p.stages) for p in params.values()) + 1, size)


def _kinds(tensors: Mapping[str, TensorInfo]) -> dict[str, str]:
    """``model`` or ``opt`` per tensor, from the name of the file holding it (MindFormers' own split)."""
    out = {}
    for name, t in tensors.items():
        parts = mf.parse_file_name(t.chunks[0].file) if t.chunks else None
        if parts is not None:
            out[name] = parts.kind
    return out


def open_iteration(store: Store, *, iteration: int | None, url: str) -> Source:
    """The Source of one iteration directory (``store``), reported as ``url``."""
    store.confined = True  # data files are named by metadata.json: never follow a symlink out
    names = set(store.listdir())
    md = None
    absent: list[str] = []
    if mf.METADATA in names:
        tensors, md, headers, absent = _from_metadata(store, names)
    else:
        tensors, headers = _standalone(store, names)
    common = None
    if mf.COMMON in names:
        common = mf.parse_common(store.read_bytes(mf.COMMON, limit=_COMMON_LIMIT), where=store.child_url(mf.COMMON))
    strategy = _strategy([t for t in md.tensors if t.name in tensors]) if md is not None else None
    ranks = [r for t in (md.tensors if md else ()) for r in t.mf_layout.rank_list]
    world = max(strategy.world_size if strategy else 1, max(ranks) + 1 if ranks else 1)
    files = {f: store.size(f) for f in sorted(headers)}
    info = {
        "inspect": {
            "iteration": iteration,
            "common": None if common is None else {k: getattr(common, k) for k in mf.MFCommon.__dataclass_fields__},
            "files": sorted(files),
        },
        "kinds": _kinds(tensors),
        "missing": absent,
    }
    index = Index(tensors=tensors, values=_values(headers, store), files=files, checksum="none", world_size=world)
    return Source(store, index, SourceKind.MINDFORMERS, strategy, [], world_size=world, path=url, info=info)


def open_mindformers(p: Probe) -> Source:
    """Open a MindFormers root (its tracker's iteration, or ``iteration=N``) or an iteration directory."""
    want = p.options.get("iteration")
    if is_root(p.names):
        n, d = resolve_iteration(p.storage, p.names, want)
        return open_iteration(p.storage.sub(d), iteration=n, url=p.url)
    _, base = split_url(p.url)
    own = mf.parse_iteration_dir(base)
    if want is not None and want != own:
        raise UsageError(
            f"{p.url} is one iteration directory{'' if own is None else f' (iteration {own})'}; --src-iteration {want} "
            "selects an iteration of a MindFormers root: pass the root"
        )
    return open_iteration(p.storage, iteration=own, url=p.url)
