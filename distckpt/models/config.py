"""The model numbers the fused-weight maps need, read from an HF or a MindFormers config.

:meth:`ModelConfig.from_dict` takes any of: an HF ``config.json`` dict; a MindFormers
``model_config`` dict (HF-style keys, the same names MindFormers' ``Qwen3Config``
takes); a MindFormers YAML dict (``model: {model_config: {...}}``); a dict with
MindFormers' ``TransformerConfig`` (Megatron) names (``num_query_groups``,
``kv_channels``, ``ffn_hidden_size``, ``num_moe_experts`` ...).

:func:`layouts_from_mf_config` reads the fused layouts a MindFormers config selects
(``use_contiguous_weight_layout_attention``, ``use_interleaved_weight_layout_mlp``).
:func:`hf_config_from_mf` derives an HF ``config.json`` for export (with a top-level
``rope_theta``: transformers reads it there, and MindFormers ignores
``rope_parameters``); :func:`mf_config_from_hf` the reverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = [
    "ModelConfig",
    "model_config_dict",
    "layouts_from_mf_config",
    "hf_config_from_mf",
    "mf_config_from_hf",
]

# field -> accepted keys, first match wins (HF names first, then Megatron / MindFormers names)
_KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "num_layers"),
    "hidden_size": ("hidden_size",),
    "num_heads": ("num_attention_heads", "num_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "num_query_groups", "n_kv_heads"),
    "head_dim": ("head_dim", "kv_channels"),
    "ffn_hidden_size": ("intermediate_size", "ffn_hidden_size"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "num_experts": ("num_experts", "num_moe_experts", "n_routed_experts"),
    "moe_ffn_hidden_size": ("moe_intermediate_size", "moe_ffn_hidden_size"),
}


def model_config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flat model config inside ``config`` (unwraps ``model.model_config`` and ``model_config``)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"a model config must be a mapping, got {type(config).__name__}")
    cfg: Mapping[str, Any] = config
    model = cfg.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("model_config"), Mapping):
        cfg = model["model_config"]
    elif isinstance(cfg.get("model_config"), Mapping):
        cfg = cfg["model_config"]
    return dict(cfg)


def _get(cfg: Mapping[str, Any], field: str, default: Any = None) -> Any:
    for key in _KEYS[field]:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _int(value: Any, field: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        keys = " / ".join(_KEYS.get(field, (field,)))
        raise ConfigError(f"model config: {keys} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a decoder-only transformer; ``num_experts`` is 0 for a dense model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                     "vocab_size"):
            _int(getattr(self, name), name)
        _int(self.num_experts, "num_experts", minimum=0)
        _int(self.moe_ffn_hidden_size, "moe_ffn_hidden_size", minimum=0)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: {self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads"
            )
        if self.num_experts and not self.moe_ffn_hidden_size:
            raise ConfigError("model config: an MoE model needs moe_intermediate_size (moe_ffn_hidden_size)")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"model config: tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Read an HF ``config.json`` dict or a MindFormers config dict (see the module docstring)."""
        cfg = model_config_dict(config)
        hidden = _int(_get(cfg, "hidden_size"), "hidden_size")
        heads = _int(_get(cfg, "num_heads"), "num_heads")
        head_dim = _get(cfg, "head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"model config: no head_dim, and hidden_size {hidden} is not a multiple of {heads}")
            head_dim = hidden // heads
        tie = cfg.get("tie_word_embeddings")
        if tie is None and cfg.get("untie_embeddings_and_output_weights") is not None:
            tie = not cfg["untie_embeddings_and_output_weights"]
        return cls(
            num_layers=_int(_get(cfg, "num_layers"), "num_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=_get(cfg, "num_kv_heads", heads),
            head_dim=head_dim,
            ffn_hidden_size=_get(cfg, "ffn_hidden_size"),
            vocab_size=_get(cfg, "vocab_size"),
            num_experts=_get(cfg, "num_experts", 0),
            moe_ffn_hidden_size=_get(cfg, "moe_ffn_hidden_size", 0),
            tie_word_embeddings=bool(tie) if tie is not None else False,
        )


def layouts_from_mf_config(config: Mapping[str, Any]) -> tuple[str, str]:
    """``(qkv_layout, ffn_layout)`` a MindFormers config selects (MindFormers' defaults when unset)."""
    cfg = model_config_dict(config)
    contiguous_attn = cfg.get("use_contiguous_weight_layout_attention", False)
    interleaved_mlp = cfg.get("use_interleaved_weight_layout_mlp", True)
    for key, value in (("use_contiguous_weight_layout_attention", contiguous_attn),
                       ("use_interleaved_weight_layout_mlp", interleaved_mlp)):
        if not isinstance(value, bool):
            raise ConfigError(f"model config: {key} must be true or false, got {value!r}")
    return ("contiguous" if contiguous_attn else "interleaved", "interleaved" if interleaved_mlp else "contiguous")


# HF config.json keys carried over from a MindFormers config, with their MindFormers synonyms.
_HF_FROM_MF: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size",),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
    "num_hidden_layers": ("num_hidden_layers", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_query_groups", "n_kv_heads"),
    "head_dim": ("head_dim", "kv_channels"),
    "max_position_embeddings": ("max_position_embeddings",),
    "rms_norm_eps": ("rms_norm_eps", "layernorm_epsilon"),
    "rope_theta": ("rope_theta", "rotary_base", "theta"),
    "rope_scaling": ("rope_scaling",),
    "hidden_act": ("hidden_act",),
    "attention_bias": ("attention_bias", "add_qkv_bias"),
    "attention_dropout": ("attention_dropout",),
    "initializer_range": ("initializer_range", "init_method_std"),
    "bos_token_id": ("bos_token_id",),
    "eos_token_id": ("eos_token_id",),
    "pad_token_id": ("pad_token_id",),
    "num_experts": ("num_experts", "num_moe_experts"),
    "num_experts_per_tok": ("num_experts_per_tok", "moe_router_topk"),
    "moe_intermediate_size": ("moe_intermediate_size", "moe_ffn_hidden_size"),
    "norm_topk_prob": ("norm_topk_prob",),
    "decoder_sparse_step": ("decoder_sparse_step",),
    "mlp_only_layers": ("mlp_only_layers",),
    "router_aux_loss_coef": ("router_aux_loss_coef",),
}

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def hf_config_from_mf(
    config: Mapping[str, Any], *, architecture: str, model_type: str, dtype: str | None = None,
    moe: bool = False,
) -> dict[str, Any]:
    """An HF ``config.json`` dict for a MindFormers model config.

    ``architecture``/``model_type`` name the transformers class (e.g. ``Qwen3ForCausalLM``,
    ``qwen3``).  ``rope_theta`` is always written at the top level.  ``dtype`` (the
    exported tensors' dtype, e.g. ``bfloat16``) defaults to the config's ``params_dtype``.
    """
    cfg = model_config_dict(config)
    mc = ModelConfig.from_dict(cfg)  # validates the numbers the weights depend on
    out: dict[str, Any] = {"architectures": [architecture], "model_type": model_type}
    for key, synonyms in _HF_FROM_MF.items():
        if key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                   "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef") and not moe:
            continue
        for syn in synonyms:
            if cfg.get(syn) is not None:
                out[key] = cfg[syn]
                break
    pad = out.get("pad_token_id")
    if isinstance(pad, int) and not 0 <= pad < mc.vocab_size:
        # MindFormers' Qwen3 default (151643) on a smaller vocabulary: transformers' embedding
        # refuses a padding index outside the table, so leave it unset
        del out["pad_token_id"]
    out["head_dim"] = mc.head_dim
    out["num_key_value_heads"] = mc.num_kv_heads
    out["tie_word_embeddings"] = mc.tie_word_embeddings
    out.setdefault("rope_theta", 10000.0)
    out.setdefault("hidden_act", "silu")
    out.setdefault("attention_bias", False)
    if not isinstance(out.get("rope_scaling"), Mapping):
        out["rope_scaling"] = None
    for key in ("rope_theta", "rms_norm_eps", "initializer_range", "attention_dropout"):
        if key in out:
            out[key] = float(out[key])
    raw = dtype or cfg.get("params_dtype") or cfg.get("compute_dtype")
    if raw is not None:
        name = str(raw).lower().replace("mindspore.", "").replace("torch.", "")
        if name not in _DTYPES:
            raise ConfigError(f"model config: unknown dtype {raw!r}; expected one of {sorted(_DTYPES)}")
        out["torch_dtype"] = _DTYPES[name]
    return out


def mf_config_from_hf(config: Mapping[str, Any], *, mf_type: str) -> dict[str, Any]:
    """A MindFormers ``model_config`` dict (``type: mf_type`` + the HF keys it reads).

    MindFormers' HF-style config classes (``Qwen3Config``, ``Qwen3MoeConfig``) take the
    HF names directly; nested ``rope_parameters`` are flattened to ``rope_theta``.
    """
    cfg = dict(model_config_dict(config))
    ModelConfig.from_dict(cfg)
    rope = cfg.pop("rope_parameters", None)
    if isinstance(rope, Mapping) and "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    for key in ("architectures", "transformers_version", "auto_map", "torch_dtype", "dtype", "layer_types",
                "model_type", "use_cache"):
        cfg.pop(key, None)
    return {"type": mf_type, **cfg}
