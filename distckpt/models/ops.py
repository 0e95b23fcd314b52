"""Fused-weight transforms between HuggingFace and MindFormers tensors, as index maps.

Every transform here is a pure index shuffle (no arithmetic), so any dtype, bf16
included, passes bit-exactly.  Each :class:`Op` ties one MindFormers tensor to the
HuggingFace tensors it is made of, and answers two questions without reading data:

* :meth:`Op.read_plan` (import): which boxes of which HF tensors fill a given box of
  the MF tensor, e.g. the slice of a fused ``linear_qkv`` one tensor-parallel rank holds;
* :meth:`Op.export_plan` (export): which boxes of the MF tensor fill a given box of
  one HF tensor.

A plan is a list of :class:`Piece`; executing it is
``out[piece.dst] = maybe_T(src[piece.src])``.  :meth:`Op.assemble` and
:meth:`Op.split` are those executors over whole in-memory arrays, so the full
transforms and the per-rank plans are one piece of code.

The kinds (``Op.kind``), all verified against MindFormers 1.9 (see docs/models.md):

* ``rename``: one HF tensor is the MF tensor.
* ``rows``: the MF tensor's rows are runs of the sources' rows, in order, with a
  row stride; covers QKV interleaved per KV group (Megatron, MindFormers' default),
  QKV contiguous ``[Q;K;V]``, gate/up contiguous ``[G;U]`` and gate/up interleaved
  per row ``[G0;U0;G1;U1;...]`` (MindFormers' default), for weights and 1-D biases.
* ``experts_fc1``: ``weight1[e*H + h, s*F + f] = (gate, up)[s][e][f, h]`` (E experts,
  H hidden, F expert FFN size): per expert ``[gate^T | up^T]``, always contiguous
  (MindFormers' grouped GEMM applies SwiGLU to the two column halves).
* ``experts_fc2``: ``weight2[e*F + f, h] = down[e][h, f]``.

Who calls what: :mod:`distckpt.models.maps` builds the ops of a model from the tensor
names and the model config; the HF source and the HF writer call the plans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, LayoutError
from ..layout import Box, full_box

__all__ = [
    "QKV_LAYOUTS",
    "FFN_LAYOUTS",
    "Piece",
    "Run",
    "Op",
    "rename_op",
    "qkv_op",
    "fc1_op",
    "experts_fc1_op",
    "experts_fc2_op",
]

QKV_LAYOUTS = ("interleaved", "contiguous")
"""``linear_qkv`` row orders: per KV group ``[Q_g; K_g; V_g]`` (default) or ``[Q; K; V]``."""
FFN_LAYOUTS = ("interleaved", "contiguous")
"""``linear_fc1`` row orders: ``[G0; U0; G1; U1; ...]`` (default) or ``[G; U]``."""

KINDS = ("rename", "rows", "experts_fc1", "experts_fc2")


def _check_layout(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise LayoutError(f"{what} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


@dataclass(frozen=True)
class Piece:
    """One copy of a plan: ``target[dst] = (src_array[src].T if transpose else src_array[src])``.

    ``src`` indexes the full source tensor named ``name``; ``dst`` indexes the requested
    target box (offsets relative to the box).  Import plans only use unit steps in
    ``src``; export plans of interleaved tensors step through the MF rows.
    """

    name: str
    src: tuple[slice, ...]
    dst: tuple[slice, ...]
    transpose: bool = False

    @property
    def src_box(self) -> Box:
        """The bounding box of ``src`` in the source tensor (what a reader fetches)."""
        return Box(tuple(s.start for s in self.src), tuple(s.stop - s.start for s in self.src))

    @property
    def unit_step(self) -> bool:
        return all(s.step in (None, 1) for s in self.src)

    @property
    def numel(self) -> int:
        """Elements the piece carries (``src_box.numel`` when ``unit_step``)."""
        return math.prod(len(range(s.start, s.stop, s.step or 1)) for s in self.src)

    def apply(self, src_array: np.ndarray, out: np.ndarray) -> None:
        """Copy the piece from the full source array into ``out`` (the target box)."""
        part = src_array[self.src]
        out[self.dst] = part.T if self.transpose else part

    def apply_box(self, box_array: np.ndarray, out: np.ndarray) -> None:
        """Like :meth:`apply` when ``box_array`` holds only ``src_box`` of the source."""
        local = tuple(slice(0, s.stop - s.start, s.step) for s in self.src)
        part = box_array[local]
        out[self.dst] = part.T if self.transpose else part


@dataclass(frozen=True)
class Run:
    """Rows ``[hf_row, hf_row + n)`` of source ``src`` are MF rows ``mf_row + step * i``."""

    src: int
    hf_row: int
    mf_row: int
    n: int
    step: int = 1


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _axis(lo: int, hi: int) -> slice:
    return slice(lo, hi, None)


@dataclass(frozen=True)
class Op:
    """One MF tensor and the HF tensors it is built from (see the module docstring).

    ``runs`` (kind ``rows``) lists the row runs; ``experts``/``hidden``/``ffn``
    (kinds ``experts_*``) give E, H and F.  Build ops with the ``*_op`` factories.
    """

    kind: str
    mf_name: str
    mf_shape: tuple[int, ...]
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    runs: tuple[Run, ...] = ()
    experts: int = 0
    hidden: int = 0
    ffn: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LayoutError(f"{self.mf_name}: unknown op kind {self.kind!r}")
        if len(self.hf_names) != len(self.hf_shapes) or not self.hf_names:
            raise LayoutError(f"{self.mf_name}: {len(self.hf_names)} HF names for {len(self.hf_shapes)} shapes")
        if len(set(self.hf_names)) != len(self.hf_names):
            raise LayoutError(f"{self.mf_name}: an HF tensor is named twice in {self.hf_names}")
        total = sum(math.prod(s) for s in self.hf_shapes)
        if total != math.prod(self.mf_shape):
            raise FormatError(
                f"{self.mf_name}: the HF tensors {dict(zip(self.hf_names, self.hf_shapes))} hold {total} elements,"
                f" the MindFormers tensor {self.mf_shape} holds {math.prod(self.mf_shape)}"
            )

    # -- plans ---------------------------------------------------------------

    def read_plan(self, box: Box | None = None) -> list[Piece]:
        """Pieces of HF tensors that fill ``box`` of the MF tensor (default: all of it).

        The pieces are disjoint, cover the box exactly, and read no byte outside it.
        """
        box = self._check_box(box, self.mf_shape, self.mf_name)
        if box.numel == 0:
            return []
        if self.kind == "rename":
            return [Piece(self.hf_names[0], _slices(box), _zero_slices(box))]
        if self.kind == "rows":
            return self._rows_import(box)
        if self.kind == "experts_fc1":
            return self._fc1_experts_import(box)
        return self._fc2_experts_import(box)

    def export_plan(self, hf_name: str, box: Box | None = None) -> list[Piece]:
        """Pieces of the MF tensor that fill ``box`` of the HF tensor ``hf_name`` (default: all)."""
        try:
            idx = self.hf_names.index(hf_name)
        except ValueError:
            raise LayoutError(f"{hf_name} is not one of the HF tensors of {self.mf_name}: {self.hf_names}") from None
        box = self._check_box(box, self.hf_shapes[idx], hf_name)
        if box.numel == 0:
            return []
        if self.kind == "rename":
            return [Piece(self.mf_name, _slices(box), _zero_slices(box))]
        if self.kind == "rows":
            return self._rows_export(idx, box)
        return self._experts_export(idx, box)

    # -- whole-tensor executors ---------------------------------------------

    def assemble(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The MF tensor from the full HF tensors (in ``hf_names`` order)."""
        arrays = self._check_arrays(arrays, self.hf_names, self.hf_shapes)
        out = np.empty(self.mf_shape, dtype=arrays[0].dtype)
        for piece in self.read_plan():
            piece.apply(arrays[self.hf_names.index(piece.name)], out)
        return out

    def split(self, array: np.ndarray) -> list[np.ndarray]:
        """The HF tensors (in ``hf_names`` order) from the full MF tensor."""
        (array,) = self._check_arrays([array], (self.mf_name,), (self.mf_shape,))
        outs = []
        for name, shape in zip(self.hf_names, self.hf_shapes):
            out = np.empty(shape, dtype=array.dtype)
            for piece in self.export_plan(name):
                piece.apply(array, out)
            outs.append(out)
        return outs

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def _check_box(box: Box | None, shape: tuple[int, ...], name: str) -> Box:
        whole = full_box(shape)
        if box is None:
            return whole
        if box.ndim != len(shape) or not whole.contains(box):
            raise LayoutError(f"{name}: box {box.offsets}+{box.sizes} does not lie inside shape {shape}")
        return box

    @staticmethod
    def _check_arrays(arrays, names, shapes) -> list[np.ndarray]:
        arrays = [np.asarray(a) for a in arrays]
        if len(arrays) != len(names):
            raise FormatError(f"expected {len(names)} tensors {names}, got {len(arrays)}")
        for a, n, s in zip(arrays, names, shapes):
            if tuple(a.shape) != tuple(s):
                raise FormatError(f"{n}: shape {tuple(a.shape)} does not fit the model map, which expects {s}")
            if a.dtype != arrays[0].dtype:
                raise FormatError(f"{n}: dtype {a.dtype} differs from {names[0]}'s {arrays[0].dtype}; cannot fuse")
        return arrays

    def _rows_import(self, box: Box) -> list[Piece]:
        a, b = box.offsets[0], box.ends[0]
        rest_src = tuple(_axis(o, e) for o, e in zip(box.offsets[1:], box.ends[1:]))
        rest_dst = tuple(_axis(0, s) for s in box.sizes[1:])
        pieces = []
        for run in self.runs:
            lo = min(max(_ceil_div(a - run.mf_row, run.step), 0), run.n)
            hi = min(max(_ceil_div(b - run.mf_row, run.step), 0), run.n)
            if lo >= hi:
                continue
            first = run.mf_row + run.step * lo - a
            last = run.mf_row + run.step * (hi - 1) - a
            dst0 = slice(first, last + 1, None if run.step == 1 else run.step)
            src0 = _axis(run.hf_row + lo, run.hf_row + hi)
            pieces.append(Piece(self.hf_names[run.src], (src0, *rest_src), (dst0, *rest_dst)))
        return pieces

    def _rows_export(self, idx: int, box: Box) -> list[Piece]:
        a, b = box.offsets[0], box.ends[0]
        rest_src = tuple(_axis(o, e) for o, e in zip(box.offsets[1:], box.ends[1:]))
        rest_dst = tuple(_axis(0, s) for s in box.sizes[1:])
        pieces = []
        for run in self.runs:
            if run.src != idx:
                continue
            lo, hi = max(a, run.hf_row), min(b, run.hf_row + run.n)
            if lo >= hi:
                continue
            m0 = run.mf_row + run.step * (lo - run.hf_row)
            m1 = run.mf_row + run.step * (hi - 1 - run.hf_row) + 1
            src0 = slice(m0, m1, None if run.step == 1 else run.step)
            pieces.append(Piece(self.mf_name, (src0, *rest_src), (_axis(lo - a, hi - a), *rest_dst)))
        return pieces

    def _fc1_experts_import(self, box: Box) -> list[Piece]:
        (r0, c0), (r1, c1) = box.offsets, box.ends
        H, F = self.hidden, self.ffn
        pieces = []
        for e in range(r0 // H, _ceil_div(r1, H)):
            h0, h1 = max(r0, e * H) - e * H, min(r1, (e + 1) * H) - e * H
            for s in (0, 1):  # gate, up
                f0, f1 = max(c0, s * F) - s * F, min(c1, (s + 1) * F) - s * F
                if f0 >= f1:
                    continue
                dst = (_axis(e * H + h0 - r0, e * H + h1 - r0), _axis(s * F + f0 - c0, s * F + f1 - c0))
                pieces.append(Piece(self.hf_names[2 * e + s], (_axis(f0, f1), _axis(h0, h1)), dst, True))
        return pieces

    def _fc2_experts_import(self, box: Box) -> list[Piece]:
        (r0, c0), (r1, c1) = box.offsets, box.ends
        F = self.ffn
        pieces = []
        for e in range(r0 // F, _ceil_div(r1, F)):
            f0, f1 = max(r0, e * F) - e * F, min(r1, (e + 1) * F) - e * F
            dst = (_axis(e * F + f0 - r0, e * F + f1 - r0), _axis(0, c1 - c0))
            pieces.append(Piece(self.hf_names[e], (_axis(c0, c1), _axis(f0, f1)), dst, True))
        return pieces

    def _experts_export(self, idx: int, box: Box) -> list[Piece]:
        # The HF box is rows [r0, r1) x cols [c0, c1); the MF block holds it transposed.
        (r0, c0), (r1, c1) = box.offsets, box.ends
        if self.kind == "experts_fc1":  # gate/up (F, H): MF rows e*H + h, cols s*F + f
            e, s = divmod(idx, 2)
            H, F = self.hidden, self.ffn
            src = (_axis(e * H + c0, e * H + c1), _axis(s * F + r0, s * F + r1))
        else:  # down (H, F): MF rows e*F + f, cols h
            e, F = idx, self.ffn
            src = (_axis(e * F + c0, e * F + c1), _axis(r0, r1))
        return [Piece(self.mf_name, src, _zero_slices(box), True)]


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(_axis(o, e) for o, e in zip(box.offsets, box.ends))


def _zero_slices(box: Box) -> tuple[slice, ...]:
    return tuple(_axis(0, s) for s in box.sizes)


# -- factories -----------------------------------------------------------------


def rename_op(mf_name: str, hf_name: str, shape: Sequence[int]) -> Op:
    shape = tuple(int(s) for s in shape)
    return Op("rename", mf_name, shape, (hf_name,), (shape,))


def _rows_shapes(names: Sequence[str], shapes: Sequence[Sequence[int]], mf_name: str) -> list[tuple[int, ...]]:
    out = [tuple(int(x) for x in s) for s in shapes]
    tail = out[0][1:]
    for n, s in zip(names, out):
        if len(s) not in (1, 2) or s[1:] != tail:
            raise FormatError(f"{n}: shape {s} cannot be fused into {mf_name} with {dict(zip(names, out))}")
    return out


def qkv_op(
    mf_name: str,
    hf_names: Sequence[str],
    shapes: Sequence[Sequence[int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    layout: str = "interleaved",
) -> Op:
    """``linear_qkv`` (weight or bias) from q, k, v; ``layout`` is one of :data:`QKV_LAYOUTS`."""
    _check_layout(layout, QKV_LAYOUTS, "qkv_layout")
    shapes = _rows_shapes(hf_names, shapes, mf_name)
    want = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
    for n, s, w in zip(hf_names, shapes, want):
        if s[0] != w:
            raise FormatError(
                f"{n}: shape {s} does not fit the model map: expected {w} rows"
                f" ({num_heads} heads, {num_kv_heads} KV heads, head_dim {head_dim})"
            )
    if num_heads % num_kv_heads:
        raise LayoutError(f"{mf_name}: {num_heads} heads are not a multiple of {num_kv_heads} KV heads")
    rep, d = num_heads // num_kv_heads, head_dim
    runs: tuple[Run, ...]
    if layout == "contiguous":
        runs = (Run(0, 0, 0, want[0]), Run(1, 0, want[0], want[1]), Run(2, 0, want[0] + want[1], want[2]))
    else:
        group = (rep + 2) * d
        runs = tuple(
            r
            for g in range(num_kv_heads)
            for r in (
                Run(0, g * rep * d, g * group, rep * d),
                Run(1, g * d, g * group + rep * d, d),
                Run(2, g * d, g * group + (rep + 1) * d, d),
            )
        )
    mf_shape = (sum(want), *shapes[0][1:])
    return Op("rows", mf_name, mf_shape, tuple(hf_names), tuple(shapes), runs)


def fc1_op(mf_name: str, hf_names: Sequence[str], shapes: Sequence[Sequence[int]], *, layout: str = "interleaved") -> Op:
    """``linear_fc1`` (weight or bias) from gate and up; ``layout`` is one of :data:`FFN_LAYOUTS`."""
    _check_layout(layout, FFN_LAYOUTS, "ffn_layout")
    shapes = _rows_shapes(hf_names, shapes, mf_name)
    if len(shapes) != 2 or shapes[0] != shapes[1]:
        raise FormatError(f"{mf_name}: gate and up must have one shape, got {dict(zip(hf_names, shapes))}")
    f = shapes[0][0]
    if layout == "contiguous":
        runs = (Run(0, 0, 0, f), Run(1, 0, f, f))
    else:
        runs = (Run(0, 0, 0, f, 2), Run(1, 0, 1, f, 2))
    return Op("rows", mf_name, (2 * f, *shapes[0][1:]), tuple(hf_names), tuple(shapes), runs)


def _expert_shapes(mf_name, hf_names, shapes, num_experts, per_expert, want_shape) -> tuple[tuple[int, ...], ...]:
    shapes = tuple(tuple(int(x) for x in s) for s in shapes)
    if len(hf_names) != num_experts * per_expert:
        raise FormatError(f"{mf_name}: needs {num_experts * per_expert} expert tensors, got {len(hf_names)}")
    for n, s in zip(hf_names, shapes):
        if s != want_shape:
            raise FormatError(f"{n}: shape {s} does not fit the model map: expected {want_shape}")
    return shapes


def experts_fc1_op(
    mf_name: str, hf_names: Sequence[str], shapes: Sequence[Sequence[int]], *, num_experts: int
) -> Op:
    """``experts.weight1`` (E*H, 2F) from ``[gate_0, up_0, gate_1, up_1, ...]``, each (F, H)."""
    first = tuple(int(x) for x in shapes[0]) if shapes else ()
    if len(first) != 2:
        raise FormatError(f"{mf_name}: expert tensors must be 2-D, got {first}")
    f, h = first
    shapes = _expert_shapes(mf_name, hf_names, shapes, num_experts, 2, (f, h))
    return Op("experts_fc1", mf_name, (num_experts * h, 2 * f), tuple(hf_names), shapes,
              experts=num_experts, hidden=h, ffn=f)


def experts_fc2_op(
    mf_name: str, hf_names: Sequence[str], shapes: Sequence[Sequence[int]], *, num_experts: int
) -> Op:
    """``experts.weight2`` (E*F, H) from ``[down_0, down_1, ...]``, each (H, F)."""
    first = tuple(int(x) for x in shapes[0]) if shapes else ()
    if len(first) != 2:
        raise FormatError(f"{mf_name}: expert tensors must be 2-D, got {first}")
    h, f = first
    shapes = _expert_shapes(mf_name, hf_names, shapes, num_experts, 1, (h, f))
    return Op("experts_fc2", mf_name, (num_experts * f, h), tuple(hf_names), shapes,
              experts=num_experts, hidden=h, ffn=f)
