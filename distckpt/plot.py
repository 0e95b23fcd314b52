"""A picture of how one tensor is cut across ranks (``distckpt inspect SRC --plot NAME``)."""

from __future__ import annotations

import os

from .errors import NotCommittedError, require
from .layout import Box, full_box

__all__ = ["plot_tensor", "tensor_cells"]


def tensor_cells(src, name: str, *, src_strategy=None, storage_options=None) -> tuple[list[int], list[tuple[Box, list[int]]], str]:
    """(shape, [(box, ranks holding it)], dtype) for tensor ``name`` of SRC."""
    from .sources import open_source

    source = open_source(src, src_strategy=src_strategy, storage_options=storage_options)
    if name not in source.tensors:
        close = [n for n in source.tensors if name.lower() in n.lower()][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise NotCommittedError(f"{source.storage.url}: no tensor {name!r}{hint}")
    t = source.tensors[name]
    strat = source.strategy
    cells: list[tuple[Box, list[int]]] = []
    if strat is not None and name in strat:
        for box, ranks in strat.replica_groups(name, t.shape):
            cells.append((box, [int(r) for r in ranks]))
    else:
        # not in the strategy: a full replica on every rank of the job (whoever wrote the bytes)
        everyone = list(range(max(1, source.world_size)))
        cells = [(full_box(t.shape), everyone)]
    return list(t.shape), cells, t.dtype


def _label(ranks: list[int], world: int | None = None) -> str:
    from .comm import format_ranks

    if not ranks:
        return ""
    if world is not None and len(ranks) == world and world > 1:
        return f"all {world} ranks"
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    shown = format_ranks(ranks)
    if len(shown) > 24:
        shown = f"{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}"
    return f"ranks {shown}\n({len(ranks)} replicas)"


def plot_tensor(src, name: str, *, out: str | None = None, src_strategy=None, storage_options=None) -> str:
    """Draw dims 0 (rows) and 1 (columns) of ``name`` with one rectangle per distinct box."""
    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape, cells, dtype = tensor_cells(src, name, src_strategy=src_strategy, storage_options=storage_options)
    world = len({r for _, ranks in cells for r in ranks}) or None
    one_d = len(shape) <= 1
    rows = 1 if one_d else shape[0]
    cols = (shape[0] if shape else 1) if one_d else shape[1]
    height = 1.8 if one_d else 7 * min(2.0, max(0.4, rows / max(cols, 1)))
    fig, ax = plt.subplots(figsize=(7, height))
    cmap = plt.get_cmap("tab20")
    for i, (box, ranks) in enumerate(cells):
        if one_d:  # a 1-D tensor is one band along dim 0: no second axis is drawn
            r0, h = 0, 1
            c0, w = (box.offsets[0], box.sizes[0]) if box.ndim else (0, 1)
            where = f"[{c0}:{c0 + w}]" if box.ndim else "scalar"
        else:
            r0, h, c0, w = box.offsets[0], box.sizes[0], box.offsets[1], box.sizes[1]
            where = f"[{r0}:{r0 + h}, {c0}:{c0 + w}]"
        ax.add_patch(plt.Rectangle((c0, r0), w, h, facecolor=cmap(i % 20), edgecolor="black", linewidth=1.2, alpha=0.85))
        ax.text(c0 + w / 2, r0 + h / 2, _label(ranks, world) + f"\n{where}", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    if one_d:
        ax.set_xlabel(f"dim 0 ({cols})" if shape else "scalar")
        ax.set_yticks([])
    else:
        ax.set_xlabel(f"dim 1 ({cols})")
        ax.set_ylabel(f"dim 0 ({rows})")
    extra = f", dims 2+ {shape[2:]} not split in this view" if len(shape) > 2 else ""
    pieces = f"{len(cells)} distinct piece" + ("" if len(cells) == 1 else "s")
    ax.set_title(f"{name}\n{dtype} {shape}: {pieces}{extra}", fontsize=10)
    out = out or (name.replace("/", "_") + ".png")
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
