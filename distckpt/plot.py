"""A picture of how one tensor is cut across ranks (``distckpt inspect SRC --plot NAME``)."""

from __future__ import annotations

import os

from .errors import NotCommittedError, require
from .layout import Box

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
        for c in t.chunks:
            cells.append((c.box, [c.rank] if c.rank is not None else []))
    return list(t.shape), cells, t.dtype


def _label(ranks: list[int]) -> str:
    if not ranks:
        return ""
    if len(ranks) > 6:
        return f"ranks {ranks[0]},{ranks[1]},…,{ranks[-1]}\n({len(ranks)} replicas)"
    return "rank " + ",".join(map(str, ranks)) if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks))


def plot_tensor(src, name: str, *, out: str | None = None, src_strategy=None, storage_options=None) -> str:
    """Draw dims 0 (rows) and 1 (columns) of ``name`` with one rectangle per distinct box."""
    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape, cells, dtype = tensor_cells(src, name, src_strategy=src_strategy, storage_options=storage_options)
    rows = shape[0] if len(shape) >= 1 else 1
    cols = shape[1] if len(shape) >= 2 else 1
    fig, ax = plt.subplots(figsize=(7, 7 * min(2.0, max(0.4, rows / max(cols, 1)))))
    cmap = plt.get_cmap("tab20")
    for i, (box, ranks) in enumerate(cells):
        r0 = box.offsets[0] if box.ndim >= 1 else 0
        c0 = box.offsets[1] if box.ndim >= 2 else 0
        h = box.sizes[0] if box.ndim >= 1 else 1
        w = box.sizes[1] if box.ndim >= 2 else 1
        ax.add_patch(plt.Rectangle((c0, r0), w, h, facecolor=cmap(i % 20), edgecolor="black", linewidth=1.2, alpha=0.85))
        ax.text(c0 + w / 2, r0 + h / 2, _label(ranks) + f"\n[{r0}:{r0 + h}, {c0}:{c0 + w}]",
                ha="center", va="center", fontsize=8)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xlabel(f"dim 1 ({cols})")
    ax.set_ylabel(f"dim 0 ({rows})")
    extra = f", dims 2+ {shape[2:]} not split in this view" if len(shape) > 2 else ""
    ax.set_title(f"{name}\n{dtype} {shape}: {len(cells)} distinct pieces{extra}", fontsize=10)
    out = out or (name.replace("/", "_") + ".png")
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
