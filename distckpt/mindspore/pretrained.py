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

Who does what in a distributed save: (all ranks) check the arguments, read the
strategy, convert the Cell -- a failure on any rank is raised on every rank by the
first collective (``save_pretrained.prepare``), never left to hang the others;
(rank 0) writes the configs; (all ranks) ``distckpt.save``, whose commit (the
index, written last) marks the save complete; (rank 0) removes older weight files
of the single-process layouts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from .. import dtypes, naming
from ..commit import distckpt_files
from ..errors import DistributedError, FormatError, StrategyError, UsageError
from ..storage import open_storage
from ..writers import OutItem, constant, write_sharded
from .config import CONFIG_NAME, DOWNLOAD_KWARGS, config_files_for
from .convert import cell_state, load_into_cell

__all__ = ["save_pretrained", "load_pretrained", "default_checkpoint_save_folder", "SAVE_FOLDER_ENV"]

SAVE_FOLDER_ENV = "DISTCKPT_CHECKPOINT_SAVE_FOLDER"


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


def _items(state: Mapping[str, np.ndarray]) -> list[OutItem]:
    return [OutItem(n, dtypes.name_of(a.dtype), tuple(a.shape), constant(a)) for n, a in state.items()]


def _stale_weights(names: list[str], save_name: str, keep: set[str]) -> list[str]:
    """Weight files of an older single-process save of ``save_name`` in this directory."""
    out = []
    for n in names:
        if n in keep:
            continue
        m = naming.SHARD_FILE.match(n)
        if n in (f"{save_name}.ckpt", naming.weight_index_file(save_name, "ckpt")) or (
            m and m.group("stem") == save_name and m.group("ext") == "ckpt"
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
    from ..api import save
    from ..comm import get_comm
    from ..jobconfig import size_option
    from ..strategy import load_strategy

    c = get_comm(comm)
    local: dict[str, Any] = {}

    def prepare_local() -> None:
        """Everything this rank does alone before the ranks meet (checks, strategy, storage, state)."""
        if not isinstance(save_name, str) or not save_name or "/" in save_name:
            raise UsageError(f"save_name must be a plain file stem, got {save_name!r}")
        local["strat"] = load_strategy(strategy, storage_options=storage_options) if strategy is not None else None
        local["storage"] = open_storage(directory, storage_options)

    directory = os.fspath(save_directory) if save_directory is not None else default_checkpoint_save_folder()
    metadata = {"name": save_name, "saved_by": "distckpt.mindspore.save_pretrained", "arch": type(model).__name__}

    if c.size > 1:  # every rank at once: a failure on any rank, before or during the save, reaches every rank
        error: Exception | None = None
        try:
            prepare_local()
            local["configs"] = config_files_for(model, save_name, yaml=True, json_=True)
            local["state"] = cell_state(model)
        except Exception as exc:  # noqa: BLE001 - raised below on every rank, never a hang
            error = exc

        def prepare() -> None:
            if error is not None:
                raise error
            if c.rank == 0:
                local["storage"].makedirs()
                for n, data in local["configs"].items():
                    local["storage"].put_atomic(n, data)

        c.run("save_pretrained.prepare", prepare)
        save(local["state"], directory, strategy=local["strat"], comm=c, storage_options=storage_options,
             metadata=metadata)
        c.run_on_root("save_pretrained.cleanup",
                      lambda: local["storage"].remove(_stale_weights(local["storage"].listdir(), save_name, set())))
        return directory

    prepare_local()
    strat, storage = local["strat"], local["storage"]
    if strat is not None and strat.world_size > 1:  # one rank of a distributed job, alone: rank mode + finalize
        configs = config_files_for(model, save_name, yaml=True, json_=True)
        state = cell_state(model)
        rank = _env_rank()
        if rank is None:
            raise DistributedError(
                f"save_pretrained: the strategy describes {strat.world_size} ranks (a distributed save) but this "
                "process runs alone and $RANK_ID is not set: launch with mpirun, pass comm=, or set RANK_ID"
            )
        if rank == 0:
            storage.makedirs()
            for n, data in configs.items():
                storage.put_atomic(n, data)
        save(state, directory, strategy=strat, rank=rank, storage_options=storage_options, metadata=metadata)
        if rank == 0:
            storage.remove(_stale_weights(storage.listdir(), save_name, set()))
        return directory

    state = cell_state(model)
    storage.makedirs()
    limit = size_option(max_shard_size)
    configs = config_files_for(model, save_name, yaml=limit is None, json_=limit is not None)
    if limit is not None and CONFIG_NAME not in configs:
        configs[CONFIG_NAME] = (json.dumps({"architectures": [type(model).__name__]}, indent=2) + "\n").encode()
    keep = set(write_sharded(storage, _items(state), {}, stem=save_name, ext="ckpt", max_shard_size=limit))
    for n, data in configs.items():
        storage.put_atomic(n, data)
    storage.remove(_stale_weights(storage.listdir(), save_name, keep))
    storage.remove(distckpt_files(storage))  # a distributed save this one replaces
    return directory


def load_pretrained(
    model: Any,
    name_or_path,
    *,
    strategy=None,
    rank: Optional[int] = None,
    strict: bool = False,
    model_family: Optional[str] = None,
    qkv_layout: Optional[str] = None,
    ffn_layout: Optional[str] = None,
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

    A HuggingFace directory (``model.safetensors[.index.json]`` + ``config.json``) is
    read with MindFormers' names and fused weights when the checkpoint shares no name
    with the model and the model's family is known: ``model_family`` (e.g. ``"qwen3"``),
    else found from the model's class (:func:`distckpt.models.family_for_class`: a
    ``model_family`` class attribute, or the MindFormers class that owns a family's
    ``weight_mapping``, e.g. ``TrainingQwen3ForCausalLM`` -> ``"qwen3"``).  The fused
    layouts are ``qkv_layout`` / ``ffn_layout``, else the model config's
    ``use_contiguous_weight_layout_attention`` / ``use_interleaved_weight_layout_mlp``.
    """
    from .. import hub
    from ..api import load
    from ..sources import open_source

    unknown = set(download_kwargs) - set(DOWNLOAD_KWARGS)
    if unknown:
        raise UsageError(f"load_pretrained got unexpected keyword argument(s) {sorted(unknown)}")
    opts = download_kwargs.get("storage_options")
    path = hub.resolve(os.fspath(name_or_path), **download_kwargs)
    src = open_source(path, storage_options=opts)
    params = list(model.parameters_dict())
    src = _as_mindformers(model, src, params, model_family, qkv_layout, ffn_layout)
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


_LAYOUT_FLAGS = ("use_contiguous_weight_layout_attention", "use_interleaved_weight_layout_mlp")


def _as_mindformers(model: Any, src: Any, params: list[str], family: Optional[str], qkv_layout: Optional[str],
                    ffn_layout: Optional[str]) -> Any:
    """``src`` read through the model family's HF map when it is an HF checkpoint of a known family."""
    from ..models import family_for_class, layouts_from_mf_config
    from ..sources.hf import HFSource, map_source

    if isinstance(src, HFSource) or not src.tensors:
        return src
    if family is None:
        if set(src.tensors) & set(params):
            return src  # MindFormers names already
        family = family_for_class(type(model))
        if family is None:
            return src
    cfg = getattr(model, "config", None)
    flags = {k: getattr(cfg, k) for k in _LAYOUT_FLAGS if getattr(cfg, k, None) is not None}
    qkv, ffn = layouts_from_mf_config(flags)
    return map_source(src, model=family, qkv_layout=qkv_layout or qkv, ffn_layout=ffn_layout or ffn)
