"""A HuggingFace checkpoint read as a MindFormers one: MindFormers names, fused weights.

:func:`distckpt.sources.open_source` opens SRC as usual (an HF directory or URL is a
``pretrained`` source: ``model.safetensors`` or shards + ``model.safetensors.index.json``;
one ``.safetensors`` file is a ``file`` source) and, when the caller names a model family
(``model="qwen3"``), hands it to :func:`map_source`.  That reads the HF ``config.json``
beside the weights, builds the :class:`~distckpt.models.Conversion` of the tensor names
and shapes (every shape is checked against the config before a byte is read) and
returns an :class:`HFSource`: a :class:`~distckpt.sources.Source` whose tensors are the
MindFormers tensors (``...linear_qkv.weight`` fused from q, k, v; ``...linear_fc1.weight``
from gate and up; ``...experts.weight1`` / ``weight2`` from the experts).

:meth:`HFSource.read` fills a box of a MindFormers tensor piece by piece
(:meth:`~distckpt.models.Conversion.read_plan`): each piece is one box of one HF tensor,
read through the underlying source's ``read``, so checksums, byte counts and every
storage backend work unchanged, and a rank's slice of a fused tensor reads only that
rank's rows of q, k and v (bytes read == bytes needed).

Decisions:

* HF tensors the family ignores (``rotary_emb.inv_freq``; ``lm_head.weight`` of a model
  with tied embeddings) are left out and listed in ``info["skipped"]`` (``inspect`` shows
  them); an HF tensor the family does not know is an error naming it.
* Plain values of the underlying source (a safetensors file written by distckpt may hold
  some) pass through unchanged; HuggingFace checkpoints have none.
* The strategy SRC was saved with (if any) names HF tensors, so the mapped source has none.
* ``verify`` checks the underlying files (the map has no bytes of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import dtypes, jsonutil, naming
from ..errors import ConfigError, FormatError, NotFoundError
from ..index import Index, TensorInfo
from ..layout import Box
from ..mfconfig import CONFIG_NAME, MAX_CONFIG_BYTES, config_json_from_yaml
from . import Source, SourceKind

if TYPE_CHECKING:
    from ..execute import ReadStats
    from ..models import Conversion

__all__ = ["HFSource", "map_source", "hf_config_of", "config_names", "read_json_object"]

#: Pieces of one box read at once from remote storage (a rank's QKV slice is 3 per KV group).
MAX_PARALLEL_PIECES = 16


@dataclass
class HFSource(Source):
    """An HF checkpoint (``base``) seen through a model map (``conversion``) as MindFormers tensors."""

    base: Source = field(default=None, repr=False)  # type: ignore[assignment]
    conversion: Conversion = field(default=None, repr=False)  # type: ignore[assignment]

    def read(self, name: str, box: Box, *, verify: bool = True, stats: ReadStats | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Box ``box`` of MindFormers tensor ``name``, read as the HF boxes that make it up."""
        if name not in self.tensors:
            raise NotFoundError(f"{self.url}: no MindFormers tensor {name!r} in this {self.conversion.model.name} model")
        op = self.conversion.op_for_mf(name)
        if op.kind == "rename":  # one HF tensor, same box: read straight into the output
            return self.base.read(op.hf_names[0], box, verify=verify, stats=stats, out=out)
        if out is None:
            out = np.empty(box.sizes, dtype=dtypes.to_numpy(self.tensors[name].dtype))
        pieces = op.read_plan(box)
        if len(pieces) < 2 or getattr(self.storage, "is_local", True):
            for piece in pieces:
                piece.apply_box(self.base.read(piece.name, piece.src_box, verify=verify, stats=stats), out)
            return out
        # remote storage: the pieces' requests overlap in time (each piece counts its own bytes)
        from concurrent.futures import ThreadPoolExecutor

        from ..execute import ReadStats

        def one(piece):
            st = ReadStats()
            return self.base.read(piece.name, piece.src_box, verify=verify, stats=st), st

        with ThreadPoolExecutor(max_workers=min(len(pieces), MAX_PARALLEL_PIECES)) as pool:
            for piece, (part, st) in zip(pieces, pool.map(one, pieces)):
                piece.apply_box(part, out)
                if stats is not None:
                    stats.add(st)
        return out


def config_names(source: Source) -> list[str]:
    """SRC's config files: those its opener found, or for one file the ``config.json`` / ``*.yaml`` beside it."""
    if source.config_files:
        return list(source.config_files)
    try:
        return [n for n in source.storage.listdir() if n == CONFIG_NAME or naming.is_yaml(n)]
    except OSError:
        return []


def read_json_object(store: Any, name: str) -> dict[str, Any]:
    """A JSON config file that must hold one object (duplicate keys refused, size capped)."""
    where = store.child_url(name)
    doc = jsonutil.loads(store.read_bytes(name, limit=MAX_CONFIG_BYTES), where=where, error=ConfigError)
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: a config must be a JSON object")
    return doc


def hf_config_of(source: Source) -> dict[str, Any]:
    """The HF ``config.json`` beside SRC's weights (a MindFormers ``*.yaml`` is accepted too)."""
    names = config_names(source)
    if CONFIG_NAME in names:
        return read_json_object(source.storage, CONFIG_NAME)
    yamls = sorted(n for n in names if naming.is_yaml(n))
    if yamls:
        return config_json_from_yaml(source.storage, yamls[0])
    raise ConfigError(
        f"{source.url}: no config.json beside the weights; the model map needs the model's numbers"
        " (hidden size, heads, KV heads, head_dim ...): put the HF config.json there"
    )


def map_source(source: Source, *, model: str, qkv_layout: str | None = None, ffn_layout: str | None = None) -> Source:
    """``source`` (HF names) as MindFormers tensors of model family ``model`` (see the module docstring)."""
    from ..models import get_model_map

    if isinstance(source, HFSource):
        raise ConfigError(f"{source.url}: already read through the {source.conversion.model.name} model map")
    mm = get_model_map(model)
    config = hf_config_of(source)
    shapes = {n: t.shape for n, t in source.tensors.items()}
    conv = mm.from_hf(shapes, config, qkv_layout=qkv_layout or "interleaved", ffn_layout=ffn_layout or "interleaved")
    tensors: dict[str, TensorInfo] = {}
    for op in conv.ops:
        dts = {source.tensors[n].dtype for n in op.hf_names}
        if len(dts) > 1:
            got = {n: source.tensors[n].dtype for n in op.hf_names}
            raise FormatError(f"{source.url}: {op.mf_name} is fused from tensors of different dtypes {got}; cannot fuse")
        tensors[op.mf_name] = TensorInfo(op.mf_name, dts.pop(), op.mf_shape)
    index = Index(tensors=tensors, values=dict(source.values), metadata={"model": model})
    info = {
        "model": model,
        "qkv_layout": conv.qkv_layout,
        "ffn_layout": conv.ffn_layout,
        "skipped": list(conv.skipped),
        "inspect": {"model_map": {"model": model, "qkv_layout": conv.qkv_layout, "ffn_layout": conv.ffn_layout,
                                  "hf_tensors": len(shapes), "skipped": list(conv.skipped),
                                  "underlying_kind": str(source.kind)}},
    }
    return HFSource(source.storage, index, SourceKind.HF, None, list(source.config_files), source.name, 1,
                    source.path, info, base=source, conversion=conv)
