"""HF <-> MindFormers weight maps per model family, and the conversion of one model.

The name tables are MindFormers 1.9's own ``weight_mapping`` lists (ordered substring
substitutions, applied exactly as ``ModelMixin.convert_name`` applies them), shipped
here so distckpt works without MindFormers; :func:`mindformers_weight_mapping` reads
MindFormers' copy and the tests check the two agree.

Call order::

    mm = get_model_map("qwen3")                    # a ModelMap: tables + family facts
    conv = mm.from_hf(hf_shapes, config, qkv_layout="interleaved", ffn_layout="interleaved")
    # or conv = mm.from_mf(mf_shapes, config, ...) for export
    conv.mf_shapes / conv.hf_shapes                 # the two name spaces
    conv.read_plan(mf_name, box)                    # HF pieces that fill one rank's box
    conv.export_plan(hf_name, box)                  # MF pieces that fill an HF tensor
    conv.hf_to_mf(getters) / conv.mf_to_hf(getters) # whole tensors, one fused tensor at a time

A :class:`Conversion` is plain data (a list of :class:`~distckpt.models.ops.Op`),
built once from the tensor names and shapes of one side and the model config; building
it checks every shape against the config, so a malformed checkpoint fails before any
byte is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from ..errors import FormatError, LayoutError
from ..layout import Box
from .config import ModelConfig
from .ops import FFN_LAYOUTS, QKV_LAYOUTS, Op, Piece, experts_fc1_op, experts_fc2_op, fc1_op, qkv_op, rename_op

__all__ = [
    "WEIGHT_MAPPINGS",
    "MODEL_FAMILIES",
    "ModelMap",
    "Conversion",
    "get_model_map",
    "mindformers_weight_mapping",
    "convert_name",
    "family_for_class",
    "family_for_hf_model_type",
    "mindformers_training_classes",
]

Mapping_ = tuple[tuple[str, str], ...]

_DENSE_GQA: Mapping_ = (
    ("model.embed_tokens.", "embedding.word_embeddings."),
    (".self_attn.q_proj.", ".self_attention.linear_q."),
    (".self_attn.k_proj.", ".self_attention.linear_k."),
    (".self_attn.v_proj.", ".self_attention.linear_v."),
    (".self_attn.o_proj.", ".self_attention.linear_proj."),
)
_TAIL: Mapping_ = (
    (".post_attention_layernorm.", ".pre_mlp_layernorm."),
    ("model.norm.", "decoder.final_layernorm."),
    ("lm_head.", "output_layer."),
)
_MLA: Mapping_ = (
    ("model.embed_tokens.", "embedding.word_embeddings."),
    (".self_attn.q_a_proj.", ".self_attention.linear_q_down_proj."),
    (".self_attn.q_a_layernorm.", ".self_attention.q_layernorm."),
    (".self_attn.q_b_proj.", ".self_attention.linear_q_up_proj."),
    (".self_attn.kv_a_proj_with_mqa.", ".self_attention.linear_kv_down_proj."),
    (".self_attn.kv_a_layernorm.", ".self_attention.kv_layernorm."),
    (".self_attn.kv_b_proj.", ".self_attention.linear_kv_up_proj."),
    (".self_attn.o_proj.", ".self_attention.linear_proj."),
)
_MOE_MLP: Mapping_ = (
    (".mlp.gate_proj.", ".mlp.gating."),
    (".mlp.down_proj.", ".mlp.linear_fc2."),
    (".mlp.up_proj.", ".mlp.hidden."),
    (".gate.weight", ".router.weight"),
    (".gate.e_score_correction_bias", ".router.expert_bias"),
    (".mlp.shared_experts.gate_proj.", ".mlp.shared_experts.gating."),
    (".mlp.shared_experts.up_proj.", ".mlp.shared_experts.hidden."),
    (".mlp.shared_experts.down_proj.", ".mlp.shared_experts.linear_fc2."),
    (".gate_proj.", ".gating."),
    (".down_proj.", ".linear_fc2."),
    (".up_proj.", ".hidden."),
)


def _mtp(layer: int) -> Mapping_:
    p = f"model.layers.{layer}."
    return (
        (p + "enorm.", "decoder.enorm."),
        (p + "hnorm.", "decoder.hnorm."),
        (p + "eh_proj.", "decoder.eh_proj."),
        (p + "embed_tokens.", "embedding.word_embeddings."),
        (p + "shared_head.norm.", "decoder.final_layernorm."),
        (p + "shared_head.head.", "output_layer."),
        (p, "decoder.transformer."),
    )


_LAYERS: Mapping_ = (("model.layers.", "decoder.layers."),)

#: MindFormers 1.9's ``weight_mapping`` per family (``mindformers/models/<family>/utils.py``).
WEIGHT_MAPPINGS: dict[str, Mapping_] = {
    "qwen3": _DENSE_GQA + (
        (".self_attn.q_norm.", ".self_attention.q_layernorm."),
        (".self_attn.k_norm.", ".self_attention.k_layernorm."),
        (".mlp.gate_proj.", ".mlp.gating."),
        (".mlp.down_proj.", ".mlp.linear_fc2."),
        (".mlp.up_proj.", ".mlp.hidden."),
    ) + _TAIL + _LAYERS,
    "qwen3_moe": _DENSE_GQA + (
        (".self_attn.q_norm.", ".self_attention.q_layernorm."),
        (".self_attn.k_norm.", ".self_attention.k_layernorm."),
        (".gate.weight", ".router.weight"),
        (".gate_proj.", ".gating."),
        (".down_proj.", ".linear_fc2."),
        (".up_proj.", ".hidden."),
    ) + _TAIL + _LAYERS,
    "qwen2": _DENSE_GQA + (
        (".mlp.gate_proj.", ".mlp.gating."),
        (".mlp.down_proj.", ".mlp.linear_fc2."),
        (".mlp.up_proj.", ".mlp.hidden."),
    ) + _TAIL + _LAYERS,
    "glm4": _DENSE_GQA + (
        (".mlp.gate_up_proj.", ".mlp.linear_fc1."),
        (".mlp.down_proj.", ".mlp.linear_fc2."),
        (".mlp.gate_proj.", ".mlp.gating."),
        (".mlp.up_proj.", ".mlp.hidden."),
        (".gate.weight", ".router.weight.weight"),
        (".gate.e_score_correction_bias", ".router.expert_bias"),
    ) + _TAIL + _LAYERS,
    "glm4_moe": _DENSE_GQA + _MOE_MLP + _TAIL + _LAYERS,
    "deepseek3": _MLA + _MOE_MLP + _TAIL + _mtp(61) + _LAYERS,
    "telechat2": (
        ("transformer.word_embeddings.", "embedding.word_embeddings."),
        (".self_attention.query.", ".self_attention.linear_q."),
        (".self_attention.key.", ".self_attention.linear_k."),
        (".self_attention.value.", ".self_attention.linear_v."),
        (".self_attention.dense.", ".self_attention.linear_proj."),
        (".mlp.gate_proj.", ".mlp.gating."),
        (".mlp.down_proj.", ".mlp.linear_fc2."),
        (".mlp.up_proj.", ".mlp.hidden."),
        (".gate.weight", ".router.weight.weight"),
        (".gate_proj.", ".gating."),
        (".down_proj.", ".linear_fc2."),
        (".up_proj.", ".hidden."),
        (".post_attention_layernorm.", ".pre_mlp_layernorm."),
        ("transformer.ln_f.", "decoder.final_layernorm."),
        ("lm_head.", "output_layer."),
        ("transformer.h.", "decoder.layers."),
    ),
    "telechat3": _MLA + (
        (".self_attn.q_proj.", ".self_attention.linear_q."),
        (".self_attn.k_proj.", ".self_attention.linear_k."),
        (".self_attn.v_proj.", ".self_attention.linear_v."),
        (".self_attn.o_proj.", ".self_attention.linear_proj."),
        (".self_attn.q_norm.", ".self_attention.q_layernorm."),
        (".self_attn.k_norm.", ".self_attention.k_layernorm."),
    ) + _MOE_MLP + _TAIL + _mtp(46) + _LAYERS,
    "telechat3_moe": _MLA + _MOE_MLP + _TAIL + _mtp(46) + _LAYERS,
}


@dataclass(frozen=True)
class _Family:
    mf_module: str  # where MindFormers keeps the table
    mf_class: str
    hf_architecture: str | None  # transformers class, None when transformers has none
    hf_model_type: str | None
    mf_config_type: str
    status: str  # "verified": fused maps checked against MindFormers and transformers; "names": the table only
    note: str = ""
    mf_only: tuple[str, ...] = ()  # regexes of MF tensors with no HF counterpart (buffers)
    hf_ignore: tuple[str, ...] = ()  # regexes of HF tensors MindFormers has no parameter for
    hf_known: tuple[str, ...] = ()  # regexes of every HF tensor name the family has (empty: not checked)
    mf_training: tuple[str, str] = ("", "")  # "module:Class" of MindFormers' training model and its config class


_QWEN3_HF = (
    r"model\.embed_tokens\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)",
    r"model\.layers\.\d+\.self_attn\.o_proj\.weight",
    r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight",
)
_QWEN3_DENSE_MLP = (r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",)
_QWEN3_MOE_MLP = (
    r"model\.layers\.\d+\.mlp\.gate\.weight",
    r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight",
)
_INV_FREQ = (r".*\.rotary_emb\.inv_freq$",)

_FAMILIES: dict[str, _Family] = {
    "qwen3": _Family("mindformers.models.qwen3.utils", "Qwen3PreTrainedModel", "Qwen3ForCausalLM", "qwen3",
                     "Qwen3Config", "verified", hf_ignore=_INV_FREQ, hf_known=_QWEN3_HF + _QWEN3_DENSE_MLP,
                     mf_training=("mindformers.models.qwen3.modeling_qwen3_train:TrainingQwen3ForCausalLM",
                                  "mindformers.models.qwen3.configuration_qwen3:Qwen3Config")),
    "qwen3_moe": _Family("mindformers.models.qwen3_moe.utils", "Qwen3MoePreTrainedModel", "Qwen3MoeForCausalLM",
                         "qwen3_moe", "Qwen3MoeConfig", "verified",
                         mf_only=(r".*\.mlp\.router\.(fi_accu|expert_load)$",), hf_ignore=_INV_FREQ,
                         hf_known=_QWEN3_HF + _QWEN3_MOE_MLP,  # MF makes every layer MoE: no dense MLPs
                         mf_training=("mindformers.models.qwen3_moe.modeling_qwen3_moe_train:TrainingQwen3MoeForCausalLM",
                                      "mindformers.models.qwen3_moe.configuration_qwen3_moe:Qwen3MoeConfig")),
    "qwen2": _Family("mindformers.models.qwen2.utils", "Qwen2PreTrainedModel", "Qwen2ForCausalLM", "qwen2",
                     "Qwen2Config", "names", "MindFormers 1.9 has an inference model only (no training model)"),
    "glm4": _Family("mindformers.models.glm4.utils", "Glm4PreTrainedModel", "Glm4ForCausalLM", "glm4",
                    "Glm4Config", "names", "MindFormers 1.9 has an inference model only (no training model)"),
    "glm4_moe": _Family("mindformers.models.glm4_moe.utils", "Glm4MoePreTrainedModel", "Glm4MoeForCausalLM",
                        "glm4_moe", "Glm4MoeConfig", "names",
                        "MindFormers 1.9 has an inference model only (no training model)"),
    "deepseek3": _Family("mindformers.models.deepseek3.utils", "DeepseekV3PreTrainedModel",
                         "DeepseekV3ForCausalLM", "deepseek_v3", "DeepseekV3Config", "names",
                         "the table names the inference model; the training model's MLA and MTP tensors"
                         " (linear_qkv, linear_qb, linear_kvb, mtp.layers.*) have no HF converter in MindFormers 1.9"),
    "telechat2": _Family("mindformers.models.telechat2.utils", "Telechat2PreTrainedModel", None, None,
                         "Telechat2Config", "names",
                         "inference model only; MindFormers' table is a Python set, so its substitution order"
                         " is arbitrary"),
    "telechat3": _Family("mindformers.models.telechat3.utils", "TeleChat3PreTrainedModel", None, None,
                         "TeleChat3Config", "names", "no HF converter in MindFormers 1.9; not in transformers"),
    "telechat3_moe": _Family("mindformers.models.telechat3_moe.utils", "TeleChat3MoePreTrainedModel", None, None,
                             "TeleChat3MoeConfig", "names", "no HF converter in MindFormers 1.9; not in transformers"),
}

#: Every family with a MindFormers ``weight_mapping`` table, in a stable order.
MODEL_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def convert_name(name: str, table: Sequence[tuple[str, str]]) -> str:
    """Apply a table of substitutions in order, as MindFormers' ``convert_name`` does."""
    for src, dst in table:
        if src in name:
            name = name.replace(src, dst)
    return name


def mindformers_weight_mapping(family: str) -> list[tuple[str, str]]:
    """MindFormers' own table for ``family`` (imports mindformers; for cross-checks)."""
    import importlib

    fam = _family(family)
    from ..errors import require

    require("mindformers", "mindformers")
    cls = getattr(importlib.import_module(fam.mf_module), fam.mf_class)
    return [tuple(pair) for pair in cls.weight_mapping]  # type: ignore[misc]


def family_for_class(cls: type) -> str | None:
    """The model family of a model class, or None.

    Found, first match wins, along the class's MRO: a class attribute ``model_family``
    (a family name; for your own classes), else a MindFormers class that owns a family's
    ``weight_mapping`` (e.g. ``TrainingQwen3ForCausalLM`` derives from
    ``mindformers.models.qwen3.utils.Qwen3PreTrainedModel`` -> ``"qwen3"``).
    """
    if not isinstance(cls, type):
        cls = type(cls)
    for c in cls.__mro__:
        own = c.__dict__.get("model_family")
        if isinstance(own, str):
            _family(own)
            return own
        for name, fam in _FAMILIES.items():
            if c.__name__ == fam.mf_class and c.__module__ == fam.mf_module:
                return name
    return None


def family_for_hf_model_type(model_type: Any) -> str | None:
    """The family whose transformers ``model_type`` (``config.json``) is ``model_type``, or None."""
    for name, fam in _FAMILIES.items():
        if fam.hf_model_type is not None and fam.hf_model_type == model_type:
            return name
    return None


def mindformers_training_classes(family: str) -> tuple[type, type]:
    """``(model class, config class)`` of MindFormers' training model of ``family`` (imports mindformers)."""
    import importlib

    from ..errors import require

    fam = _family(family)
    if not fam.mf_training[0]:
        raise LayoutError(f"model family {family!r} has no MindFormers training model distckpt knows")
    require("mindformers", "mindformers")
    out = []
    for ref in fam.mf_training:
        mod, _, cls = ref.partition(":")
        out.append(getattr(importlib.import_module(mod), cls))
    return out[0], out[1]


def _family(name: str) -> _Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise LayoutError(f"unknown model family {name!r}; known: {', '.join(MODEL_FAMILIES)}") from None


# MF-side name patterns of fused tensors (after the table): prefix, part, suffix.
_QKV = re.compile(r"^(?P<pre>.+)\.linear_(?P<part>[qkv])\.(?P<suf>weight|bias)$")
_FC1 = re.compile(r"^(?P<pre>.+)\.(?P<part>gating|hidden)\.(?P<suf>weight|bias)$")
_EXPERT = re.compile(r"^(?P<pre>.+\.experts)\.(?P<e>\d+)\.(?P<part>gating|hidden|linear_fc2)\.weight$")
_QKV_MF = re.compile(r"^(?P<pre>.+)\.linear_qkv\.(?P<suf>weight|bias)$")
_FC1_MF = re.compile(r"^(?P<pre>.+)\.linear_fc1\.(?P<suf>weight|bias)$")
_EXPERTS_MF = re.compile(r"^(?P<pre>.+\.experts)\.weight(?P<w>[12])$")

Getter = Union[np.ndarray, Callable[[], Any]]


@dataclass(frozen=True)
class ModelMap:
    """One model family: its name table and how its fused MindFormers tensors are built."""

    name: str
    table: Mapping_
    family: _Family = field(repr=False)

    @property
    def status(self) -> str:
        return self.family.status

    def knows_hf(self, hf_name: str) -> bool:
        """True when ``hf_name`` is a tensor name this family's HF models have (always, for names-only families)."""
        if not self.family.hf_known:
            return self.hf_to_mf_name(hf_name) != hf_name
        return any(re.fullmatch(p, hf_name) for p in self.family.hf_known)

    def hf_to_mf_name(self, hf_name: str) -> str:
        """The MF name of an HF tensor before fusing (``...linear_q.weight``, ``...experts.3.gating.weight``)."""
        return convert_name(hf_name, self.table)

    def mf_to_hf_name(self, mf_name: str) -> str:
        """The inverse of :meth:`hf_to_mf_name`, checked by mapping back."""
        name = mf_name
        for src, dst in reversed(self.table):
            if dst in name:
                name = name.replace(dst, src)
        if self.hf_to_mf_name(name) != mf_name or not self.knows_hf(name):
            raise FormatError(f"{mf_name}: no HF name of model family {self.name!r} maps to this MindFormers tensor")
        return name

    def _require_fused(self) -> None:
        if self.family.status != "verified":
            raise LayoutError(
                f"model family {self.name!r}: only the name table is known ({self.family.note}); the fused-weight"
                f" maps are verified for {', '.join(n for n, f in _FAMILIES.items() if f.status == 'verified')}"
            )

    def from_hf(
        self,
        hf_shapes: Mapping[str, Sequence[int]],
        config: ModelConfig | Mapping[str, Any],
        *,
        qkv_layout: str = "interleaved",
        ffn_layout: str = "interleaved",
        strict: bool = True,
    ) -> Conversion:
        """The conversion of one HF checkpoint (its tensor names and shapes) to MindFormers tensors.

        Raises :class:`FormatError` for an HF tensor the map does not know (``strict``),
        a fused group with a member missing, or a shape that does not fit ``config``.
        """
        self._require_fused()
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        shapes = {n: tuple(int(x) for x in s) for n, s in hf_shapes.items()}
        ignore = [re.compile(p) for p in self.family.hf_ignore]
        groups: dict[tuple[str, str], dict[Any, str]] = {}
        ops: list[Op] = []
        unknown: list[str] = []
        skipped: list[str] = []
        for hf in shapes:
            if any(p.match(hf) for p in ignore):
                skipped.append(hf)
                continue
            if not self.knows_hf(hf):
                unknown.append(hf)
                continue
            mf = self.hf_to_mf_name(hf)
            if cfg.tie_word_embeddings and mf.startswith("output_layer."):
                skipped.append(hf)  # MindFormers shares the embedding; it has no output_layer
                continue
            m = _EXPERT.match(mf)
            if m:
                w = "weight2" if m["part"] == "linear_fc2" else "weight1"
                groups.setdefault(("experts", f"{m['pre']}.{w}"), {})[(int(m["e"]), m["part"])] = hf
                continue
            m = _QKV.match(mf)
            if m:
                groups.setdefault(("qkv", f"{m['pre']}.linear_qkv.{m['suf']}"), {})[m["part"]] = hf
                continue
            m = _FC1.match(mf)
            if m:
                groups.setdefault(("fc1", f"{m['pre']}.linear_fc1.{m['suf']}"), {})[m["part"]] = hf
                continue
            ops.append(rename_op(mf, hf, shapes[hf]))
        if unknown and strict:
            raise FormatError(
                f"model family {self.name!r} has no MindFormers name for the HF tensors {sorted(unknown)[:5]}"
                f"{' ...' if len(unknown) > 5 else ''}; is this a {self.name} checkpoint?"
            )
        for (kind, mf), members in groups.items():
            ops.append(_fused_op(kind, mf, members, shapes, cfg, qkv_layout, ffn_layout))
        _check_shapes(ops, cfg, hf_side=True)
        return Conversion(self, cfg, qkv_layout, ffn_layout, _sorted_ops(ops), tuple(skipped + unknown))

    def from_mf(
        self,
        mf_shapes: Mapping[str, Sequence[int]],
        config: ModelConfig | Mapping[str, Any],
        *,
        qkv_layout: str = "interleaved",
        ffn_layout: str = "interleaved",
        strict: bool = True,
    ) -> Conversion:
        """The conversion of one MindFormers checkpoint (its tensor names and shapes) to HF tensors.

        MF buffers with no HF counterpart (e.g. ``router.fi_accu``) are left out; any other
        tensor without an HF name raises :class:`FormatError`, unless ``strict=False``:
        then it is left out too (optimizer state, ``global_step`` ...).  Left-out names
        are in ``Conversion.skipped``.
        """
        self._require_fused()
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        skip = [re.compile(p) for p in self.family.mf_only]
        hf_shapes: dict[str, tuple[int, ...]] = {}
        groups: dict[tuple[str, str], dict[Any, str]] = {}
        skipped = []
        for mf, shape in mf_shapes.items():
            shape = tuple(int(x) for x in shape)
            if any(p.match(mf) for p in skip) or not (strict or self._maps_to_hf(mf)):
                skipped.append(mf)
                continue
            m = _QKV_MF.match(mf)
            if m:
                q, k, v = (self.mf_to_hf_name(f"{m['pre']}.linear_{p}.{m['suf']}") for p in "qkv")
                d, rows = cfg.head_dim, shape[0]
                nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
                if rows != nq + 2 * nkv:
                    raise FormatError(f"{mf}: shape {shape} does not fit the model map: expected {nq + 2 * nkv} rows")
                hf_shapes.update({q: (nq, *shape[1:]), k: (nkv, *shape[1:]), v: (nkv, *shape[1:])})
                groups[("qkv", mf)] = {"q": q, "k": k, "v": v}
                continue
            m = _FC1_MF.match(mf)
            if m:
                g, u = (self.mf_to_hf_name(f"{m['pre']}.{p}.{m['suf']}") for p in ("gating", "hidden"))
                if shape[0] % 2:
                    raise FormatError(f"{mf}: shape {shape} has an odd number of rows; gate and up cannot be split")
                hf_shapes.update({g: (shape[0] // 2, *shape[1:]), u: (shape[0] // 2, *shape[1:])})
                groups[("fc1", mf)] = {"gating": g, "hidden": u}
                continue
            m = _EXPERTS_MF.match(mf)
            if m:
                members = self._expert_names(m["pre"], m["w"], mf, shape, cfg, hf_shapes)
                groups[("experts", mf)] = members
                continue
            hf = self.mf_to_hf_name(mf)
            hf_shapes[hf] = shape
            groups[("rename", mf)] = {"": hf}
        ops = []
        for (kind, mf), members in groups.items():
            if kind == "rename":
                ops.append(rename_op(mf, members[""], hf_shapes[members[""]]))
            else:
                ops.append(_fused_op(kind, mf, members, hf_shapes, cfg, qkv_layout, ffn_layout))
        if not cfg.tie_word_embeddings and any(o.mf_name == "embedding.word_embeddings.weight" for o in ops) \
                and not any(o.mf_name == "output_layer.weight" for o in ops):
            raise FormatError("the MindFormers checkpoint has no output_layer.weight but the config does not tie"
                              " word embeddings; set tie_word_embeddings in the config")
        _check_shapes(ops, cfg, hf_side=False)
        return Conversion(self, cfg, qkv_layout, ffn_layout, _sorted_ops(ops), tuple(skipped))

    def _maps_to_hf(self, mf: str) -> bool:
        """True when MF tensor ``mf`` (fused or not) has HF counterparts in this family."""
        for pattern, parts in ((_QKV_MF, ("linear_q",)), (_FC1_MF, ("gating",)), (_EXPERTS_MF, ())):
            m = pattern.match(mf)
            if m:
                if not parts:  # experts: check expert 0
                    mf = f"{m['pre']}.0.{'gating' if m['w'] == '1' else 'linear_fc2'}.weight"
                else:
                    mf = f"{m['pre']}.{parts[0]}.{m['suf']}"
                break
        try:
            self.mf_to_hf_name(mf)
        except FormatError:
            return False
        return True

    def hf_to_mf(
        self,
        hf_tensors: Mapping[str, Getter],
        config: ModelConfig | Mapping[str, Any],
        *,
        qkv_layout: str = "interleaved",
        ffn_layout: str = "interleaved",
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(mf_name, array)`` for a whole HF state dict, one fused tensor at a time.

        Values are arrays or zero-argument getters; with getters pass ``shapes`` (e.g.
        from the safetensors headers) so nothing is read before it is needed.
        """
        shapes = shapes if shapes is not None else _shapes_of(hf_tensors)
        conv = self.from_hf(shapes, config, qkv_layout=qkv_layout, ffn_layout=ffn_layout)
        return conv.hf_to_mf(hf_tensors)

    def mf_to_hf(
        self,
        mf_tensors: Mapping[str, Getter],
        config: ModelConfig | Mapping[str, Any],
        *,
        qkv_layout: str = "interleaved",
        ffn_layout: str = "interleaved",
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, array)`` for a whole MindFormers state dict (model weights only)."""
        shapes = shapes if shapes is not None else _shapes_of(mf_tensors)
        conv = self.from_mf(shapes, config, qkv_layout=qkv_layout, ffn_layout=ffn_layout)
        return conv.mf_to_hf(mf_tensors)

    def _expert_names(self, pre, w, mf, shape, cfg: ModelConfig, hf_shapes) -> dict[Any, str]:
        E, H, F = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
        want = (E * H, 2 * F) if w == "1" else (E * F, H)
        if not E or shape != want:
            raise FormatError(f"{mf}: shape {shape} does not fit the model map: expected {want}"
                              f" ({E} experts, hidden {H}, expert FFN {F})")
        members: dict[Any, str] = {}
        parts = ("gating", "hidden") if w == "1" else ("linear_fc2",)
        for e in range(E):
            for p in parts:
                hf = self.mf_to_hf_name(f"{pre}.{e}.{p}.weight")
                hf_shapes[hf] = (F, H) if w == "1" else (H, F)
                members[(e, p)] = hf
        return members


def _fused_op(kind, mf, members, shapes, cfg: ModelConfig, qkv_layout, ffn_layout) -> Op:
    if kind == "qkv":
        names = _complete(mf, members, ("q", "k", "v"))
        return qkv_op(mf, names, [shapes[n] for n in names], num_heads=cfg.num_heads,
                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, layout=qkv_layout)
    if kind == "fc1":
        names = _complete(mf, members, ("gating", "hidden"))
        return fc1_op(mf, names, [shapes[n] for n in names], layout=ffn_layout)
    E = cfg.num_experts
    if not E:
        raise FormatError(f"{mf}: the checkpoint has expert tensors but the config has no experts (num_experts)")
    if mf.endswith(".weight1"):
        names = _complete(mf, members, [(e, p) for e in range(E) for p in ("gating", "hidden")])
        return experts_fc1_op(mf, names, [shapes[n] for n in names], num_experts=E)
    names = _complete(mf, members, [(e, "linear_fc2") for e in range(E)])
    return experts_fc2_op(mf, names, [shapes[n] for n in names], num_experts=E)


# MF tensors whose shape the config fixes (the verified families' dense and attention tensors);
# fused QKV rows and experts are checked when their ops are built.
_SHAPES: tuple[tuple[re.Pattern, Callable[[ModelConfig], tuple[int, ...]]], ...] = (
    (re.compile(r"^(embedding\.word_embeddings|output_layer)\.weight$"), lambda c: (c.vocab_size, c.hidden_size)),
    (re.compile(r"(^decoder\.final_layernorm|\.input_layernorm|\.pre_mlp_layernorm)\.weight$"),
     lambda c: (c.hidden_size,)),
    (re.compile(r"\.self_attention\.[qk]_layernorm\.weight$"), lambda c: (c.head_dim,)),
    (re.compile(r"\.self_attention\.linear_proj\.weight$"), lambda c: (c.hidden_size, c.num_heads * c.head_dim)),
    (re.compile(r"\.self_attention\.linear_qkv\.weight$"),
     lambda c: ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size)),
    (re.compile(r"\.mlp\.linear_fc1\.weight$"), lambda c: (2 * c.ffn_hidden_size, c.hidden_size)),
    (re.compile(r"\.mlp\.linear_fc2\.weight$"), lambda c: (c.hidden_size, c.ffn_hidden_size)),
    (re.compile(r"\.mlp\.router\.weight$"), lambda c: (c.num_experts, c.hidden_size)),
)


def _check_shapes(ops: Sequence[Op], cfg: ModelConfig, *, hf_side: bool) -> None:
    """Every tensor whose shape the config fixes must have that shape (a wrong one would load into nothing)."""
    for op in ops:
        for pattern, want_of in _SHAPES:
            if not pattern.search(op.mf_name):
                continue
            want = want_of(cfg)
            if op.mf_shape != want:
                name = ", ".join(op.hf_names) if hf_side else op.mf_name
                got = op.hf_shapes[0] if hf_side and op.kind == "rename" else op.mf_shape
                raise FormatError(
                    f"{name}: shape {got} does not fit the model map: {op.mf_name} must be {want} for this config"
                    f" (hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {cfg.num_heads} heads,"
                    f" {cfg.num_kv_heads} KV heads, head_dim {cfg.head_dim}, FFN {cfg.ffn_hidden_size})"
                )
            break


def _complete(mf: str, members: Mapping[Any, str], keys: Iterable[Any]) -> list[str]:
    keys = list(keys)
    missing = [k for k in keys if k not in members]
    extra = [k for k in members if k not in keys]
    if missing or extra:
        have = sorted(members.values())[:4]
        raise FormatError(
            f"{mf}: cannot fuse: {'missing parts ' + str(missing[:6]) if missing else ''}"
            f"{' unexpected parts ' + str(extra[:6]) if extra else ''} (have {have}...)"
        )
    return [members[k] for k in keys]


def _sorted_ops(ops: list[Op]) -> tuple[Op, ...]:
    def key(op: Op):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", op.mf_name)]

    return tuple(sorted(ops, key=key))


@dataclass(frozen=True)
class Conversion:
    """The HF <-> MF map of one model: every MF tensor as an :class:`Op` over HF tensors."""

    model: ModelMap
    config: ModelConfig
    qkv_layout: str
    ffn_layout: str
    ops: tuple[Op, ...]
    skipped: tuple[str, ...] = ()  # source tensors left out (buffers, ignored or, when not strict, unknown)
    _by_mf: dict[str, Op] = field(init=False, repr=False, compare=False)
    _by_hf: dict[str, Op] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.qkv_layout not in QKV_LAYOUTS or self.ffn_layout not in FFN_LAYOUTS:
            raise LayoutError(f"layouts must be in {QKV_LAYOUTS} / {FFN_LAYOUTS}")
        by_mf: dict[str, Op] = {}
        by_hf: dict[str, Op] = {}
        for op in self.ops:
            if op.mf_name in by_mf:
                raise FormatError(f"{op.mf_name}: two HF tensor groups map to this MindFormers tensor")
            by_mf[op.mf_name] = op
            for hf in op.hf_names:
                if hf in by_hf:
                    raise FormatError(f"{hf}: maps to both {by_hf[hf].mf_name} and {op.mf_name}")
                by_hf[hf] = op
        object.__setattr__(self, "_by_mf", by_mf)
        object.__setattr__(self, "_by_hf", by_hf)

    @property
    def mf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {op.mf_name: op.mf_shape for op in self.ops}

    @property
    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s for op in self.ops for n, s in zip(op.hf_names, op.hf_shapes)}

    def op_for_mf(self, mf_name: str) -> Op:
        try:
            return self._by_mf[mf_name]
        except KeyError:
            raise LayoutError(f"{mf_name}: not a MindFormers tensor of this {self.model.name} model") from None

    def op_for_hf(self, hf_name: str) -> Op:
        try:
            return self._by_hf[hf_name]
        except KeyError:
            raise LayoutError(f"{hf_name}: not an HF tensor of this {self.model.name} model") from None

    def read_plan(self, mf_name: str, box: Box | None = None) -> list[Piece]:
        """HF pieces that fill ``box`` of MF tensor ``mf_name`` (import; reads only the box's bytes)."""
        return self.op_for_mf(mf_name).read_plan(box)

    def export_plan(self, hf_name: str, box: Box | None = None) -> list[Piece]:
        """MF pieces that fill ``box`` of HF tensor ``hf_name`` (export)."""
        return self.op_for_hf(hf_name).export_plan(hf_name, box)

    def hf_to_mf(self, hf_tensors: Mapping[str, Getter]) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(mf_name, array)`` one MF tensor at a time; values are arrays or zero-argument getters."""
        for op in self.ops:
            yield op.mf_name, op.assemble([_fetch(hf_tensors, n) for n in op.hf_names])

    def mf_to_hf(self, mf_tensors: Mapping[str, Getter]) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, array)``, splitting one MF tensor at a time."""
        for op in self.ops:
            yield from zip(op.hf_names, op.split(_fetch(mf_tensors, op.mf_name)))


def _shapes_of(tensors: Mapping[str, Getter]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, value in tensors.items():
        shape = getattr(value, "shape", None)
        if shape is None:
            raise LayoutError(f"{name}: a getter has no shape; pass shapes= (e.g. from the safetensors headers)")
        out[name] = tuple(shape)
    return out


def _fetch(tensors: Mapping[str, Getter], name: str) -> np.ndarray:
    try:
        value = tensors[name]
    except KeyError:
        raise FormatError(f"{name}: tensor missing") from None
    return np.asarray(value() if callable(value) else value)


def get_model_map(name: str) -> ModelMap:
    """The map of one model family (see :data:`MODEL_FAMILIES`)."""
    fam = _family(name)
    return ModelMap(name, WEIGHT_MAPPINGS[name], fam)
