"""HuggingFace <-> MindFormers weight maps and fused-weight transforms (numpy only).

The distckpt core does not import this package; the HF source and the HF writer do,
lazily.  Nothing here imports torch, transformers, MindSpore or MindFormers at module
level (:func:`mindformers_weight_mapping` imports MindFormers when called).

Typical use::

    from distckpt.models import get_model_map
    conv = get_model_map("qwen3").from_hf(hf_shapes, hf_config_dict)   # import
    for piece in conv.read_plan("decoder.layers.0.self_attention.linear_qkv.weight", rank_box):
        ...  # read piece.src_box of piece.name, land it at piece.dst
    conv = get_model_map("qwen3").from_mf(mf_shapes, mf_config_dict)   # export
    for hf_name, array in conv.mf_to_hf(mf_getters): ...

See docs/models.md for the layouts and what was verified against MindFormers 1.9.
"""

from __future__ import annotations

from .config import ModelConfig, hf_config_from_mf, layouts_from_mf_config, mf_config_from_hf, model_config_dict
from .maps import (
    MODEL_FAMILIES,
    WEIGHT_MAPPINGS,
    Conversion,
    ModelMap,
    convert_name,
    family_for_class,
    family_for_hf_model_type,
    get_model_map,
    mindformers_training_classes,
    mindformers_weight_mapping,
)
from .ops import FFN_LAYOUTS, QKV_LAYOUTS, Op, Piece

__all__ = [
    "MODEL_FAMILIES",
    "WEIGHT_MAPPINGS",
    "QKV_LAYOUTS",
    "FFN_LAYOUTS",
    "ModelConfig",
    "ModelMap",
    "Conversion",
    "Op",
    "Piece",
    "get_model_map",
    "convert_name",
    "mindformers_weight_mapping",
    "mindformers_training_classes",
    "family_for_class",
    "family_for_hf_model_type",
    "model_config_dict",
    "layouts_from_mf_config",
    "hf_config_from_mf",
    "mf_config_from_hf",
    "hf_config_for",
]


def hf_config_for(model: str, mf_config, *, dtype: str | None = None) -> dict:
    """An HF ``config.json`` dict for a MindFormers config of family ``model``."""
    from .maps import _family

    fam = _family(model)
    if fam.hf_architecture is None or fam.hf_model_type is None:
        from ..errors import LayoutError

        raise LayoutError(f"model family {model!r} has no transformers class; pass an HF config.json instead")
    return hf_config_from_mf(mf_config, architecture=fam.hf_architecture, model_type=fam.hf_model_type,
                             dtype=dtype, moe=model.endswith("_moe") or model == "deepseek3")
