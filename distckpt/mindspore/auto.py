"""``AutoConfig`` / ``AutoModel``: pick the class from the saved config.

The YAML names the model class (``model.arch.type``) and the config class
(``model.model_config.type``); ``config.json`` names ``architectures`` and
``model_type``.  Classes are found in a registry:

* config classes with a ``model_type`` register themselves on definition;
* model classes register through ``Model.register_for_auto_class()``,
  ``AutoModel.register(config_class, model_class)``, or are found by class name
  among the subclasses of :class:`PreTrainedModel` already defined;
* a HuggingFace directory (``config.json`` + safetensors, no YAML) whose class is not
  registered: its ``model_type`` names a model family (:mod:`distckpt.models`, e.g.
  ``qwen3``), and MindFormers' training model of that family is built from the config
  and loaded with the HF weights, fused (:func:`distckpt.mindspore.load_pretrained`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Optional

from ..errors import ConfigError

__all__ = ["AutoConfig", "AutoModel", "AutoModelForCausalLM"]

_CONFIGS: dict[str, type] = {}  # model_type or class name -> config class
_MODELS: dict[str, type] = {}  # model class name, or model_type / config class name -> model class


def _register_config_class(cls: type) -> None:
    _CONFIGS.setdefault(cls.__name__, cls)
    mt = getattr(cls, "model_type", "")
    if mt:
        _CONFIGS[mt] = cls


def _config_class_for(found) -> Optional[type]:
    for key in (found.config_type, found.model_type):
        if key and key in _CONFIGS:
            return _CONFIGS[key]
    if found.arch:
        model_cls = _model_class_for_name(found.arch)
        if model_cls is not None:
            return getattr(model_cls, "config_class", None)
    return None


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _model_class_for_name(name: str) -> Optional[type]:
    if name in _MODELS:
        return _MODELS[name]
    from .modeling import PreTrainedModel

    hits = [c for c in _subclasses(PreTrainedModel) if c.__name__ == name]
    return hits[-1] if hits else None


class AutoConfig:
    """``AutoConfig.from_pretrained(name_or_path)`` -> an instance of the registered config class."""

    def __init__(self):
        raise OSError("AutoConfig is not instantiated; use AutoConfig.from_pretrained(...) or AutoConfig.for_model(...)")

    @classmethod
    def register(cls, model_type: str, config_class: type, exist_ok: bool = True) -> None:
        if not exist_ok and model_type in _CONFIGS and _CONFIGS[model_type] is not config_class:
            raise ConfigError(f"AutoConfig: {model_type!r} is already registered to {_CONFIGS[model_type].__name__}")
        _CONFIGS[model_type] = config_class
        _CONFIGS.setdefault(config_class.__name__, config_class)

    @classmethod
    def for_model(cls, model_type: str, **kwargs):
        if model_type not in _CONFIGS:
            raise ConfigError(f"AutoConfig: unknown model_type {model_type!r}; registered: {sorted(_CONFIGS)}")
        return _CONFIGS[model_type](**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        from .config import PretrainedConfig

        return PretrainedConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)


class AutoModel:
    """``AutoModel.from_pretrained(name_or_path)`` -> the registered model class, loaded.

    Keywords are those of :meth:`PreTrainedModel.from_pretrained`.
    """

    def __init__(self):
        raise OSError("AutoModel is not instantiated; use AutoModel.from_pretrained(...) or AutoModel.from_config(...)")

    @classmethod
    def register(cls, config_class, model_class: type, exist_ok: bool = True) -> None:
        """Map a config class (or a model_type / class name string) to ``model_class``."""
        keys = [model_class.__name__]
        if isinstance(config_class, str):
            keys.append(config_class)
        elif config_class is not None:
            keys.append(config_class.__name__)
            if getattr(config_class, "model_type", ""):
                keys.append(config_class.model_type)
        for k in keys:
            if not exist_ok and k in _MODELS and _MODELS[k] is not model_class:
                raise ConfigError(f"{cls.__name__}: {k!r} is already registered to {_MODELS[k].__name__}")
            _MODELS[k] = model_class

    @classmethod
    def _pick(cls, arch: Optional[str], config) -> type:
        tried = []
        for key in ([arch] if arch else []) + [type(config).__name__, getattr(config, "model_type", "") or ""]:
            if not key:
                continue
            tried.append(key)
            found = _model_class_for_name(key)
            if found is not None:
                return found
        raise ConfigError(
            f"{cls.__name__}: no model class registered for {tried}; registered: {sorted(_MODELS)} "
            "(define the class, call Model.register_for_auto_class(), or AutoModel.register(ConfigClass, Model))"
        )

    @classmethod
    def from_config(cls, config, **kwargs):
        archs = getattr(config, "architectures", None) or []
        return cls._pick(archs[0] if archs else None, config)(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_dir=None, *model_args, **kwargs):
        from .. import hub
        from .config import PretrainedConfig, pop_download_kwargs, read_config

        name = kwargs.pop("pretrained_model_name_or_path", None) or pretrained_model_name_or_dir
        if name is None:
            raise ConfigError(f"{cls.__name__}.from_pretrained needs a model name, a directory or a URL")
        dl = pop_download_kwargs(kwargs)
        path = hub.resolve(os.fspath(name), **dl)
        config = kwargs.pop("config", None)
        arch: Optional[str] = None
        if config is None:
            found = read_config(path, storage_options=dl.get("storage_options"))
            arch = found.arch
            config = PretrainedConfig.from_pretrained(path, storage_options=dl.get("storage_options"))
        else:
            archs = getattr(config, "architectures", None) or []
            arch = archs[0] if archs else None
        try:
            model_cls = cls._pick(arch, config)
        except ConfigError:
            family = _hf_family(path, dl.get("storage_options")) if not model_args else None
            if family is None:
                raise
            return _mindformers_from_hf(family, path, kwargs, dl.get("storage_options"))
        rest: dict[str, Any] = dict(kwargs)
        if dl.get("storage_options") is not None:
            rest["storage_options"] = dl["storage_options"]
        return model_cls.from_pretrained(path, *model_args, config=config, **rest)


def _hf_family(path: str, storage_options: Optional[dict]) -> Optional[str]:
    """The model family of an HF directory (``config.json``'s ``model_type``) with a MindFormers training model."""
    from ..mfconfig import CONFIG_NAME
    from ..models import family_for_hf_model_type, get_model_map
    from ..storage import open_storage

    store = open_storage(path, storage_options)
    names = store.listdir()
    if CONFIG_NAME not in names or any(n.endswith((".yaml", ".yml")) for n in names):
        return None  # a MindFormers directory names its class in the YAML
    from .config import read_config

    family = family_for_hf_model_type(read_config(path, storage_options=storage_options).model_type)
    if family is None or get_model_map(family).family.mf_training[0] == "":
        return None
    return family


def _mindformers_from_hf(family: str, path: str, kwargs: dict, storage_options: Optional[dict]):
    """MindFormers' training model of ``family`` built from an HF ``config.json`` and loaded with its weights.

    Keywords: ``strategy``, ``rank``, ``strict``, ``output_loading_info``, ``qkv_layout``,
    ``ffn_layout``; the others are MindFormers config fields (e.g. ``compute_dtype``,
    ``use_flash_attention``, ``use_contiguous_weight_layout_attention``).
    """
    from ..models import mf_config_from_hf, mindformers_training_classes
    from .config import read_config
    from .pretrained import load_pretrained

    model_cls, config_cls = mindformers_training_classes(family)
    load_kw: dict[str, Any] = {k: kwargs.pop(k) for k in ("strategy", "rank", "strict", "qkv_layout", "ffn_layout") if k in kwargs}
    info = kwargs.pop("output_loading_info", False)
    fields = mf_config_from_hf(read_config(path, storage_options=storage_options).config, mf_type=config_cls.__name__)
    fields.pop("type")
    fields.update(kwargs)
    model = model_cls(config_cls(**fields))
    if storage_options is not None:
        load_kw["storage_options"] = storage_options
    missing, unexpected = load_pretrained(model, path, model_family=family, **load_kw)
    model.set_train(False)
    if info:
        return model, {"missing_keys": missing, "unexpected_keys": unexpected}
    return model


class AutoModelForCausalLM(AutoModel):
    """Same registry as :class:`AutoModel` (kept for MindFormers / HuggingFace spelling)."""
