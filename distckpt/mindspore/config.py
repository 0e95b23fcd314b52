"""``PretrainedConfig`` and the reading / writing of model configs (no MindSpore needed).

Two on-disk forms, both MindFormers':

* ``{save_name}.yaml``: ``model: {arch: {type: ModelClass}, model_config: {type: ConfigClass, ...}}``
  (what ``PreTrainedModel.save_pretrained`` writes);
* ``config.json``: the config's fields plus ``architectures: [ModelClass]`` and ``model_type``
  (HuggingFace / MindFormers ``save_json=True``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any, Optional

from ..errors import ConfigError
from ..mfconfig import CONFIG_NAME, read_config, yaml_bytes, yaml_module
from ..storage import open_storage

__all__ = [
    "PretrainedConfig",
    "CONFIG_NAME",
    "read_config",
    "config_files_for",
    "yaml_bytes",
    "DOWNLOAD_KWARGS",
    "pop_download_kwargs",
]

#: keyword arguments of ``from_pretrained`` that go to :func:`distckpt.hub.resolve`
DOWNLOAD_KWARGS = (
    "hub_url",
    "cache_dir",
    "force_download",
    "resume_download",
    "proxies",
    "local_files_only",
    "storage_options",
    "progress",
)


def pop_download_kwargs(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in DOWNLOAD_KWARGS if k in kwargs}


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


class PretrainedConfig:
    """Base configuration of a :class:`PreTrainedModel` (MindFormers' ``PretrainedConfig`` API).

    Any keyword becomes an attribute.  Subclasses set ``model_type``; a subclass
    with a ``model_type`` is registered with :class:`AutoConfig` automatically.
    """

    model_type: str = ""
    _auto_class: Optional[str] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        from .auto import _register_config_class

        _register_config_class(cls)

    def __init__(self, **kwargs):
        kwargs.pop("type", None)
        mt = kwargs.pop("model_type", None)
        if mt and not type(self).model_type:
            self.__dict__["_model_type"] = mt
        self.name_or_path = kwargs.pop("name_or_path", kwargs.pop("_name_or_path", ""))
        self.architectures = kwargs.pop("architectures", None)
        self.pruned_heads = {int(k): list(v) for k, v in dict(kwargs.pop("pruned_heads", None) or {}).items()}
        for k, v in kwargs.items():
            setattr(self, k, v)

    # ---------------------------------------------------------------- dicts
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k.startswith("_"):
                continue
            if isinstance(v, PretrainedConfig):
                v = v.to_dict()
            elif isinstance(v, Mapping):
                v = {str(kk): vv for kk, vv in v.items()}
            out[k] = copy.deepcopy(v)
        mt = type(self).model_type or self.__dict__.get("_model_type", "")
        if mt:
            out["model_type"] = mt
        return out

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], **kwargs) -> PretrainedConfig:
        d = dict(config_dict)
        d.update(kwargs)
        return cls(**d)

    def to_json_string(self) -> str:
        d = {k: v for k, v in self.to_dict().items() if _jsonable(v)}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def to_yaml_dict(self, arch: Optional[str] = None) -> dict[str, Any]:
        """MindFormers' YAML layout: ``{model: {arch: {type}, model_config: {..., type}}}``."""
        mc = {k: v for k, v in self.to_dict().items() if _jsonable(v) and k not in ("architectures",)}
        mc.pop("name_or_path", None)
        mc["type"] = type(self).__name__
        if arch is None and self.architectures:
            arch = self.architectures[0]
        return {"model": {"arch": {"type": arch}, "model_config": mc}}

    def __eq__(self, other) -> bool:
        return isinstance(other, PretrainedConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ------------------------------------------------------------ save / load
    def save_pretrained(
        self,
        save_directory=None,
        save_name: str = "mindspore_model",
        *,
        save_json: bool = False,
        storage_options: Optional[dict] = None,
    ) -> str:
        """Write ``{save_name}.yaml`` (or ``config.json`` with ``save_json=True``) into ``save_directory``."""
        from .pretrained import default_checkpoint_save_folder

        directory = os.fspath(save_directory) if save_directory is not None else default_checkpoint_save_folder()
        st = open_storage(directory, storage_options)
        st.makedirs()
        if save_json:
            st.put_atomic(CONFIG_NAME, self.to_json_string().encode())
            return st.child_url(CONFIG_NAME)
        st.put_atomic(f"{save_name}.yaml", yaml_bytes(self.to_yaml_dict()))
        return st.child_url(f"{save_name}.yaml")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> PretrainedConfig:
        """A config from a model name, a local directory, a YAML/JSON file, or an fsspec URL.

        Download keywords (``cache_dir``, ``force_download``, ``resume_download``,
        ``proxies``, ``local_files_only``, ``hub_url``, ``storage_options``) go to
        :func:`distckpt.hub.resolve`; other keywords override config fields.
        """
        from .. import hub

        kwargs.pop("return_unused_kwargs", None)
        dl = pop_download_kwargs(kwargs)
        name = kwargs.pop("pretrained_model_name_or_path", pretrained_model_name_or_path)
        raw = os.fspath(name)
        if raw.endswith((".yaml", ".yml", ".json")):
            path = raw
        else:
            path = hub.resolve(raw, **dl)
        found = read_config(path, storage_options=dl.get("storage_options"))
        d = dict(found.config)
        d.setdefault("name_or_path", raw)
        if found.arch and not d.get("architectures"):
            d["architectures"] = [found.arch]
        target: type[PretrainedConfig] = cls
        if cls is PretrainedConfig:
            from .auto import _config_class_for

            target = _config_class_for(found) or cls
        return target.from_dict(d, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """Register this class with :class:`AutoConfig` (``auto_class`` a name or the class)."""
        name = auto_class if isinstance(auto_class, str) else getattr(auto_class, "__name__", str(auto_class))
        if name != "AutoConfig":
            raise ConfigError(f"{cls.__name__}.register_for_auto_class: {name!r} is not a config auto class; use 'AutoConfig'")
        from .auto import AutoConfig

        cls._auto_class = name
        AutoConfig.register(cls.model_type or cls.__name__, cls)


# ------------------------------------------------------------ model configs
def _mindformers_yaml(model: Any) -> Optional[dict]:
    """The YAML dict MindFormers' own ``save_pretrained`` writes, built by its own methods."""
    cfg = getattr(model, "config", None)
    if cfg is None or not all(hasattr(model, m) for m in ("_inverse_parse_config", "_wrap_config", "remove_type")):
        return None
    parsed, removed = model._inverse_parse_config(cfg)
    try:
        wrapped = model._wrap_config(parsed)
    finally:
        for key, val in removed:
            cfg.__dict__[key] = val
        model.remove_type(cfg)
    return wrapped


def _config_json(model: Any) -> Optional[bytes]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    arch = type(model).__name__
    if isinstance(cfg, PretrainedConfig):
        d = json.loads(cfg.to_json_string())
        d["architectures"] = [arch]
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()
    if hasattr(cfg, "to_json_string"):  # MindFormers / HuggingFace configs
        old = getattr(cfg, "architectures", None)
        cfg.architectures = [arch]
        try:
            try:
                text = cfg.to_json_string(use_diff=True)
            except TypeError:
                text = cfg.to_json_string()
        finally:
            cfg.architectures = old
        return text.encode()
    if hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if _jsonable(v)}
        d["architectures"] = [arch]
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()
    return None


def config_files_for(model: Any, save_name: str, *, yaml: bool, json_: bool) -> dict[str, bytes]:
    """The config files to write beside ``model``'s weights: ``{save_name}.yaml`` and/or ``config.json``."""
    out: dict[str, bytes] = {}
    cfg = getattr(model, "config", None)
    if yaml:
        doc = _mindformers_yaml(model)
        if doc is not None:  # byte for byte what MindFormers writes (it uses yaml.dump)
            out[f"{save_name}.yaml"] = yaml_module().dump(doc).encode()
        else:
            if isinstance(cfg, PretrainedConfig):
                doc = cfg.to_yaml_dict(type(model).__name__)
            else:
                mc = {}
                if cfg is not None and hasattr(cfg, "to_dict"):
                    mc = {k: v for k, v in cfg.to_dict().items() if _jsonable(v)}
                doc = {"model": {"arch": {"type": type(model).__name__}, "model_config": mc}}
            out[f"{save_name}.yaml"] = yaml_bytes(doc)
    if json_:
        data = _config_json(model)
        if data is not None:
            out[CONFIG_NAME] = data
    return out
