"""MindFormers model config files, read and written without MindSpore.

Two on-disk forms, both MindFormers':

* ``{save_name}.yaml``: ``model: {arch: {type: ModelClass}, model_config: {type: ConfigClass, ...}}``
  (what ``PreTrainedModel.save_pretrained`` writes);
* ``config.json``: the config's fields plus ``architectures: [ModelClass]`` and ``model_type``
  (HuggingFace / MindFormers ``save_json=True``).

The adapter's ``PretrainedConfig`` (:mod:`distckpt.mindspore.config`) builds on this;
``merge`` uses it to derive a ``config.json`` from a YAML.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from . import jsonutil
from .errors import ConfigError, DistCkptError
from .storage import Store, open_storage

__all__ = ["CONFIG_NAME", "MAX_CONFIG_BYTES", "FoundConfig", "read_config", "yaml_bytes", "config_json_from_yaml", "yaml_module"]

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 16 << 20


class FoundConfig:
    """A config read from a directory: field dict, architecture and config class names, and the file."""

    def __init__(self, config: dict, arch: Optional[str], config_type: Optional[str], model_type: Optional[str], file: str):
        self.config, self.arch, self.config_type, self.model_type, self.file = config, arch, config_type, model_type, file


def yaml_module():
    from .errors import require

    return require("yaml", "mindspore")


def yaml_bytes(doc: Mapping) -> bytes:
    return yaml_module().safe_dump(dict(doc), sort_keys=True).encode()


def _parse_yaml(data: bytes, where: str) -> FoundConfig:
    y = yaml_module()
    try:
        doc = y.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, y.YAMLError) as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("model_config", {}), dict):
        raise ConfigError(f"{where}: expected MindFormers' layout 'model: {{arch: {{type: ...}}, model_config: {{...}}}}'")
    mc = dict(model.get("model_config") or {})
    arch = (model.get("arch") or {}).get("type") if isinstance(model.get("arch"), dict) else None
    ctype = mc.pop("type", None)
    return FoundConfig(mc, arch, ctype, mc.get("model_type"), where)


def _parse_json(data: bytes, where: str) -> FoundConfig:
    doc = jsonutil.loads(data, where=where, error=ConfigError)
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: a config must be a JSON object")
    archs = doc.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    return FoundConfig(dict(doc), arch, None, doc.get("model_type"), where)


def read_config(path, *, save_name: Optional[str] = None, storage_options: Optional[dict] = None) -> FoundConfig:
    """Read the model config of a directory (or a ``.yaml`` / ``.json`` file), local or fsspec URL.

    In a directory: ``{save_name}.yaml``, else ``mindspore_model.yaml``, else the
    first ``*.yaml`` by name, else ``config.json``.
    """
    raw = os.fspath(path)
    if raw.endswith((".yaml", ".yml", ".json")):
        from .storage import split_url

        parent, base = split_url(raw)
        st = open_storage(parent, storage_options)
        data = st.read_bytes(base, limit=MAX_CONFIG_BYTES)
        return _parse_json(data, raw) if base.endswith(".json") else _parse_yaml(data, raw)
    st = open_storage(raw, storage_options)
    try:
        names = st.listdir()
    except (FileNotFoundError, DistCkptError):
        names = []
    yamls = sorted(n for n in names if n.endswith((".yaml", ".yml")))
    for pick in ([f"{save_name}.yaml"] if save_name else []) + ["mindspore_model.yaml"] + yamls:
        if pick in yamls:
            return _parse_yaml(st.read_bytes(pick, limit=MAX_CONFIG_BYTES), st.child_url(pick))
    if CONFIG_NAME in names:
        return _parse_json(st.read_bytes(CONFIG_NAME, limit=MAX_CONFIG_BYTES), st.child_url(CONFIG_NAME))
    raise ConfigError(f"{raw}: no model config (looked for *.yaml and {CONFIG_NAME}); names there: {sorted(names)[:10]}")




def config_json_from_yaml(store: Store, name: str) -> dict:
    """The ``config.json`` document equivalent to a MindFormers YAML (fields + ``architectures``)."""
    found = _parse_yaml(store.read_bytes(name, limit=MAX_CONFIG_BYTES), store.child_url(name))
    doc: dict[str, Any] = dict(found.config)
    if found.arch:
        doc["architectures"] = [found.arch]
    return doc
