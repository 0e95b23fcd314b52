"""``save_pretrained`` / ``load_pretrained`` for any MindSpore Cell, MindFormers models included.

Layouts written:

* single process, no ``max_shard_size``: ``{save_name}.ckpt`` + ``{save_name}.yaml``, exactly
  what MindFormers' ``save_pretrained`` writes (its ``from_pretrained`` loads it);
* single process with ``max_shard_size``: ``{save_name}-0000k-of-0000N.ckpt`` +
  ``{save_name}.ckpt.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``) + ``config.json``,
  or ``{save_name}.ckpt`` + ``config.json`` when one shard suffices (MindFormers' ``save_json=True``
  layout; its ``from_pretrained`` only finds it under the default name ``mindspore_model``);
* distributed (a communicator with more than one rank, or a strategy of more than one rank):
  a distckpt checkpoint written by every rank at once (each rank writes what it holds,
  replicas once), plus ``{save_name}.yaml`` and ``config.json`` written by rank 0.
  ``distckpt.merge(dir, out)`` turns it into the single-process layouts above.

Who does what in a distributed save: (rank 0) removes older weight files of the
single-process layouts and writes the configs; (all ranks) ``distckpt.save``,
whose commit (the index, written last) marks the save complete.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from .. import dtypes
from ..errors import DistributedError, FormatError, StrategyError
from ..index import INDEX_NAME
from ..storage import Storage, open_storage
from .config import CONFIG_NAME, DOWNLOAD_KWARGS, config_files_for
from .convert import cell_state, load_into_cell

__all__ = ["save_pretrained", "load_pretrained", "default_checkpoint_save_folder", "SAVE_FOLDER_ENV"]

SAVE_FOLDER_ENV = "DISTCKPT_CHECKPOINT_SAVE_FOLDER"
_SHARD_RE = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.ckpt$")


def default_checkpoint_save_folder() -> str:
    """``$DISTCKPT_CHECKPOINT_SAVE_FOLDER``, else ``./checkpoint_save`` (MindFormers' default)."""
    return os.environ.get(SAVE_FOLDER_ENV) or os.path.join(os.getcwd(), "checkpoint_save")


def _env_rank() -> Optional[int]:
    for var in ("RANK_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK"):
        raw = os.environ.get(var)
        if raw not in (None, ""):
            try:
                return int(raw)  # type: ignore[arg-type]
            except ValueError:
                raise StrategyError(f"${var}={raw!r} is not a rank number") from None
    return None


def _write_file(storage: Storage, fname: str, write) -> None:
    """Write ``fname`` through a temporary name, then move it into place."""
    tmp = f".{fname}.tmp-{uuid.uuid4().hex[:8]}"
    f = storage.open_write(tmp)
    try:
        write(f)
        storage.close_durable(f)
    except BaseException:
        f.close()
        storage.remove([tmp])
        raise
    storage.replace(tmp, fname)


def _write_ckpt(storage: Storage, fname: str, state: Mapping[str, np.ndarray]) -> None:
    from ..formats.ckpt import CkptWriter

    def write(f):
        w = CkptWriter(f, name=storage.child_url(fname))
        for name, arr in state.items():
            w.add_tensor(name, dtypes.name_of(arr.dtype), tuple(arr.shape), arr)
        w.close()

    _write_file(storage, fname, write)


def _shards(state: Mapping[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    """MindFormers' ``shard_checkpoint``: in state order, start a new shard when the next tensor would overflow."""
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in state.items():
        n = int(arr.nbytes)
        if groups[-1] and size + n > limit:
            groups.append({})
            size = 0
        groups[-1][name] = arr
        size += n
    return groups


def _stale_weights(names: list[str], save_name: str, keep: set[str], *, distckpt_files: bool) -> list[str]:
    """Weight files of an older save of ``save_name`` in this directory.

    The single-process layouts' files always; a distckpt save's index, data files
    and manifests only with ``distckpt_files`` (a distributed save replaces its
    own predecessor at commit).
    """
    out = []
    for n in names:
        if n in keep:
            continue
        m = _SHARD_RE.match(n)
        if n in (f"{save_name}.ckpt", f"{save_name}.ckpt.index.json") or (m and m.group("stem") == save_name):
            out.append(n)
        elif distckpt_files and (
            n == INDEX_NAME
            or (n.startswith("data-") and n.endswith(".safetensors"))
            or (n.startswith(".manifest-") and n.endswith(".json"))
        ):
            out.append(n)
    return out


def save_pretrained(
    model: Any,
    save_directory=None,
    save_name: str = "mindspore_model",
    *,
    strategy=None,
    comm=None,
    max_shard_size=None,
    storage_options: Optional[dict] = None,
) -> str:
    """Save ``model``'s weights and config into ``save_directory`` (local path or fsspec URL).

    See the module docstring for the layouts.  In distributed mode every rank
    calls this with its own Cell (whose Parameters hold its slices, described by
    ``strategy``).  Under mpirun (or any ``comm`` with several ranks) the ranks
    write together and the save is committed when this returns.  With a
    multi-rank ``strategy`` but a single-process communicator, the rank comes
    from ``$RANK_ID`` and each rank only writes its part and a manifest; run
    ``distckpt.finalize(save_directory)`` once every rank is done.
    ``max_shard_size`` (``"5GB"``, bytes) applies to single-process saves only.
    Returns the directory.
    """
    from ..api import _parse_size, save
    from ..comm import get_comm
    from ..strategy import load_strategy

    if not isinstance(save_name, str) or not save_name or "/" in save_name:
        raise ValueError(f"save_name must be a plain file stem, got {save_name!r}")
    directory = os.fspath(save_directory) if save_directory is not None else default_checkpoint_save_folder()
    c = get_comm(comm)
    strat = load_strategy(strategy, storage_options=storage_options) if strategy is not None else None
    distributed = c.size > 1 or (strat is not None and strat.world_size > 1)
    storage = open_storage(directory, storage_options)
    metadata = {"name": save_name, "saved_by": "distckpt.mindspore.save_pretrained", "arch": type(model).__name__}

    if distributed:
        configs = config_files_for(model, save_name, yaml=True, json_=True)
        state = cell_state(model)

        def prepare():
            storage.makedirs()
            for n, data in configs.items():
                storage.put_atomic(n, data)

        def cleanup():
            storage.remove(_stale_weights(storage.listdir(), save_name, set(), distckpt_files=False))

        if c.size > 1:
            c.run_on_root("save_pretrained.prepare", prepare)
            save(state, directory, strategy=strat, comm=c, storage_options=storage_options, metadata=metadata)
            c.run_on_root("save_pretrained.cleanup", cleanup)
            return directory
        rank = _env_rank()
        if rank is None:
            raise DistributedError(
                f"save_pretrained: the strategy describes {strat.world_size} ranks (a distributed save) but this "  # type: ignore[union-attr]
                "process runs alone and $RANK_ID is not set: launch with mpirun, pass comm=, or set RANK_ID"
            )
        if rank == 0:
            prepare()
        save(state, directory, strategy=strat, rank=rank, storage_options=storage_options, metadata=metadata)
        if rank == 0:
            cleanup()
        return directory

    state = cell_state(model)
    storage.makedirs()
    limit = _parse_size(max_shard_size)
    if limit is None:
        configs = config_files_for(model, save_name, yaml=True, json_=False)
        _write_ckpt(storage, f"{save_name}.ckpt", state)
        keep = {f"{save_name}.ckpt"}
    else:
        configs = config_files_for(model, save_name, yaml=False, json_=True)
        groups = _shards(state, limit)
        if len(groups) == 1:
            _write_ckpt(storage, f"{save_name}.ckpt", state)
            keep = {f"{save_name}.ckpt"}
        else:
            weight_map: dict[str, str] = {}
            keep = set()
            for k, group in enumerate(groups, 1):
                fname = f"{save_name}-{k:05d}-of-{len(groups):05d}.ckpt"
                _write_ckpt(storage, fname, group)
                keep.add(fname)
                weight_map.update(dict.fromkeys(group, fname))
            total = sum(int(a.nbytes) for a in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            idx_name = f"{save_name}.ckpt.index.json"
            storage.put_atomic(idx_name, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
            keep.add(idx_name)
        if CONFIG_NAME not in configs:
            configs[CONFIG_NAME] = (json.dumps({"architectures": [type(model).__name__]}, indent=2) + "\n").encode()
    for n, data in configs.items():
        storage.put_atomic(n, data)
    storage.remove(_stale_weights(storage.listdir(), save_name, keep, distckpt_files=True))
    return directory


def load_pretrained(
    model: Any,
    name_or_path,
    *,
    strategy=None,
    rank: Optional[int] = None,
    strict: bool = False,
    **download_kwargs,
) -> tuple[list[str], list[str]]:
    """Load a checkpoint into ``model``, like ``load_param_into_net``; return ``(missing, unexpected)``.

    ``name_or_path`` is a model name (downloaded through :func:`distckpt.hub.resolve`
    with ``download_kwargs``: ``hub_url``, ``cache_dir``, ``force_download``,
    ``resume_download``, ``proxies``, ``local_files_only``, ``storage_options``,
    ``progress``), a local directory or file, or an fsspec URL, in any layout
    ``distckpt.load`` reads.  With ``strategy`` (this job's) the model's
    Parameters hold this rank's slices and only those bytes are read; ``rank``
    defaults to the communicator's.
    """
    from .. import hub
    from ..api import load
    from ..sources import open_source

    unknown = set(download_kwargs) - set(DOWNLOAD_KWARGS)
    if unknown:
        raise TypeError(f"load_pretrained got unexpected keyword argument(s) {sorted(unknown)}")
    opts = download_kwargs.get("storage_options")
    path = hub.resolve(os.fspath(name_or_path), **download_kwargs)
    src = open_source(path, storage_options=opts)
    params = list(model.parameters_dict())
    have = set(src.tensors) | set(src.values)
    names = [n for n in params if n in have]
    pset = set(params)
    missing = [n for n in params if n not in have]
    unexpected = [n for n in list(src.tensors) + list(src.values) if n not in pset]
    if strict and (missing or unexpected):
        raise FormatError(
            f"strict load of {src.storage.url} into {type(model).__name__}: {len(missing)} parameter(s) missing "
            f"from the checkpoint {missing[:5]}, {len(unexpected)} unexpected entr(y/ies) {unexpected[:5]}"
        )
    state = load(src, strategy=strategy, rank=rank, names=names, storage_options=opts)
    load_into_cell(model, state, strict=strict)
    return missing, unexpected
