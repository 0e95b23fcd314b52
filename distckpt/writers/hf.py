"""Any MindFormers checkpoint written as a HuggingFace model (``merge --format hf --model FAMILY``).

:func:`distckpt.api.merge` opens SRC (any source: a distributed distckpt checkpoint, a
MindFormers checkpoint, a ``save_pretrained`` directory, one file) with MindFormers
names and calls :func:`write` with an :class:`~distckpt.writers.OutputJob`.  ``write``:

1. finds SRC's MindFormers config (a ``*.yaml``, else ``config.json``, beside the weights)
   and the HF ``config.json`` to write: the file ``options["hf_config"]`` copied as is, or
   derived from SRC's config by :func:`distckpt.models.hf_config_for` (top-level
   ``rope_theta``, ``torch_dtype`` = the weights' dtype);
2. takes the fused layouts from ``options["qkv_layout"]`` / ``["ffn_layout"]``, else from
   SRC's config flags (:func:`distckpt.models.layouts_from_mf_config`), else MindFormers'
   defaults;
3. builds the export :class:`~distckpt.models.Conversion` (``from_mf(strict=False)``):
   tensors with no HF name (optimizer state, ``global_step``, MoE buffers) and SRC's plain
   values are left out, and named in one ``warning:`` line on stderr;
4. streams the HF tensors, one at a time, into ``model.safetensors`` or
   ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``
   (:func:`distckpt.writers.write_sharded`, ``max_shard_size`` default 5GB like
   HuggingFace; safetensors metadata ``{"format": "pt"}``, which transformers requires),
   then ``config.json``.

Reading is bounded: an HF tensor is built from the MF row bands its export plan names;
the last band read (up to :data:`BAND_BYTES`, more only when one piece spans more) is
kept, so a fused QKV or an interleaved ``linear_fc1`` is read once and serves q, k, v
or gate and up, and experts' ``[gate | up]`` rows are read a band of experts at a time.
Every MF byte is read once (for fused tensors above the budget, QKV's q, k and v each
read their rows); dtypes (bf16 included) pass bit for bit.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import dtypes, jsonutil, naming
from ..errors import ConfigError, FormatError, UsageError
from ..layout import Box, full_box
from . import OutItem, OutputJob, write_sharded

__all__ = ["write", "DEFAULT_MAX_SHARD_SIZE", "mf_config_of"]

DEFAULT_MAX_SHARD_SIZE = "5GB"
#: Rows of a fused MF tensor read at once for export (a whole QKV / fc1 up to this size).
BAND_BYTES = 512 << 20
_HF_DTYPES = ("float32", "bfloat16", "float16")


def mf_config_of(source: Any) -> dict[str, Any] | None:
    """SRC's MindFormers model config as a flat dict (``{name}.yaml``, any ``*.yaml``, else ``config.json``), or None."""
    from ..mfconfig import CONFIG_NAME, config_json_from_yaml
    from ..sources.hf import config_names, read_json_object

    names = config_names(source)
    yamls = sorted(n for n in names if naming.is_yaml(n))
    if yamls:
        pick = f"{source.name}.yaml" if f"{source.name}.yaml" in yamls else yamls[0]
        return config_json_from_yaml(source.storage, pick)
    if CONFIG_NAME in names:
        return read_json_object(source.storage, CONFIG_NAME)
    return None


def _read_hf_config(path: Any) -> tuple[dict[str, Any], bytes]:
    import os

    from ..mfconfig import MAX_CONFIG_BYTES
    from ..storage import open_storage, split_url

    raw = os.fspath(path)
    parent, base = split_url(raw)
    data = open_storage(parent).read_bytes(base, limit=MAX_CONFIG_BYTES)
    doc = jsonutil.loads(data, where=raw, error=ConfigError)
    if not isinstance(doc, dict):
        raise ConfigError(f"--hf-config {raw}: a config.json must be a JSON object")
    return doc, data


def _main_dtype(source: Any, names: Sequence[str]) -> str | None:
    """The dtype holding most of the exported bytes, if transformers has a name for it."""
    by: Counter[str] = Counter()
    for n in names:
        t = source.tensors[n]
        by[t.dtype] += t.nbytes
    if not by:
        return None
    dt = by.most_common(1)[0][0]
    return dt if dt in _HF_DTYPES else None


class _Bands:
    """Reads MF row bands for export pieces and keeps the last one.

    A band is the rows a piece needs (a stepped piece: its whole span), widened to
    ``budget`` bytes when the tensor has more rows: so a fused QKV or ``linear_fc1`` up to
    ``budget`` is read once, whole, and serves all its HF tensors, and experts are read a
    few at a time.  Memory: one band plus the HF tensor being built.
    """

    def __init__(self, read: Callable[[str, Box], np.ndarray], source: Any, budget: int = BAND_BYTES):
        self.read, self.source, self.budget = read, source, budget
        self.name: str | None = None
        self.lo = self.hi = 0
        self.array: np.ndarray | None = None

    def drop(self) -> None:
        self.name, self.array = None, None

    def part(self, name: str, src: tuple[slice, ...]) -> np.ndarray:
        """``mf_tensor[src]`` (``src[0]`` may step), from the cached band when it holds those rows."""
        info = self.source.tensors[name]
        shape = tuple(info.shape)
        s0 = src[0]
        step = s0.step or 1
        count = len(range(s0.start, s0.stop, step))
        lo, hi = s0.start, min(shape[0], s0.start + step * count)  # a stepped run: its whole span
        if not (self.name == name and self.lo <= lo and hi <= self.hi):
            self.drop()
            row_bytes = max(1, info.nbytes // max(1, shape[0]))
            hi = min(shape[0], max(hi, lo + self.budget // row_bytes))
            box = Box((lo,) + (0,) * (len(shape) - 1), (hi - lo,) + tuple(shape[1:]))
            self.array = self.read(name, box)
            self.name, self.lo, self.hi = name, lo, hi
        assert self.array is not None
        return self.array[(slice(s0.start - self.lo, s0.stop - self.lo, s0.step), *src[1:])]


def _fetcher(job: OutputJob, conv: Any, bands: _Bands, hf_name: str, dtype: str) -> Callable[[], np.ndarray]:
    def fetch() -> np.ndarray:
        op = conv.op_for_hf(hf_name)
        if op.kind == "rename":
            bands.drop()
            return job.read(op.mf_name, full_box(op.mf_shape))
        shape = op.hf_shapes[op.hf_names.index(hf_name)]
        out = np.empty(shape, dtype=dtypes.to_numpy(dtype))
        for piece in conv.export_plan(hf_name):
            part = bands.part(piece.name, piece.src)
            out[piece.dst] = part.T if piece.transpose else part
        return out

    return fetch


def _warn_left_out(source: Any, skipped: Sequence[str]) -> None:
    values = list(source.values)
    if not skipped and not values:
        return
    names = list(skipped) + values
    shown = ", ".join(names[:8]) + (f" ... ({len(names) - 8} more)" if len(names) > 8 else "")
    print(f"warning: --format hf: left out {len(skipped)} tensor(s) with no HuggingFace name (optimizer state,"
          f" buffers ...) and {len(values)} plain value(s): {shown}", file=sys.stderr)


def write(job: OutputJob) -> list[str]:
    """Write ``job.source`` as a HuggingFace model into ``job.store``; return the names written."""
    items, config_bytes, limit = plan(job)
    files = write_sharded(job.store, items, {}, stem="model", ext="safetensors", max_shard_size=limit,
                          metadata=METADATA)
    job.store.put_atomic("config.json", config_bytes)
    return files + ["config.json"]


#: safetensors metadata of the shards (transformers refuses any other ``format``)
METADATA = {"format": "pt"}


def plan(job: OutputJob) -> tuple[list[OutItem], bytes, int]:
    """The HF tensors to write, in order, each fetched when written; the ``config.json`` bytes; the shard size.

    :func:`write` writes them in one process; ``merge`` under mpirun shares the shards out among
    the ranks (:mod:`distckpt.writers.parallel`).
    """
    from ..jobconfig import size_option
    from ..models import get_model_map, hf_config_for, layouts_from_mf_config

    if job.strategy is not None:
        raise UsageError("--format hf writes one merged HuggingFace model: use `distckpt merge`, not split/reshard")
    opts = job.options
    model = opts.get("model")
    if not model:
        raise UsageError("--format hf needs --model FAMILY (e.g. qwen3): the HF names and fused layouts depend on it")
    mm = get_model_map(model)
    source = job.source
    mf_cfg = mf_config_of(source)
    given = opts.get("hf_config")
    if given is None and mf_cfg is None:
        raise ConfigError(f"{source.url}: no MindFormers config (*.yaml or config.json) to derive the HF config.json"
                          " from; pass --hf-config config.json")
    qkv, ffn = layouts_from_mf_config(mf_cfg) if mf_cfg is not None else ("interleaved", "interleaved")
    qkv, ffn = opts.get("qkv_layout") or qkv, opts.get("ffn_layout") or ffn
    shapes = {n: tuple(t.shape) for n, t in source.tensors.items()}
    model_cfg = _read_hf_config(given)[0] if given is not None else mf_cfg
    assert model_cfg is not None
    conv = mm.from_mf(shapes, model_cfg, qkv_layout=qkv, ffn_layout=ffn, strict=False)
    if not conv.ops:
        raise FormatError(f"{source.url}: no tensor has a MindFormers name of model family {model!r}"
                          f" (e.g. {sorted(shapes)[:3]}); is SRC a MindFormers {model} checkpoint?")
    if given is not None:
        config_bytes = _read_hf_config(given)[1]
    else:
        assert mf_cfg is not None
        doc = hf_config_for(model, mf_cfg, dtype=_main_dtype(source, [op.mf_name for op in conv.ops]))
        config_bytes = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    _warn_left_out(source, conv.skipped)
    bands = _Bands(job.read, source)
    items = []
    for op in conv.ops:  # an op's HF tensors one after another: a band read for gate serves up
        dtype = source.tensors[op.mf_name].dtype
        for hf_name, shape in zip(op.hf_names, op.hf_shapes):
            items.append(OutItem(hf_name, dtype, tuple(shape), _fetcher(job, conv, bands, hf_name, dtype)))
    limit = size_option(opts.get("max_shard_size") or DEFAULT_MAX_SHARD_SIZE)
    assert limit is not None
    return items, config_bytes, limit
