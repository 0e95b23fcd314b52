"""MindSpore parallel strategy files in and out (DESIGN §2.2).

Three on-disk forms are read, detected from the content (never the file name):

* protobuf ``mindspore.straspb.ParallelStrategyMap`` — what MindSpore /
  MindFormers write per rank (``ckpt_strategy_rank_{r}.ckpt``), and what
  ``mindspore.merge_pipeline_strategys`` writes for a whole pipeline, with
  parameter names prefixed ``"{stage}-"``;
* MindSpore's JSON form (top level ``current_stage``,
  ``parallel_strategy_item``, ``parallel_layout_item``);
* distckpt's own JSON form (``{"format": "distckpt-strategy", "version": 1,
  ...}``, see :func:`strategy_to_json`), embedded in distckpt indexes.

How MindSpore's readers interpret a ``ParallelLayouts`` message
(``mindspore/parallel/_parallel_serialization.py: _convert_to_list``), and
hence how this module does:

* only the **first** ``DevMatrix`` counts; later ones are ignored (MindSpore's
  C++ writer only ever writes one);
* **one** ``TensorMap`` is a plain map (one int per tensor dim); **several**
  ``TensorMap`` messages are a nested map, one message per tensor dim, each a
  list of device axes, and *empty* ``TensorMap`` messages are dropped.  (The C++
  writer appends an empty one when a nested map has a single dim, so that it
  still counts as "several".)  The writers here do the same;
* a merged pipeline file's names are ``"{stage}-{name}"``.  MindSpore splits
  them with ``split("-")``, which breaks on names that contain ``-``; here the
  prefix is the leading run of decimal digits up to the **first** ``-``;
* ``param_split_shape`` / ``indices_offset`` describe an uneven manual split
  (field split of embeddings).  Every ``ParallelLayouts`` carries one (usually
  empty) entry of each; a non-empty one cannot be represented by
  :class:`~distckpt.layout.TensorLayout` and is rejected with a
  :class:`~distckpt.errors.StrategyError` rather than silently mis-sliced;
* missing scalar fields read as 0, as in MindSpore (its protobuf runtime does
  not enforce ``required``).

The stage of a single-stage file is ``parallel_strategy_item[0].parallel_strategys.stage``
(where ``merge_pipeline_strategys`` looks), or ``current_stage`` when the file
has no strategy item.  ``num_stages`` of a parsed file is its largest stage + 1.

Everything here is pure: bytes in, :class:`~distckpt.layout.Strategy` out, and
back.  Reading and writing strategy files (paths, URLs, directories of
per-stage files) is :mod:`distckpt.strategy`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .. import jsonutil
from ..errors import FormatError, LayoutError, StrategyError
from ..layout import ParamSpec, Strategy, TensorLayout
from . import proto as pb

__all__ = [
    "MAX_STRATEGY_BYTES",
    "parse_strategy",
    "strategy_to_json",
    "strategy_from_json",
    "dump_strategy_proto",
    "dump_merged_strategy_proto",
    "dump_strategy_json",
    "dump_merged_strategy_json",
    "merge_strategies",
    "strategy_from_obj",
]

#: Strategy files larger than this are refused before being read.
MAX_STRATEGY_BYTES = 1 << 30

FORMAT_NAME = "distckpt-strategy"
FORMAT_VERSION = 1

_STAGE_PREFIX = re.compile(r"([0-9]{1,9})-(.*)\Z", re.DOTALL)  # bounded: int() of huge digit runs raises

# ParallelStrategyMap / ParallelStrategyItem / ParallelStrategys / ParallelLayoutItem / ParallelLayouts
_MAP_CURRENT_STAGE, _MAP_STRATEGY_ITEM, _MAP_LAYOUT_ITEM = 1, 2, 3
_ITEM_NODE_NAME, _ITEM_STRATEGYS = 1, 2
_STRATEGYS_STAGE = 1
_LITEM_NAME, _LITEM_LAYOUTS = 1, 2
_L_DEV_MATRIX, _L_TENSOR_MAP, _L_SPLIT_SHAPE, _L_INDICES_OFFSET = 1, 2, 3, 4
_L_FIELD, _L_OPT_STEP, _L_OPT_SIZE = 5, 6, 7
_DIM = 1  # DevMatrix / TensorMap / ParamSplitShape / IndicesOffset .dim


def _node_name(stage: int) -> str:
    return f"distckpt/stage{stage}"


# ------------------------------------------------------------------ raw records


class _RawLayout:
    """One ``ParallelLayouts`` / JSON layout before validation."""

    __slots__ = ("dev_matrix", "tensor_map", "field", "step", "size", "shape", "manual_split")

    def __init__(self, dev_matrix, tensor_map, field=0, step=0, size=0, shape=None, manual_split=False):
        self.dev_matrix = dev_matrix
        self.tensor_map = tensor_map
        self.field = field
        self.step = step
        self.size = size
        self.shape = shape
        self.manual_split = manual_split


def _build(
    name: str,
    current_stage: int,
    item_stages: list[int],
    layouts: list[tuple[str, _RawLayout]],
) -> Strategy:
    """Turn decoded records into a Strategy, detecting the merged-pipeline form."""
    merged = False
    if layouts:
        prefixes = [_STAGE_PREFIX.match(pname) for pname, _ in layouts]
        if all(prefixes):
            stages_named = {int(m.group(1)) for m in prefixes}  # type: ignore[union-attr]
            merged = not item_stages or stages_named <= set(item_stages)
    file_stage = item_stages[0] if item_stages else current_stage
    specs: dict[str, ParamSpec] = {}
    for pname, raw in layouts:
        stage = file_stage
        if merged:
            m = _STAGE_PREFIX.match(pname)
            stage, pname = int(m.group(1)), m.group(2)  # type: ignore[union-attr]
        if not pname:
            raise StrategyError(f"{name}: a layout item has an empty parameter name")
        if raw.manual_split:
            raise StrategyError(
                f"{name}: parameter {pname!r} has a manual (uneven) split in param_split_shape / indices_offset, "
                "which distckpt does not support"
            )
        try:
            layout = TensorLayout(raw.dev_matrix, raw.tensor_map, raw.step, raw.size)
            spec = ParamSpec(pname, layout, (stage,), raw.shape, raw.field)
        except (StrategyError, LayoutError) as exc:
            raise StrategyError(f"{name}: parameter {pname!r}: {exc}") from exc
        old = specs.get(pname)
        specs[pname] = spec if old is None else _merge_spec(old, spec, name)
    return _make_strategy(specs, name)


def _merge_spec(old: ParamSpec, new: ParamSpec, name: str) -> ParamSpec:
    if old.layout != new.layout or old.field != new.field:
        raise StrategyError(
            f"{name}: parameter {old.name!r} has different layouts in stages {list(old.stages)} "
            f"({old.layout.to_json()}, field {old.field}) and {list(new.stages)} "
            f"({new.layout.to_json()}, field {new.field}); distckpt needs one layout per parameter"
        )
    if old.shape is not None and new.shape is not None and old.shape != new.shape:
        raise StrategyError(
            f"{name}: parameter {old.name!r} has tensor_shape {list(old.shape)} in stages {list(old.stages)} "
            f"but {list(new.shape)} in stages {list(new.stages)}"
        )
    return ParamSpec(
        old.name,
        old.layout,
        old.stages + new.stages,
        old.shape if old.shape is not None else new.shape,
        old.field,
    )


def _make_strategy(
    specs: Mapping[str, ParamSpec], name: str, num_stages: int | None = None, stage_device_num: int = 0
) -> Strategy:
    if num_stages is None:
        num_stages = max((s for p in specs.values() for s in p.stages), default=0) + 1
    try:
        return Strategy(dict(specs), num_stages, stage_device_num)
    except (StrategyError, LayoutError) as exc:
        raise StrategyError(f"{name}: {exc}") from exc


# ------------------------------------------------------------------ protobuf


def _ints_field(wt: int, value, where: str, conv) -> list[int]:
    return [conv(v) for v in pb.repeated_ints(wt, value, where)]


def _dims(buf: memoryview, where: str, conv) -> list[int]:
    out: list[int] = []
    for fn, wt, value in pb.iter_fields(buf, where=where):
        if fn == _DIM:
            out.extend(_ints_field(wt, value, where, conv))
    return out


def _expect_len(fn: int, wt: int, value, where: str, what: str) -> memoryview:
    if wt != pb.LEN:
        raise FormatError(f"{where}: malformed protobuf: {what} (field {fn}) has wire type {wt}, expected 2")
    return value


def _expect_varint(fn: int, wt: int, value, where: str, what: str) -> int:
    if wt != pb.VARINT:
        raise FormatError(f"{where}: malformed protobuf: {what} (field {fn}) has wire type {wt}, expected 0")
    return value


def _decode_layouts(buf: bytes | memoryview, where: str) -> _RawLayout:
    dev_matrices: list[list[int]] = []
    tensor_maps: list[list[int]] = []
    manual = False
    field = step = size = 0
    for fn, wt, value in pb.iter_fields(buf, where=where):
        if fn == _L_DEV_MATRIX:
            dev_matrices.append(_dims(_expect_len(fn, wt, value, where, "dev_matrix"), where, pb.as_uint32))
        elif fn == _L_TENSOR_MAP:
            tensor_maps.append(_dims(_expect_len(fn, wt, value, where, "tensor_map"), where, pb.as_int32))
        elif fn in (_L_SPLIT_SHAPE, _L_INDICES_OFFSET):
            what = "param_split_shape" if fn == _L_SPLIT_SHAPE else "indices_offset"
            if _dims(_expect_len(fn, wt, value, where, what), where, pb.as_int64):
                manual = True
        elif fn == _L_FIELD:
            field = pb.as_int32(_expect_varint(fn, wt, value, where, "field"))
        elif fn == _L_OPT_STEP:
            step = pb.as_int32(_expect_varint(fn, wt, value, where, "opt_weight_shard_step"))
        elif fn == _L_OPT_SIZE:
            size = pb.as_int32(_expect_varint(fn, wt, value, where, "opt_weight_shard_size"))
    if not dev_matrices:
        raise FormatError(f"{where}: no dev_matrix")
    if not tensor_maps:
        raise FormatError(f"{where}: no tensor_map")
    if len(tensor_maps) > 1:  # nested map, empty TensorMaps dropped (MindSpore _convert_to_list)
        tensor_map: list = [tm for tm in tensor_maps if tm]
    else:
        tensor_map = tensor_maps[0]
    return _RawLayout(dev_matrices[0], tensor_map, field, step, size, None, manual)


def _parse_proto(data: bytes | memoryview, name: str) -> Strategy:
    mv = memoryview(data)
    current_stage = 0
    item_stages: list[int] = []
    layouts: list[tuple[str, _RawLayout]] = []
    for fn, wt, value in pb.iter_fields(mv, where=name):
        if fn == _MAP_CURRENT_STAGE:
            current_stage = pb.as_uint32(_expect_varint(fn, wt, value, name, "current_stage"))
        elif fn == _MAP_STRATEGY_ITEM:
            item = _expect_len(fn, wt, value, name, "parallel_strategy_item")
            where = f"{name}: parallel_strategy_item {len(item_stages)}"
            node_name = None
            parts: list[bytes] = []
            for ifn, iwt, ivalue in pb.iter_fields(item, where=where):
                if ifn == _ITEM_NODE_NAME:
                    node_name = pb.as_str(ivalue, where, "node_name")
                elif ifn == _ITEM_STRATEGYS:
                    parts.append(bytes(_expect_len(ifn, iwt, ivalue, where, "parallel_strategys")))
            if node_name is not None:
                where = f"{name}: parallel_strategy_item {node_name!r}"
            stage = 0
            for sfn, swt, svalue in pb.iter_fields(b"".join(parts), where=where):
                if sfn == _STRATEGYS_STAGE:
                    stage = pb.as_uint32(_expect_varint(sfn, swt, svalue, where, "stage"))
            item_stages.append(stage)
        elif fn == _MAP_LAYOUT_ITEM:
            item = _expect_len(fn, wt, value, name, "parallel_layout_item")
            where = f"{name}: parallel_layout_item {len(layouts)}"
            pname = None
            parts = []
            for ifn, iwt, ivalue in pb.iter_fields(item, where=where):
                if ifn == _LITEM_NAME:
                    pname = pb.as_str(ivalue, where, "param_name")
                elif ifn == _LITEM_LAYOUTS:
                    parts.append(bytes(_expect_len(ifn, iwt, ivalue, where, "parallel_layouts")))
            if pname is None:
                raise FormatError(f"{where}: missing param_name")
            if not parts:
                raise FormatError(f"{name}: parameter {pname!r}: missing parallel_layouts")
            # a repeated singular message merges like its concatenation (protobuf semantics)
            layouts.append((pname, _decode_layouts(b"".join(parts), f"{name}: parameter {pname!r}")))
    return _build(name, current_stage, item_stages, layouts)


def _enc_dims(values: Iterable[int]) -> bytes:
    return pb.field_repeated(_DIM, values)


def _enc_layouts(layout: TensorLayout, field: int) -> bytes:
    out = [pb.field_len(_L_DEV_MATRIX, _enc_dims(layout.dev_matrix))]
    tm = layout.tensor_map
    if all(len(axes) <= 1 for axes in tm):
        out.append(pb.field_len(_L_TENSOR_MAP, _enc_dims(axes[0] if axes else -1 for axes in tm)))
    else:  # nested: one TensorMap per dim, plus an empty one if there is a single dim (as MindSpore's C++ does)
        out.extend(pb.field_len(_L_TENSOR_MAP, _enc_dims(axes if axes else (-1,))) for axes in tm)
        if len(tm) == 1:
            out.append(pb.field_len(_L_TENSOR_MAP, b""))
    out.append(pb.field_len(_L_SPLIT_SHAPE, b""))
    out.append(pb.field_len(_L_INDICES_OFFSET, b""))
    out.append(pb.field_varint(_L_FIELD, field))
    out.append(pb.field_varint(_L_OPT_STEP, layout.opt_shard_step))
    out.append(pb.field_varint(_L_OPT_SIZE, layout.opt_shard_size))
    return b"".join(out)


def _enc_strategy_item(stage: int) -> bytes:
    strategys = pb.field_varint(_STRATEGYS_STAGE, stage)
    body = pb.field_len(_ITEM_NODE_NAME, _node_name(stage)) + pb.field_len(_ITEM_STRATEGYS, strategys)
    return pb.field_len(_MAP_STRATEGY_ITEM, body)


def _enc_layout_item(name: str, spec: ParamSpec) -> bytes:
    body = pb.field_len(_LITEM_NAME, name) + pb.field_len(_LITEM_LAYOUTS, _enc_layouts(spec.layout, spec.field))
    return pb.field_len(_MAP_LAYOUT_ITEM, body)


def _check_stage(strategy: Strategy, stage: int | None, what: str) -> int:
    if stage is None:
        if strategy.num_stages > 1:
            raise StrategyError(
                f"{what}: the strategy has {strategy.num_stages} pipeline stages; pass stage=... for one stage's "
                "file, or use the merged form"
            )
        return 0
    if not isinstance(stage, int) or not 0 <= stage < strategy.num_stages:
        raise StrategyError(f"{what}: stage {stage!r} outside 0..{strategy.num_stages - 1}")
    return stage


def _stage_params(strategy: Strategy, stage: int, what: str) -> list[ParamSpec]:
    specs = [p for p in strategy.params.values() if stage in p.stages]
    prefix = f"{stage}-"
    if specs and all(p.name.startswith(prefix) and _STAGE_PREFIX.match(p.name) for p in specs):
        raise StrategyError(
            f"{what}: every parameter name of stage {stage} starts with {prefix!r}; the file would read back as a "
            "merged pipeline file"
        )
    return specs


def dump_strategy_proto(strategy: Strategy, *, stage: int | None = None) -> bytes:
    """One stage's strategy file as MindSpore writes it (protobuf ``ParallelStrategyMap``).

    ``stage`` may be omitted for a single-stage strategy.  The file has
    ``current_stage = stage``, one ``parallel_strategy_item`` carrying the
    stage (node name ``distckpt/stage{stage}``), and one layout item per
    parameter of the stage, each with the empty ``param_split_shape`` and
    ``indices_offset`` entries MindSpore's readers index.  Tensor shapes are not
    part of this format and are lost.
    """
    stage = _check_stage(strategy, stage, "dump_strategy_proto")
    specs = _stage_params(strategy, stage, "dump_strategy_proto")
    parts = [pb.field_varint(_MAP_CURRENT_STAGE, stage), _enc_strategy_item(stage)]
    parts.extend(_enc_layout_item(p.name, p) for p in specs)
    return b"".join(parts)


def dump_merged_strategy_proto(strategy: Strategy) -> bytes:
    """The whole pipeline in one file, as ``mindspore.merge_pipeline_strategys`` writes it.

    ``current_stage = 1`` (what MindSpore writes), one strategy item per stage,
    then every stage's layouts with names prefixed ``"{stage}-"``; parameters
    shared by several stages appear once per stage.
    """
    parts = [pb.field_varint(_MAP_CURRENT_STAGE, 1)]
    parts.extend(_enc_strategy_item(s) for s in range(strategy.num_stages))
    for s in range(strategy.num_stages):
        parts.extend(_enc_layout_item(f"{s}-{p.name}", p) for p in strategy.params.values() if s in p.stages)
    return b"".join(parts)


# ------------------------------------------------------------------ JSON


def _json_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StrategyError(f"{what} must be an integer, got {value!r}")
    return value


def _json_int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list):
        raise StrategyError(f"{what} must be a list of integers, got {value!r}")
    return [_json_int(v, what) for v in value]


def _json_tensor_map(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise StrategyError(f"{what} must be a list, got {value!r}")
    return [_json_int_list(v, what) if isinstance(v, list) else _json_int(v, what) for v in value]


def _json_dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise StrategyError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parse_ms_json(obj: dict, name: str) -> Strategy:
    current_stage = _json_int(obj.get("current_stage", 0), f"{name}: current_stage")
    items = obj.get("parallel_strategy_item") or {}
    items = _json_dict(items, f"{name}: parallel_strategy_item")
    item_stages = []
    for node, item in items.items():
        item = _json_dict(item, f"{name}: parallel_strategy_item {node!r}")
        item_stages.append(_json_int(item.get("stage", 0), f"{name}: parallel_strategy_item {node!r}: stage"))
    layouts = []
    for pname, item in _json_dict(obj["parallel_layout_item"], f"{name}: parallel_layout_item").items():
        where = f"{name}: parameter {pname!r}"
        item = _json_dict(item, where)
        for key in ("dev_matrix", "tensor_map"):
            if key not in item:
                raise StrategyError(f"{where}: missing {key!r}")
        shape = item.get("tensor_shape")
        manual = bool(item.get("param_split_shape")) or bool(item.get("indices_offset"))
        layouts.append(
            (
                pname,
                _RawLayout(
                    _json_int_list(item["dev_matrix"], f"{where}: dev_matrix"),
                    _json_tensor_map(item["tensor_map"], f"{where}: tensor_map"),
                    _json_int(item.get("field", 0), f"{where}: field"),
                    _json_int(item.get("opt_weight_shard_step", 0), f"{where}: opt_weight_shard_step"),
                    _json_int(item.get("opt_weight_shard_size", 0), f"{where}: opt_weight_shard_size"),
                    None if shape is None else _json_int_list(shape, f"{where}: tensor_shape"),
                    manual,
                ),
            )
        )
    return _build(name, current_stage, item_stages, layouts)


def _ms_json_layout(spec: ParamSpec) -> dict:
    d: dict[str, Any] = {"dev_matrix": list(spec.layout.dev_matrix), "tensor_map": spec.layout.json_tensor_map()}
    if spec.shape is not None:
        d["tensor_shape"] = list(spec.shape)
    d["field"] = spec.field
    d["opt_weight_shard_step"] = spec.layout.opt_shard_step
    d["opt_weight_shard_size"] = spec.layout.opt_shard_size
    return d


def _ms_json_item(stage: int) -> dict:
    return {_node_name(stage): {"stage": stage, "parallel_strategy": []}}


def dump_strategy_json(strategy: Strategy, *, stage: int | None = None) -> dict:
    """One stage's strategy in MindSpore's JSON form (write it to a file ending ``.json``).

    ``tensor_shape`` is written when known.  A nested tensor_map is written as
    nested lists (MindSpore's own Python JSON reader only takes flat maps).
    """
    stage = _check_stage(strategy, stage, "dump_strategy_json")
    specs = _stage_params(strategy, stage, "dump_strategy_json")
    return {
        "current_stage": stage,
        "parallel_strategy_item": _ms_json_item(stage),
        "parallel_layout_item": {p.name: _ms_json_layout(p) for p in specs},
    }


def dump_merged_strategy_json(strategy: Strategy) -> dict:
    """The whole pipeline as one MindSpore JSON, names prefixed ``"{stage}-"`` (like ``_merge_json_strategy``)."""
    items: dict = {}
    for s in range(strategy.num_stages):
        items.update(_ms_json_item(s))
    layouts = {
        f"{s}-{p.name}": _ms_json_layout(p)
        for s in range(strategy.num_stages)
        for p in strategy.params.values()
        if s in p.stages
    }
    return {"current_stage": 1, "parallel_strategy_item": items, "parallel_layout_item": layouts}


def strategy_to_json(strategy: Strategy) -> dict:
    """distckpt's own JSON form of a strategy (what a distckpt index embeds)."""
    params = {}
    for p in strategy.params.values():
        params[p.name] = {
            **p.layout.to_json(),
            "stages": list(p.stages),
            "tensor_shape": None if p.shape is None else list(p.shape),
            "field": p.field,
        }
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_stages": strategy.num_stages,
        "stage_device_num": strategy.stage_device_num,
        "params": params,
    }


def strategy_from_json(obj: Mapping, *, name: str = "<strategy>") -> Strategy:
    """Inverse of :func:`strategy_to_json`; raises StrategyError naming ``name`` on anything malformed."""
    obj = _json_dict(obj, name)
    if obj.get("format") != FORMAT_NAME:
        raise StrategyError(f"{name}: not a {FORMAT_NAME} JSON (format is {obj.get('format')!r})")
    version = obj.get("version")
    if version != FORMAT_VERSION:
        raise StrategyError(
            f"{name}: {FORMAT_NAME} version {version!r} is not supported (this distckpt reads "
            f"version {FORMAT_VERSION}; upgrade distckpt for newer files)"
        )
    specs: dict[str, ParamSpec] = {}
    for pname, d in _json_dict(obj.get("params", {}), f"{name}: params").items():
        where = f"{name}: parameter {pname!r}"
        d = _json_dict(d, where)
        for key in ("dev_matrix", "tensor_map", "stages"):
            if key not in d:
                raise StrategyError(f"{where}: missing {key!r}")
        shape = d.get("tensor_shape")
        try:
            layout = TensorLayout(
                tuple(_json_int_list(d["dev_matrix"], f"{where}: dev_matrix")),
                tuple(_json_tensor_map(d["tensor_map"], f"{where}: tensor_map")),
                _json_int(d.get("opt_weight_shard_step", 0), f"{where}: opt_weight_shard_step"),
                _json_int(d.get("opt_weight_shard_size", 0), f"{where}: opt_weight_shard_size"),
            )
            specs[pname] = ParamSpec(
                pname,
                layout,
                tuple(_json_int_list(d["stages"], f"{where}: stages")),
                None if shape is None else tuple(_json_int_list(shape, f"{where}: tensor_shape")),
                _json_int(d.get("field", 0), f"{where}: field"),
            )
        except LayoutError as exc:
            raise StrategyError(f"{where}: {exc}") from exc
        except StrategyError as exc:
            if str(exc).startswith(where):
                raise
            raise StrategyError(f"{where}: {exc}") from exc
    num_stages = obj.get("num_stages")
    if num_stages is not None:
        num_stages = _json_int(num_stages, f"{name}: num_stages")
        if num_stages < 1:
            raise StrategyError(f"{name}: num_stages must be >= 1, got {num_stages}")
    sdn = _json_int(obj.get("stage_device_num", 0), f"{name}: stage_device_num")
    if sdn < 0:
        raise StrategyError(f"{name}: stage_device_num must be >= 0, got {sdn}")
    return _make_strategy(specs, name, num_stages, sdn)


def strategy_from_obj(obj: Any, *, name: str = "<strategy>") -> Strategy:
    """A Strategy from a parsed JSON object in either form (distckpt's, or MindSpore's JSON strategy)."""
    return _from_json_obj(obj, name)


def _from_json_obj(obj: Any, name: str) -> Strategy:
    obj = _json_dict(obj, name)
    if "format" in obj:
        return strategy_from_json(obj, name=name)
    if "parallel_layout_item" in obj:
        return _parse_ms_json(obj, name)
    raise StrategyError(f"{name}: JSON is neither a {FORMAT_NAME} nor a MindSpore strategy (no 'parallel_layout_item')")


# ------------------------------------------------------------------ entry points


def parse_strategy(data: bytes | bytearray | memoryview, *, name: str = "<strategy>") -> Strategy:
    """Parse a strategy file's bytes: protobuf, MindSpore JSON or distckpt JSON.

    JSON is recognised by its first non-blank byte being ``{`` (a protobuf
    ``ParallelStrategyMap`` can never start that way).  Any problem raises
    :class:`~distckpt.errors.StrategyError` naming ``name``.
    """
    mv = memoryview(data)
    head = bytes(mv[:4096]).lstrip(b" \t\r\n")
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip(b" \t\r\n")
    if head.startswith(b"{"):
        obj = jsonutil.loads(mv, where=f"{name}: bad JSON strategy file", error=StrategyError)
        return _from_json_obj(obj, name)
    try:
        return _parse_proto(mv, name)
    except FormatError as exc:
        raise StrategyError(f"bad protobuf strategy file: {exc}") from exc


def merge_strategies(strategies: Iterable[Strategy], *, name: str = "<strategies>") -> Strategy:
    """Union of strategies of different pipeline stages (like ``merge_pipeline_strategys``).

    A parameter present in several inputs must have the same layout in each;
    its stages are united.  ``num_stages`` is the largest of the inputs'.
    """
    specs: dict[str, ParamSpec] = {}
    num_stages = 1
    sdn = 0
    for st in strategies:
        num_stages = max(num_stages, st.num_stages)
        if st.params:
            if sdn and st.stage_device_num != sdn:
                raise StrategyError(
                    f"{name}: stages cover {sdn} and {st.stage_device_num} devices each; "
                    "every pipeline stage must have the same device count"
                )
            sdn = st.stage_device_num
        for p in st.params.values():
            old = specs.get(p.name)
            specs[p.name] = p if old is None else _merge_spec(old, p, name)
    return _make_strategy(specs, name, num_stages, sdn)


