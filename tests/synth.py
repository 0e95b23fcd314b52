"""Synthesize parallel strategies and MindSpore-native distributed checkpoints for tests.

MindSpore cannot emit strategy files on a CPU, so the tests build them here:

* :func:`random_model` -- parameter names, global shapes, dtypes and pipeline stages;
* :func:`random_strategy` -- a random :class:`~distckpt.layout.Strategy` for a model
  (dev_matrix of 1-3 axes, plain and nested tensor_maps, replicated axes, optimizer
  shard where MindSpore allows it, 1 or 2 pipeline stages);
* :func:`write_strategy` -- the strategy as MindSpore strategy file(s), written with
  distckpt's writer or with MindSpore's generated ``node_strategy_pb2`` classes; two
  stages are written per stage and merged with ``mindspore.merge_pipeline_strategys``;
* :func:`write_native` -- ``root/rank_r/checkpoint_r.ckpt`` for every rank, the slices
  cut from full tensors with :func:`np_slice` (plain ``np.split``, independent of
  distckpt's layout code) and written with ``mindspore.save_checkpoint`` or distckpt's
  own ``.ckpt`` writer.

MindSpore is imported lazily, only by the functions that need it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from distckpt.layout import ParamSpec, Strategy, TensorLayout

__all__ = [
    "DTYPES",
    "Model",
    "random_model",
    "random_layout",
    "random_strategy",
    "make_strategy",
    "random_tensor",
    "full_tensors",
    "np_slice",
    "write_strategy",
    "write_native",
    "read_ckpt_raw",
]

DTYPES = ("float32", "float16", "bfloat16", "int32")
_NP = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int32": np.dtype(np.int32),
}


@dataclass
class Model:
    """Global shape, dtype and pipeline stages of every parameter."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    stages: dict[str, tuple[int, ...]]
    num_stages: int = 1


def random_model(rng: np.random.Generator, *, n_params: int = 4, num_stages: int = 1, unit: int = 24) -> Model:
    """Random parameters; every dim is a multiple of ``unit`` (24 divides by 1, 2, 3, 4, 6, 8).

    With two stages the first parameter is shared by both stages (like a tied
    embedding), the others alternate between stage 0 and stage 1.
    """
    shapes, dts, stages = {}, {}, {}
    order = [str(d) for d in rng.permutation(DTYPES)]
    for i in range(n_params):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(unit * rng.integers(1, 3)) for _ in range(ndim))
        if ndim == 3:
            shape = (shape[0], shape[1], unit)
        name = f"model.layers.{i}.w{ndim}" if i else "model.embedding.weight"
        shapes[name] = shape
        dts[name] = order[i] if i < len(order) else str(rng.choice(DTYPES))
        if num_stages == 1:
            stages[name] = (0,)
        elif i == 0:
            stages[name] = tuple(range(num_stages))
        else:
            stages[name] = ((i - 1) % num_stages,)
    return Model(shapes, dts, stages, num_stages)


def random_dev_matrix(rng: np.random.Generator, device_num: int, max_axes: int = 3) -> tuple[int, ...]:
    """A dev_matrix of 1..max_axes axes whose product is ``device_num`` (axes of size 1 allowed)."""
    n_axes = int(rng.integers(1, max_axes + 1))
    dims = [1] * n_axes
    rest = device_num
    primes = []
    p = 2
    while rest > 1:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    for q in primes:
        dims[int(rng.integers(0, n_axes))] *= q
    return tuple(dims)


def random_layout(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    dev_matrix: tuple[int, ...],
    *,
    nested: bool = False,
    opt: bool = False,
) -> TensorLayout:
    """A random layout of ``shape`` over ``dev_matrix`` that divides the shape.

    With ``opt`` an optimizer shard is added when MindSpore allows it with
    ``opt_shard_step == prod(model-parallel splits)``: every sharded axis lies to
    the right of every replicated axis, and the shard takes replicated axes from
    the right (the last one possibly in part).
    """
    n = len(dev_matrix)
    ndim = len(shape)

    def size(a: int) -> int:
        return dev_matrix[n - 1 - a]

    for _attempt in range(50):
        axes = list(range(n))
        if opt and n > 1 and rng.random() < 0.7:
            axes.remove(n - 1)  # keep the leftmost axis replicated: room for an optimizer shard
        rng.shuffle(axes)
        tmap: list = []
        for _d in range(ndim):
            r = rng.random()
            if not axes or r < 0.3:
                tmap.append(-1)
            elif nested and r > 0.7 and len(axes) >= 2:
                tmap.append((axes.pop(), axes.pop()))
            else:
                tmap.append(axes.pop())
        lay = TensorLayout(dev_matrix, tmap)
        if any(s % k for s, k in zip(shape, lay.splits)):
            continue
        if not opt or not ndim:
            return lay
        used = {a for e in lay.tensor_map for a in e if size(a) > 1}
        rep = sorted(a for a in range(n) if size(a) > 1 and a not in used)
        if not rep or (used and min(rep) < max(used)):
            continue
        step = math.prod(lay.splits)
        options = []
        acc = 1
        for a in rep:
            for d in range(2, size(a) + 1):
                if size(a) % d == 0:
                    options.append(acc * d)
            acc *= size(a)
        rng.shuffle(options)
        for o in options:
            if (shape[0] // lay.splits[0]) % o == 0:
                return TensorLayout(dev_matrix, tmap, step, o)
    return TensorLayout(dev_matrix, [-1] * ndim)


def random_strategy(
    rng: np.random.Generator,
    model: Model,
    stage_device_num: int,
    *,
    nested: bool = False,
    opt: bool = False,
    num_stages: int | None = None,
    dev_matrix: tuple[int, ...] | None = None,
) -> Strategy:
    """A random strategy for ``model`` with ``stage_device_num`` devices per stage.

    ``num_stages`` defaults to the model's; with 1 every parameter lives in stage 0.
    """
    ns = model.num_stages if num_stages is None else num_stages
    dm = dev_matrix or random_dev_matrix(rng, stage_device_num)
    for _ in range(50):  # with an optimizer shard: a data-parallel axis on the left, model-parallel ones right
        if dev_matrix or not opt or stage_device_num < 4 or (dm[0] > 1 and math.prod(dm[1:]) > 1):
            break
        dm = random_dev_matrix(rng, stage_device_num)
    for attempt in range(60):  # until the strategy shows what was asked for (a nested map, a shard)
        if attempt and attempt % 5 == 0 and not dev_matrix:
            dm = random_dev_matrix(rng, stage_device_num)
        specs = {}
        for name, shape in model.shapes.items():
            stages = model.stages[name] if ns == model.num_stages else (0,)
            specs[name] = ParamSpec(name, random_layout(rng, shape, dm, nested=nested, opt=opt), stages)
        lays = [p.layout for p in specs.values()]
        if (not nested or any(len(e) > 1 for lay in lays for e in lay.tensor_map)) and (
            not opt or any(lay.opt_shard_size for lay in lays)
        ):
            break
    return Strategy(specs, ns, stage_device_num)


def make_strategy(layouts: dict, *, num_stages: int = 1, stages: dict | None = None) -> Strategy:
    """A strategy from ``{name: (dev_matrix, tensor_map[, opt_step, opt_size])}``."""
    specs = {}
    for name, lay in layouts.items():
        specs[name] = ParamSpec(name, TensorLayout(*lay), (stages or {}).get(name, (0,)))
    return Strategy(specs, num_stages)


def random_tensor(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Finite random values of ``dtype`` (bfloat16 as ``ml_dtypes.bfloat16``)."""
    if dtype in ("int32", "int64", "int8", "int16", "uint8"):
        info = np.iinfo(_NP.get(dtype, np.dtype(dtype)))
        return rng.integers(info.min, info.max, size=shape, dtype=np.int64, endpoint=True).astype(dtype)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    x = rng.standard_normal(shape).astype(np.float32) * 3
    if dtype in _NP:
        return x.astype(_NP[dtype])
    return x.astype(getattr(ml_dtypes, dtype, dtype))


def full_tensors(rng: np.random.Generator, model: Model) -> dict[str, np.ndarray]:
    return {n: random_tensor(rng, s, model.dtypes[n]) for n, s in model.shapes.items()}


def np_slice(full: np.ndarray, layout: TensorLayout, rank: int) -> np.ndarray:
    """What ``rank`` holds of ``full`` under ``layout``, by plain ``np.split`` (DESIGN §2.2).

    Written independently of distckpt's layout code: the rank's coordinates are
    the row-major unravel of ``rank % prod(dev_matrix)``; tensor_map counts axes
    from the right; a nested entry's first axis is outermost; the optimizer
    shard then splits dim 0 into ``size`` pieces and the rank takes piece
    ``(rank // step) % size``.
    """
    dm = list(layout.dev_matrix)
    coords = np.unravel_index(rank % int(np.prod(dm)), dm)
    out = full
    for dim, entry in enumerate(layout.tensor_map):
        count, index = 1, 0
        for a in entry:  # already normalised to a tuple of axes
            pos = len(dm) - 1 - a
            count *= dm[pos]
            index = index * dm[pos] + int(coords[pos])
        out = np.split(out, count, axis=dim)[index]
    if layout.opt_shard_size and out.ndim:
        out = np.split(out, layout.opt_shard_size, axis=0)[(rank // layout.opt_shard_step) % layout.opt_shard_size]
    return np.array(out, order="C")  # a copy; keeps 0-d arrays 0-d


# ----------------------------------------------------------------- strategy files
def _pb2_stage_bytes(strategy: Strategy, stage: int) -> bytes:
    """One stage's strategy file built with MindSpore's generated protobuf classes."""
    from mindspore.train import node_strategy_pb2 as P

    m = P.ParallelStrategyMap()
    m.current_stage = stage
    item = m.parallel_strategy_item.add()
    item.node_name = f"synth/stage{stage}"
    item.parallel_strategys.stage = stage
    for name, spec in strategy.params.items():
        if stage not in spec.stages:
            continue
        li = m.parallel_layout_item.add()
        li.param_name = name
        lay = li.parallel_layouts
        lay.dev_matrix.add().dim.extend(spec.layout.dev_matrix)
        tm = spec.layout.tensor_map
        if any(len(e) > 1 for e in tm):  # nested: one TensorMap per dim
            for e in tm:
                lay.tensor_map.add().dim.extend(list(e) or [-1])
            if len(tm) == 1:
                lay.tensor_map.add()
        else:
            lay.tensor_map.add().dim.extend([e[0] if e else -1 for e in tm])
        lay.param_split_shape.add()
        lay.indices_offset.add()
        lay.field = 0
        lay.opt_weight_shard_step = spec.layout.opt_shard_step
        lay.opt_weight_shard_size = spec.layout.opt_shard_size
    return m.SerializeToString()


def write_strategy(strategy: Strategy, path: str, *, writer: str = "distckpt") -> str:
    """Write ``strategy`` where MindSpore's tools can read it; return the file to pass them.

    ``writer`` is ``"distckpt"`` (``distckpt.strategy``) or ``"pb2"`` (MindSpore's
    generated classes).  With several stages one file per stage goes to
    ``{path}.stages/`` and ``mindspore.merge_pipeline_strategys`` merges them into
    ``path``, as a user would.
    """
    from distckpt.strategy import dump_strategy_proto, save_stage_strategy_files, save_strategy

    path = os.fspath(path)
    if strategy.num_stages == 1:
        if writer == "pb2":
            with open(path, "wb") as f:
                f.write(_pb2_stage_bytes(strategy, 0))
        else:
            save_strategy(strategy, path)
        return path
    stage_dir = path + ".stages"
    os.makedirs(stage_dir, exist_ok=True)
    if writer == "pb2":
        for s in range(strategy.num_stages):
            with open(os.path.join(stage_dir, f"ckpt_strategy_rank_{s * strategy.stage_device_num}.ckpt"), "wb") as f:
                f.write(_pb2_stage_bytes(strategy, s))
    else:
        save_stage_strategy_files(strategy, stage_dir)
        assert dump_strategy_proto(strategy, stage=0)
    import mindspore as ms

    ms.merge_pipeline_strategys(stage_dir, path)
    return path


# ------------------------------------------------------------- native checkpoints
def _ms_tensor(arr: np.ndarray):
    import mindspore as ms

    if arr.dtype == np.dtype(ml_dtypes.bfloat16):
        return ms.Tensor(arr.astype(np.float32), dtype=ms.bfloat16)  # bf16 -> fp32 is exact
    return ms.Tensor(arr)


def rank_entries(strategy: Strategy, full: dict[str, np.ndarray], rank: int, extras: dict[str, np.ndarray] | None = None):
    """(name, local array) pairs ``rank`` holds, by :func:`np_slice`, then the extras."""
    out = []
    stage = rank // strategy.stage_device_num
    for name, arr in full.items():
        spec = strategy.params.get(name)
        if spec is None:
            out.append((name, arr))
        elif stage in spec.stages:
            out.append((name, np_slice(arr, spec.layout, rank)))
    out.extend((extras or {}).items())
    return out


def write_native(
    root: str,
    strategy: Strategy,
    full: dict[str, np.ndarray],
    *,
    extras: dict[str, np.ndarray] | None = None,
    writer: str = "ms",
    prefix: str = "checkpoint_",
) -> str:
    """Write ``root/rank_r/{prefix}r.ckpt`` for every rank of ``strategy``.

    ``extras`` (e.g. ``global_step``) go to every rank whole.  ``writer`` is
    ``"ms"`` (``mindspore.save_checkpoint``) or ``"distckpt"`` (our own writer).
    """
    root = os.fspath(root)
    if extras is None:
        extras = {"global_step": np.array([7], dtype=np.int32)}
    for r in range(strategy.world_size):
        d = os.path.join(root, f"rank_{r}")
        os.makedirs(d, exist_ok=True)
        fname = os.path.join(d, f"{prefix}{r}.ckpt")
        entries = rank_entries(strategy, full, r, extras)
        if writer == "ms":
            import mindspore as ms

            ms.save_checkpoint([{"name": n, "data": _ms_tensor(a)} for n, a in entries], fname)
        else:
            from distckpt import dtypes
            from distckpt.codecs.ckpt import CkptWriter

            with open(fname, "wb") as f, CkptWriter(f) as w:
                for n, a in entries:
                    w.add_tensor(n, dtypes.name_of(a.dtype), a.shape, a)
    return root


def read_ckpt_raw(path: str) -> dict[str, np.ndarray]:
    """A ``.ckpt`` file's tensors with their stored dtype, by distckpt's pure-Python reader."""
    from distckpt.codecs.ckpt import read_entry, scan_ckpt

    out = {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        for e in scan_ckpt(f, size=size, name=path):
            out[e.name] = read_entry(f, e, name=path)
    return out
