"""The synthetic model the bench measures: an LLM-shaped set of tensors and its layouts.

Shapes follow a decoder LLM with hidden size ``h``: an embedding (4h x h, split on
dim 0), and per layer qkv (3h x h, dim 0), o (h x h, dim 1), mlp up (4h x h, dim 0),
mlp down (h x 4h, dim 1) and two norms (h, replicated).  The number of layers is
picked so the model has about ``size`` bytes, so the largest tensor (4h^2 elements)
stays the same when the size grows: memory should stay flat, time linear.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from distckpt import dtypes
from distckpt.layout import ParamSpec, Strategy, TensorLayout

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Model:
    hidden: int
    layers: int
    dtype: str
    tensors: tuple[tuple[str, tuple[int, ...], int | None], ...]  # name, shape, split dim (None: replicated)

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) for _, s, _ in self.tensors) * self.itemsize

    @property
    def largest(self) -> int:
        return max(math.prod(s) for _, s, _ in self.tensors) * self.itemsize


def default_hidden(size: int) -> int:
    if size >= 256 * MiB:
        return 2048
    if size >= 32 * MiB:
        return 1024
    return 256


def make_model(size: int, dtype: str = "float32", hidden: int | None = None, *, head: bool = False) -> Model:
    """About ``size`` bytes of LLM-shaped tensors; ``head`` adds an lm_head (4h x h, dim 0) after the layers."""
    h = hidden or default_hidden(size)
    item = dtypes.itemsize(dtype)
    per_layer = 12 * h * h + 2 * h
    fixed = (8 if head else 4) * h * h
    layers = max(1, round((size / item - fixed) / per_layer))
    ts: list[tuple[str, tuple[int, ...], int | None]] = [("model.embed.weight", (4 * h, h), 0)]
    for i in range(layers):
        p = f"model.layers.{i}."
        ts += [
            (p + "attn.qkv.weight", (3 * h, h), 0),
            (p + "attn.o.weight", (h, h), 1),
            (p + "mlp.up.weight", (4 * h, h), 0),
            (p + "mlp.down.weight", (h, 4 * h), 1),
            (p + "norm1.weight", (h,), None),
            (p + "norm2.weight", (h,), None),
        ]
    ts.append(("model.norm.weight", (h,), None))
    if head:
        ts.append(("lm_head.weight", (4 * h, h), 0))
    return Model(h, layers, dtype, tuple(ts))


def strategy(model: Model, dp: int, tp: int, *, dim: int | None = None) -> Strategy:
    """DP x TP layout: dev_matrix [dp, tp]; the TP axis (index 0 from the right) splits each tensor's dim.

    ``dim`` forces every 2-D tensor to be split on that dim (0: rows, the
    outer dim; 1: columns, the inner dim) instead of the model's own choice.
    """
    params = {}
    for name, shape, split in model.tensors:
        tm = [-1] * len(shape)
        if split is not None:
            tm[dim if dim is not None and len(shape) == 2 else split] = 0
        tmap = tuple((t,) for t in tm)  # the normalised form: one tuple of axes per dim
        params[name] = ParamSpec(name, TensorLayout((dp, tp), tmap), shape=shape)
    return Strategy(params)


def tensor_data(model: Model, name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic pseudo-random values (finite: uniform [0, 1))."""
    rng = np.random.default_rng([zlib.crc32(name.encode()), seed])
    a = rng.random(shape, dtype=np.float32)
    if model.dtype == "float32":
        return a
    return a.astype(dtypes.to_numpy(model.dtype))


def peer_model(size: int, *, head: bool) -> Model:
    """The model of the peer rows: fp32, hidden 1024 from 64 MiB up (512 and 128 MiB with a head, 256 and
    64 MiB without, are then exact up to the norms), 512 from 16 MiB (32 MiB exact), 256 below."""
    hidden = 1024 if size >= 64 * MiB else 512 if size >= 16 * MiB else 256
    return make_model(size, "float32", hidden, head=head)


def block_data(name: str, shape: tuple[int, ...], part: int, parts: int) -> np.ndarray:
    """Row block ``part`` of ``parts`` of a tensor (the whole tensor when it is 1-D): uniform [0, 1) fp32.

    A tensor's values are defined block by block, so each rank of a row-sharded save makes only its
    own rows, and anyone can rebuild a column slice from the blocks.
    """
    if len(shape) == 1:
        part, parts = 0, 1
    rows = shape[0] // parts
    rng = np.random.default_rng([zlib.crc32(name.encode()), part, parts])
    return rng.random((rows, *shape[1:]), dtype=np.float32)


def fingerprint(a: np.ndarray) -> int:
    """Exact, order-free fingerprint of an array's bytes: their sum as an integer."""
    return int(np.ascontiguousarray(a).reshape(-1).view(np.uint8).sum(dtype=np.uint64))


def rank_states(model: Model, strat: Strategy, seed: int = 0):
    """Each rank's local (contiguous) slices; DP replicas share the same arrays.

    Returns ``{rank: {name: array}}``; the model's bytes are held once.
    """
    world = strat.world_size
    states: dict[int, dict[str, np.ndarray]] = {r: {} for r in range(world)}
    for name, shape, _ in model.tensors:
        full = tensor_data(model, name, shape, seed)
        pieces: dict[tuple, np.ndarray] = {}
        for r in range(world):
            box = strat.box(name, r, shape)
            assert box is not None
            if box.offsets not in pieces:
                idx = tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))
                pieces[box.offsets] = np.ascontiguousarray(full[idx])
            states[r][name] = pieces[box.offsets]
        del full
    return states
