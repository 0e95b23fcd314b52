"""Open any SRC the verbs accept as one virtual index of chunks.

:func:`open_source` lists SRC once and asks each registered opener, in order,
whether it claims SRC; the first that does opens it.  Only headers and
metadata are read here; tensor bytes are read later, by box
(:mod:`distckpt.execute`).

==============  ================================================================  ===================
kind            what SRC looks like                                              module
==============  ================================================================  ===================
``file``        one ``.ckpt`` or ``.safetensors`` file                           :mod:`.files`
``distckpt``    a directory with ``distckpt.index.json``                         :mod:`.distckpt`
``native``      ``rank_*/`` directories of ``.ckpt``/``.safetensors`` + strategy  :mod:`.native`
``pretrained``  MindFormers ``save_pretrained`` / HuggingFace weight directory    :mod:`.files`
``mindformers`` MindFormers 1.9 root (tracker, ``iteration_*/``) or iteration dir :mod:`.mindformers`
==============  ================================================================  ===================

Adding a source kind: write ``claims(probe) -> bool`` (look at ``probe.names``
only; cheap) and ``open(probe) -> Source``, and :func:`register` them at the
right place in the order (more specific kinds first).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import naming
from ..errors import NotCommittedError, NotFoundError, StrategyError, UsageError
from ..index import Index, TableChunks, TensorInfo
from ..layout import Box, Strategy
from ..storage import Store, open_storage, split_url
from ..strategy import load_strategy, strategy_from_json

if TYPE_CHECKING:
    from ..execute import ReadStats

__all__ = ["SourceKind", "Source", "Probe", "open_source", "register", "CONFIG_FILES"]

CONFIG_FILES = naming.CONFIG_FILES


class SourceKind(str, enum.Enum):
    """What kind of checkpoint a SRC is (compares and serialises as its plain string)."""

    FILE = "file"
    DISTCKPT = "distckpt"
    NATIVE = "native"
    PRETRAINED = "pretrained"
    MINDFORMERS = "mindformers"
    HF = "hf"

    def __str__(self) -> str:
        return self.value


@dataclass
class Source:
    """A readable checkpoint: storage, virtual index, the strategy it was saved with.

    ``info`` holds what is particular to a kind (e.g. ``missing``: strategy
    parameters no file holds, for a ``native`` source).
    """

    storage: Store
    index: Index
    kind: SourceKind
    strategy: Strategy | None = None
    config_files: list[str] = field(default_factory=list)
    name: str = naming.DEFAULT_STEM
    world_size: int = 1
    path: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    _file_sizes: dict[str, int] = field(default_factory=dict, repr=False)
    _sized: set[str] = field(default_factory=set, repr=False)

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.index.tensors

    @property
    def values(self) -> dict[str, Any]:
        return self.index.values

    @property
    def url(self) -> str:
        """What the user named: the file itself for a ``file`` source, else the directory."""
        return self.path or self.storage.url

    def read(self, name: str, box: Box, *, verify: bool = True, stats: ReadStats | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Box ``box`` of tensor ``name``: the one way every verb reads tensor data.

        Reads only the chunks' bytes the box needs (:func:`distckpt.execute.read_box`);
        kinds whose tensors are not stored as such (e.g. fused weights made from several
        HuggingFace tensors) override this.
        """
        from ..execute import read_box

        tensor = self.tensors[name]
        if self.kind == SourceKind.DISTCKPT and name not in self._sized and not isinstance(tensor.chunks, TableChunks):
            self._check_file_sizes(tensor)  # index v2 checks the chunks each read touches (TableChunks.overlapping)
        return read_box(self.storage, tensor, box, verify=verify, stats=stats, out=out)

    def _check_file_sizes(self, tensor: TensorInfo) -> None:
        """Refuse chunks that claim bytes past the real end of their file before anything is allocated.

        An index states its files' sizes; a hostile or stale one can claim a 1 TiB
        tensor in a 112-byte file.  One size query per file, once per source.
        """
        from ..errors import FormatError

        ends: dict[str, int] = {}
        for c in tensor.chunks:
            for start, length in c.segments:
                ends[c.file] = max(ends.get(c.file, 0), start + length)
        for fname, end in ends.items():
            if fname not in self._file_sizes:
                try:
                    self._file_sizes[fname] = self.storage.size(fname)
                except FileNotFoundError:
                    raise NotFoundError(
                        f"{self.storage.child_url(fname)}: data file of tensor {tensor.name!r} is missing "
                        "(named by the index)"
                    ) from None
            if end > self._file_sizes[fname]:
                raise FormatError(
                    f"{self.storage.child_url(fname)}: tensor {tensor.name!r} needs bytes up to {end}, but the file "
                    f"has {self._file_sizes[fname]} bytes: it is truncated, or the index claims more than it holds"
                )
        self._sized.add(tensor.name)


@dataclass
class Probe:
    """What openers look at: SRC's storage and listing, and the caller's options."""

    url: str
    storage: Store
    names: list[str]
    src_strategy: Any = None
    storage_options: dict = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def configs(self) -> list[str]:
        return [n for n in self.names if naming.is_yaml(n) or n in CONFIG_FILES]

    def strategy(self) -> Strategy | None:
        if self.src_strategy is None:
            return None
        return load_strategy(self.src_strategy, storage_options=self.storage_options)


@dataclass(frozen=True)
class _Opener:
    kind: str
    claims: Callable[[Probe], bool]
    open: Callable[[Probe], Source]


_OPENERS: list[_Opener] = []


def register(kind: str, claims: Callable[[Probe], bool], open: Callable[[Probe], Source], *, before: str | None = None) -> None:
    """Add a directory source kind; ``before`` puts it ahead of an existing kind."""
    op = _Opener(kind, claims, open)
    if before is None:
        _OPENERS.append(op)
        return
    at = next((i for i, o in enumerate(_OPENERS) if o.kind == before), len(_OPENERS))
    _OPENERS.insert(at, op)


def _stem(configs: list[str]) -> str:
    for n in configs:
        if naming.is_yaml(n):
            return os.path.splitext(n)[0]
    return naming.DEFAULT_STEM


# ---------------------------------------------------------------- openers
def _open_distckpt(p: Probe) -> Source:
    from .distckpt import read_index

    index = read_index(p.storage)
    saved = strategy_from_json(index.strategy) if index.strategy else None
    stem = index.metadata.get("name") if isinstance(index.metadata.get("name"), str) else None
    if stem is not None:
        stem = _plain_stem(stem, p.storage.child_url(naming.INDEX_NAME))
    return Source(p.storage, index, SourceKind.DISTCKPT, p.strategy() or saved, p.configs, stem or _stem(p.configs),
                  index.world_size)


def _plain_stem(stem: str, where: str) -> str:
    from ..errors import FormatError
    from ..storage import safe_name

    try:
        return safe_name(stem, what="model name")
    except Exception:  # noqa: BLE001 - re-raised as a format error naming the index
        raise FormatError(f"{where}: metadata.name {stem!r} is not a plain file name; the index is corrupt") from None


def _claims_uncommitted(p: Probe) -> bool:
    from .distckpt import uncommitted_debris

    uncommitted_debris(p.storage, p.names)
    return False


def _claims_native(p: Probe) -> bool:
    return any(naming.RANK_DIR.match(n) for n in p.names)


def _open_native(p: Probe) -> Source:
    from .native import find_strategy, index_of_rank_dirs

    rank_dirs = {int(m.group(1)): n for n in p.names if (m := naming.RANK_DIR.match(n))}
    strategy = p.strategy()
    if strategy is None:
        found = find_strategy(p.storage)
        if found is not None:
            strategy = load_strategy(found, storage_options=p.storage_options)
    index, info = index_of_rank_dirs(p.storage, rank_dirs, strategy)
    assert strategy is not None
    return Source(p.storage, index, SourceKind.NATIVE, strategy, p.configs, _stem(p.configs), strategy.world_size,
                  info=info)


def _mf():
    from . import mindformers

    return mindformers


def _claims_pretrained(p: Probe) -> bool:
    from .files import pretrained_files

    return pretrained_files(p.storage, p.names) is not None


def _open_pretrained(p: Probe) -> Source:
    from .files import index_of_files, pretrained_files

    got = pretrained_files(p.storage, p.names)
    assert got is not None
    files, stem = got
    return Source(p.storage, index_of_files(p.storage, files), SourceKind.PRETRAINED, p.strategy(), p.configs, stem)


register("distckpt", lambda p: naming.INDEX_NAME in p.names, _open_distckpt)
register("uncommitted", _claims_uncommitted, _open_distckpt)
register("native", _claims_native, _open_native)
register("mindformers", lambda p: _mf().claims(p), lambda p: _mf().open_mindformers(p), before="native")
register("pretrained", _claims_pretrained, _open_pretrained)


def _mapped(source: Source, options: Mapping[str, Any]) -> Source:
    """With ``model=`` (a HuggingFace model family), the source as MindFormers names and fused weights."""
    if options.get("model") is None:
        return source
    from .hf import map_source

    return map_source(source, model=options["model"], qkv_layout=options.get("qkv_layout"),
                      ffn_layout=options.get("ffn_layout"))


# ------------------------------------------------------------------ entry
def _check_iteration_option(source: Source, url: str, options: Mapping[str, Any]) -> None:
    if options.get("iteration") is not None and source.kind != SourceKind.MINDFORMERS:
        raise UsageError(
            f"--src-iteration selects an iteration of a MindFormers checkpoint root; {url} is a {source.kind} checkpoint"
        )


def _refuse_rank_slice(url: str, opts: dict) -> None:
    """``rank_N`` with ``rank_*`` siblings is one rank's slice, not a model."""
    parent, base = split_url(url)
    if not naming.RANK_DIR.match(base):
        return
    siblings = [n for n in open_storage(parent, opts).listdir() if naming.RANK_DIR.match(n)]
    if len(siblings) > 1:
        raise StrategyError(
            f"{url} is one rank's slice of a distributed checkpoint ({len(siblings)} rank directories in {parent}): "
            f"merge the parent directory with its strategy, e.g. `distckpt merge {parent} DST --src-strategy FILE`"
        )


def open_source(
    src,
    *,
    src_strategy=None,
    storage_options: Mapping | None = None,
    **options: Any,
) -> Source:
    """Open SRC (see the module doc); raise one clear error for anything else."""
    if isinstance(src, Source):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise UsageError(f"SRC must be a path or URL, got {type(src).__name__}")
    url = os.fspath(src)
    opts = dict(storage_options or {})
    if url.endswith((".ckpt", ".safetensors")):
        parent, base = split_url(url)
        storage = open_storage(parent, opts)
        if not storage.exists(base):
            raise NotFoundError(f"{url}: no such file")
        if not storage.isdir(base):  # a directory named x.ckpt is read as a directory below
            from .files import index_of_files

            index = index_of_files(storage, [base])
            source = Source(storage, index, SourceKind.FILE, name=os.path.splitext(base)[0], path=storage.child_url(base))
            _check_iteration_option(source, url, options)
            return _mapped(source, options)
    storage = open_storage(url, opts)
    names = storage.listdir()
    if not names and not storage.exists():
        raise NotFoundError(f"{url}: no such file or directory")
    if not storage.isdir():
        raise NotFoundError(f"{url}: is a file but not a .ckpt or .safetensors checkpoint")
    _refuse_rank_slice(url, opts)
    probe = Probe(url, storage, names, src_strategy, opts, dict(options))
    for op in _OPENERS:
        if op.claims(probe):
            source = op.open(probe)
            _check_iteration_option(source, url, options)
            return _mapped(source, probe.options)
    raise NotCommittedError(
        f"not a checkpoint: {url} holds no {naming.INDEX_NAME}, no rank_*/ directories, and no .ckpt/.safetensors weights"
    )
