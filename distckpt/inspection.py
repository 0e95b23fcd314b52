"""What ``inspect`` reports about a source: tensors, layouts, replicas, values (schema ``distckpt.inspect/1``)."""

from __future__ import annotations

import math
from typing import Any

from . import jsonutil
from .sources import Source, SourceKind
from .strategy import strategy_to_json

__all__ = ["describe"]


def describe(source: Source) -> dict:
    """The ``inspect`` report of ``source`` (strict JSON: non-finite floats as strings)."""
    strat = source.strategy
    tensors = []
    for name, t in source.tensors.items():
        row: dict[str, Any] = {"name": name, "dtype": t.dtype, "shape": list(t.shape), "chunks": len(t.chunks),
                               "bytes": t.nbytes}
        if strat is not None and name in strat:
            spec = strat.params[name]
            row["layout"] = {**spec.layout.to_json(), "stages": list(spec.stages)}
            holders = len(spec.stages) * strat.stage_device_num  # len(ranks_holding) without building it
            row["replicas"] = holders // max(1, math.prod(spec.layout.full_splits()))
        else:
            row["layout"] = None
            row["replicas"] = source.world_size if source.kind != SourceKind.DISTCKPT or strat is not None else 1
        tensors.append(row)
    out = {
        "schema": "distckpt.inspect/1",
        "src": source.url,
        "kind": str(source.kind),
        "world_size": source.world_size,
        "strategy": strategy_to_json(strat) if strat is not None else None,
        "tensors": tensors,
        "values": dict(source.values),
        "total_bytes": sum(t.nbytes for t in source.tensors.values()),
        "files": sorted(source.index.files) if source.kind == SourceKind.DISTCKPT else None,
        "config_files": source.config_files,
    }
    out.update(source.info.get("inspect", {}))
    return jsonutil.finite(out)
