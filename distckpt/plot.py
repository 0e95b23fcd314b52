"""A picture of how one tensor is cut across ranks (``distckpt inspect SRC --plot NAME``).

:func:`plot_spec` decides everything the picture says (rectangles, their labels,
axis labels, title) as plain data; :func:`plot_tensor` only draws it with
matplotlib (imported lazily).  Labels name who holds each piece: ``rank 3``,
``ranks 0, 2 (2 replicas)``, or ``all 4 ranks`` for a piece every rank holds;
a 1-D tensor is one band along dim 0 (no invented second dim).
"""

from __future__ import annotations

import os
from typing import Any

from .errors import NotCommittedError, require
from .layout import Box, full_box

__all__ = ["plot_tensor", "tensor_cells", "plot_spec"]


def _cells(source, name: str) -> tuple[list[int], list[tuple[Box, list[int]]], str]:
    if name not in source.tensors:
        close = [n for n in source.tensors if name.lower() in n.lower()][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise NotCommittedError(f"{source.url}: no tensor {name!r}{hint}")
    t = source.tensors[name]
    strat = source.strategy
    cells: list[tuple[Box, list[int]]] = []
    if strat is not None and name in strat:
        for box, ranks in strat.replica_groups(name, t.shape):
            cells.append((box, [int(r) for r in ranks]))
    else:
        # not in the strategy: a full replica on every rank of the job (whoever wrote the bytes)
        cells = [(full_box(t.shape), list(range(max(1, source.world_size))))]
    return list(t.shape), cells, t.dtype


def tensor_cells(src, name: str, *, src_strategy=None, storage_options=None) -> tuple[list[int], list[tuple[Box, list[int]]], str]:
    """(shape, [(box, ranks holding it)], dtype) for tensor ``name`` of SRC."""
    from .sources import open_source

    return _cells(open_source(src, src_strategy=src_strategy, storage_options=storage_options), name)


def _label(ranks: list[int], world: int) -> str:
    from .comm import format_ranks

    if not ranks:
        return ""
    if len(ranks) == world and world > 1:
        return f"all {world} ranks"
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    shown = format_ranks(ranks)
    if len(shown) > 24:
        shown = f"{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}"
    return f"ranks {shown}\n({len(ranks)} replicas)"


def plot_spec(src, name: str, *, src_strategy=None, storage_options=None) -> dict[str, Any]:
    """What the picture of ``name`` shows, as data.

    ``{"shape", "dtype", "world_size", "rows", "cols", "xlabel", "ylabel", "title",
    "cells": [{"row", "height", "col", "width", "label", "ranks"}]}``; dims 0 and 1
    are rows and columns, a 1-D tensor is one band whose columns are dim 0.
    """
    from .sources import open_source

    source = open_source(src, src_strategy=src_strategy, storage_options=storage_options)
    shape, cells, dtype = _cells(source, name)
    world = max(1, source.world_size)
    one_d = len(shape) <= 1
    rows = 1 if one_d else shape[0]
    cols = (shape[0] if shape else 1) if one_d else shape[1]
    out_cells = []
    for box, ranks in cells:
        if one_d:
            r0, h = 0, 1
            c0, w = (box.offsets[0], box.sizes[0]) if box.ndim else (0, 1)
            where = f"[{c0}:{c0 + w}]" if box.ndim else "scalar"
        else:
            r0, h, c0, w = box.offsets[0], box.sizes[0], box.offsets[1], box.sizes[1]
            where = f"[{r0}:{r0 + h}, {c0}:{c0 + w}]"
        out_cells.append({"row": r0, "height": h, "col": c0, "width": w, "ranks": ranks,
                          "label": _label(ranks, world) + f"\n{where}"})
    if one_d:
        xlabel, ylabel = (f"dim 0 ({cols})" if shape else "scalar"), ""
    else:
        xlabel, ylabel = f"dim 1 ({cols})", f"dim 0 ({rows})"
    extra = f", dims 2+ {shape[2:]} not split in this view" if len(shape) > 2 else ""
    pieces = f"{len(cells)} distinct piece" + ("" if len(cells) == 1 else "s")
    return {"shape": shape, "dtype": dtype, "world_size": world, "rows": rows, "cols": cols, "xlabel": xlabel,
            "ylabel": ylabel, "title": f"{name}\n{dtype} {shape} on {world} rank(s): {pieces}{extra}",
            "cells": out_cells}


def plot_tensor(src, name: str, *, out: str | None = None, src_strategy=None, storage_options=None) -> str:
    """Draw :func:`plot_spec` of ``name`` into a PNG; return its path."""
    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = plot_spec(src, name, src_strategy=src_strategy, storage_options=storage_options)
    one_d = len(spec["shape"]) <= 1
    height = 1.8 if one_d else 7 * min(2.0, max(0.4, spec["rows"] / max(spec["cols"], 1)))
    fig, ax = plt.subplots(figsize=(7, height))
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(spec["cells"]):
        ax.add_patch(plt.Rectangle((c["col"], c["row"]), c["width"], c["height"], facecolor=cmap(i % 20),
                                   edgecolor="black", linewidth=1.2, alpha=0.85))
        ax.text(c["col"] + c["width"] / 2, c["row"] + c["height"] / 2, c["label"], ha="center", va="center", fontsize=8)
    ax.set_xlim(0, spec["cols"])
    ax.set_ylim(spec["rows"], 0)
    ax.set_xlabel(spec["xlabel"])
    if one_d:
        ax.set_yticks([])
    else:
        ax.set_ylabel(spec["ylabel"])
    ax.set_title(spec["title"], fontsize=10)
    out = out or (name.replace("/", "_") + ".png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
