"""Real MindFormers 1.9 checkpoints, written by MindFormers' own save code, and its own loader as the oracle.

A multi-rank save cannot run on a CPU host (MindSpore 2.9 cannot compile semi-auto-parallel
graphs on CPU, and ``barrier_world`` has no CPU kernel), so :func:`make_mf_checkpoint` replays
one rank after another in this process.  Each rank's turn is MindFormers' own
``mindformers.checkpoint.checkpoint.save_checkpoint(iteration, net, optimizer, ...)`` with Cells
holding exactly the slices that rank holds (``reshard.infer_slice_area_by_rank``, MindFormers'
own rule).  That one call writes the rank's model/opt safetensors (plain:
``ms.save_checkpoint`` under ``utils.get_checkpoint_name``; balanced:
``fully_parallel.BalancedSaveStrategy(...).save(iteration)``), and on rank 0 ``metadata.json``
(``metadata.save_metadata``), ``common.json`` (``CommonInfo.save_common``) and the tracker.

Patched, only because a CPU host forces it:

* ``sharded_tensor.get_strategy_metadata``: returns the per-rank ``mindspore.parallel.Layout``
  objects built here (a real job reads them from the compiled parallel graph);
  ``sharded_tensor.get_all_sharded_tensor`` then turns them into sharded-tensor metadata with
  ``get_sharded_tensor_from_strategy_metadata``, as in a real job;
* ``checkpoint.barrier_world``: a no-op (one process plays every rank in turn);
* ``metadata.get_group_size``: the world size (no communication group exists);
* environment ``RANK_ID`` / ``RANK_SIZE``: what ``tools.utils.get_real_rank`` /
  ``get_real_group_size`` read when no communication group exists.

Rank 0 runs first (it clears the iteration directory) and so writes the tracker before ranks
1..n-1 have written; the files on disk at the end are what a real job leaves.

:func:`mf_load_standalone` is the oracle: MindFormers' ``load_checkpoint(path, net, optimizer=...)``
in standalone mode merges any of these into full tensors.

MindFormers writes ``./output/log`` into the working directory: call these with cwd in a
temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
import pytest

LAYOUTS = ("dp2mp2", "mp4", "standalone")
DTYPES = ("float32", "bfloat16", "int32")
TAGS = {"float32": "f32", "bfloat16": "bf16", "int32": "i32"}
#: common.json fields of every fixture (``step_num`` and ``global_step`` are the iteration).
COMMON = {"epoch_num": 2, "loss_scale": 1024.0, "global_batch_size": 8, "ckpt_status": 0}

# name suffix -> (global shape, dp2mp2 tensor map, mp4 tensor map); MindSpore Layout aliases
_MODEL = {
    "col": ((8, 6), ("mp", "None"), ("mp", "None")),
    "row": ((6, 8), ("None", "mp"), ("None", "mp")),
    "grid": ((4, 8, 3), ("dp", "mp", "None"), ("None", "mp", "None")),  # dp2mp2: every rank its own slice
    "bias": ((6,), ("None",), ("None",)),
}
_OPT = {"adam_m": "col", "adam_v": "row"}


def tensor_specs(
    layout: str, dtypes: Sequence[str] = DTYPES, with_opt: bool = True
) -> dict[str, tuple[tuple[int, ...], str, tuple[str, ...] | None]]:
    """name -> (global shape, distckpt dtype, MindSpore Layout tensor map or None) of a fixture."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    col = 1 if layout == "dp2mp2" else 2
    out: dict[str, tuple[tuple[int, ...], str, tuple[str, ...] | None]] = {}
    for dt in dtypes:
        for suffix, spec in _MODEL.items():
            out[f"model.{TAGS[dt]}.{suffix}"] = (spec[0], dt, None if layout == "standalone" else spec[col])
    if with_opt:
        for dt in dtypes:
            for prefix, suffix in _OPT.items():
                spec = _MODEL[suffix]
                out[f"{prefix}.model.{TAGS[dt]}.{suffix}"] = (
                    spec[0],
                    dt,
                    None if layout == "standalone" else spec[col],
                )
        out["global_step"] = ((1,), "int32", None if layout == "standalone" else ("None",))
        if layout == "standalone":
            out["learning_rate"] = ((), "float32", None)  # 0-d (MindFormers' multi-rank metadata cannot hold one)
    return out


def _random(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    if dtype == "int32":
        return rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int32)
    a = rng.standard_normal(shape).astype(np.float32)
    return a.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else a


def _ms_tensor(arr: np.ndarray):
    import mindspore as ms

    if arr.dtype == np.dtype(ml_dtypes.bfloat16):  # exact: every bf16 value is an fp32 value
        return ms.Tensor(arr.astype(np.float32), ms.bfloat16)
    return ms.Tensor(np.array(arr, order="C"))  # (np.ascontiguousarray would make a 0-d array 1-d)


def _ms_dtype(dtype: str):
    import mindspore as ms

    return {"float32": ms.float32, "bfloat16": ms.bfloat16, "int32": ms.int32}[dtype]


def _cell(params: Mapping):
    """A Cell holding ``params`` (name -> mindspore Tensor) as Parameters with exactly those names."""
    from mindspore import Parameter, nn

    class Holder(nn.Cell):
        def __init__(self):
            super().__init__()
            for i, (name, t) in enumerate(params.items()):
                setattr(self, f"p{i}", Parameter(t, name=name, requires_grad=False))

    return Holder()


def make_mf_checkpoint(
    root,
    *,
    layout: str = "dp2mp2",
    balanced: bool = False,
    dtypes: Sequence[str] = DTYPES,
    iteration: int = 10,
    with_opt: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a MindFormers checkpoint under ``root`` with MindFormers' own code; return its full tensors.

    ``layout``: ``"dp2mp2"`` (Layout((2, 2), ("dp", "mp")), 4 ranks), ``"mp4"`` (Layout((4,),
    ("mp",)), 4 ranks) or ``"standalone"`` (1 rank, no metadata.json; ``balanced`` has no
    effect there, as in MindFormers).  Tensors: per dtype ``model.{tag}.{col,row,grid,bias}``
    and, with ``with_opt``, ``adam_m.model.{tag}.col``, ``adam_v.model.{tag}.row`` and
    ``global_step`` (standalone also a 0-d ``learning_rate``).  bf16 arrays are
    ``ml_dtypes.bfloat16``, bit-exact.
    """
    import mindformers.checkpoint.checkpoint as mf_ckpt
    import mindformers.checkpoint.metadata as mf_meta
    import mindformers.checkpoint.sharded_tensor as mf_st
    from mindformers.checkpoint.reshard import infer_slice_area_by_rank
    from mindspore.parallel import Layout

    specs = tensor_specs(layout, dtypes, with_opt)
    rng = np.random.default_rng(seed)
    full = {name: _random(shape, dt, rng) for name, (shape, dt, _) in specs.items()}
    model_names = [n for n in specs if n.startswith("model.")]
    world = 1 if layout == "standalone" else 4
    mesh = None if world == 1 else (Layout((2, 2), ("dp", "mp")) if layout == "dp2mp2" else Layout((4,), ("mp",)))
    layouts = {n: mesh(*tm) for n, (_, _, tm) in specs.items()} if mesh is not None else {}
    strategy = (
        {r: {n: [layouts[n], _ms_dtype(dt), shape] for n, (shape, dt, _) in specs.items()} for r in range(world)}
        if layouts
        else {}
    )

    def local(name: str, rank: int) -> np.ndarray:
        if world == 1:
            return full[name]
        d = layouts[name].to_dict()
        area = infer_slice_area_by_rank(d["device_matrix"], d["tensor_map"], rank, full[name].shape)
        return full[name][tuple(slice(a, b) for a, b in area)]

    common = mf_ckpt.CommonInfo(step_num=iteration, global_step=iteration, **COMMON)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mf_st, "get_strategy_metadata", lambda network: strategy)
        mp.setattr(mf_ckpt, "barrier_world", lambda *a, **k: None)
        mp.setattr(mf_meta, "get_group_size", lambda *a, **k: world)
        mp.setenv("RANK_SIZE", str(world))
        for rank in range(world):
            mp.setenv("RANK_ID", str(rank))
            net = _cell({n: _ms_tensor(local(n, rank)) for n in model_names})
            opt = _cell({n: _ms_tensor(local(n, rank)) for n in specs if n not in model_names}) if with_opt else None
            metas = None
            if world > 1:  # what the trainer's callback passes (core/callback/callback.py)
                keep = None if with_opt else (lambda x: x in model_names)
                metas = mf_st.get_all_sharded_tensor(net, keep)
            mf_ckpt.save_checkpoint(
                iteration=iteration,
                network=net,
                optimizer=opt,
                common_info=common,
                save_checkpoint_path=os.fspath(root),
                sharded_tensor_metas=metas,
                remove_redundancy=balanced,
            )
    return full


def _to_numpy(param, dtype: str) -> np.ndarray:
    """A Parameter's data, exactly; bf16 goes through fp32 (exact) and keeps the high 16 bits."""
    import mindspore as ms

    if dtype == "bfloat16":
        bits = param.astype(ms.float32).asnumpy().view(np.uint32) >> 16
        return bits.astype(np.uint16).view(ml_dtypes.bfloat16)
    return param.asnumpy()


def mf_load_standalone(path, specs: Mapping[str, tuple[Sequence[int], str]]) -> dict[str, np.ndarray]:
    """The oracle: MindFormers' own ``load_checkpoint(path, net, optimizer=opt)`` in one process.

    ``specs``: name -> (global shape, distckpt dtype).  Names MindFormers' optimizers use for
    state (``codecs.mindformers.is_optimizer_state``) go into the optimizer Cell, the rest into
    the network, as in a training job.  Parameters start as a sentinel pattern, so a tensor
    MindFormers skips cannot pass for loaded.  ``path``: a root (follows its tracker) or an
    iteration directory.
    """
    from mindformers.checkpoint.checkpoint import load_checkpoint

    from distckpt.codecs.mindformers import is_optimizer_state

    def sentinel(shape, dtype):
        a = (np.arange(int(np.prod(shape)), dtype=np.int64) % 97 - 48).reshape(tuple(shape))
        return _ms_tensor(a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype))

    model = {n: sentinel(s, d) for n, (s, d) in specs.items() if not is_optimizer_state(n)}
    state = {n: sentinel(s, d) for n, (s, d) in specs.items() if is_optimizer_state(n)}
    net, opt = _cell(model), _cell(state)
    load_checkpoint(os.fspath(path), net, optimizer=opt if state else None)
    out = {}
    for cell in (net, opt):
        for p in cell.get_parameters():
            out[p.name] = _to_numpy(p, specs[p.name][1])
    return out
