"""``PreTrainedModel``: a ``mindspore.nn.Cell`` with MindFormers' ``PreTrainedModel`` API,
distributed ``save_pretrained`` / ``from_pretrained`` and model-name downloads.

Importing this module imports MindSpore; ``distckpt.mindspore`` exposes it lazily.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import mindspore as ms
import numpy as np
from mindspore import nn

from ..errors import ConfigError, UsageError
from .config import PretrainedConfig, pop_download_kwargs
from .convert import from_numpy, to_numpy
from .pretrained import default_checkpoint_save_folder, load_pretrained, save_pretrained

__all__ = ["PreTrainedModel"]

_AUTO_MODEL_CLASSES = ("AutoModel", "AutoModelForCausalLM")


class PreTrainedModel(nn.Cell):
    """Base of pretrained models: config, weights save / load (also distributed), Auto registration.

    Subclasses set ``config_class`` and build their cells in ``__init__(config)``,
    then call :meth:`post_init`.  Optional hooks: ``_init_weights(cell)``,
    ``get_input_embeddings`` / ``set_input_embeddings`` (for
    :meth:`resize_token_embeddings`), ``_prune_heads(heads)`` (for :meth:`prune_heads`),
    ``prepare_inputs_for_generation`` / ``generate`` (for :meth:`can_generate`).
    """

    config_class: type = PretrainedConfig
    base_model_prefix: str = ""
    _auto_class: Optional[str] = None

    def __init__(self, config: PretrainedConfig, *inputs, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(config, PretrainedConfig):
            raise ConfigError(
                f"{type(self).__name__}(config): config must be a PretrainedConfig, got {type(config).__name__}; "
                f"to load a saved model use {type(self).__name__}.from_pretrained(...)"
            )
        self.config = config
        self.name_or_path = config.name_or_path

    # ------------------------------------------------------------ structure
    @property
    def base_model(self) -> nn.Cell:
        return getattr(self, self.base_model_prefix, self) if self.base_model_prefix else self

    def post_init(self) -> None:
        """Run after the cells are built: initialise weights (``_init_weights`` hook) and prune configured heads."""
        self.init_weights()

    def init_weights(self) -> None:
        hook = getattr(self, "_init_weights", None)
        if hook is not None:
            for _, cell in self.cells_and_names():
                hook(cell)
        if self.config.pruned_heads and hasattr(self.base_model, "_prune_heads"):
            self.base_model._prune_heads({int(k): list(v) for k, v in self.config.pruned_heads.items()})

    @classmethod
    def can_generate(cls) -> bool:
        """True when the class defines ``prepare_inputs_for_generation`` or ``generate``."""
        return any(
            getattr(cls, m, None) is not getattr(PreTrainedModel, m, None)
            for m in ("prepare_inputs_for_generation", "generate")
        )

    def prepare_inputs_for_generation(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} cannot generate (no prepare_inputs_for_generation)")

    def generate(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} cannot generate (no generate)")

    # --------------------------------------------------------- embeddings
    def get_input_embeddings(self):
        raise NotImplementedError(f"{type(self).__name__} does not expose its input embeddings (get_input_embeddings)")

    def set_input_embeddings(self, value) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not expose its input embeddings (set_input_embeddings)")

    def get_output_embeddings(self):
        return None

    @staticmethod
    def _table_of(emb) -> ms.Parameter:
        if isinstance(emb, ms.Parameter):
            return emb
        for attr in ("embedding_table", "weight"):
            p = getattr(emb, attr, None)
            if isinstance(p, ms.Parameter):
                return p
        raise ConfigError(
            f"cannot resize embeddings of type {type(emb).__name__}: expected a Parameter or a Cell with "
            "an 'embedding_table' or 'weight' Parameter"
        )

    def _resized(self, table: ms.Parameter, new_num_tokens: int) -> None:
        old = to_numpy(table, name=table.name)
        if old.ndim != 2:
            raise ConfigError(f"embedding table {table.name!r} has shape {list(old.shape)}; expected [vocab, hidden]")
        std = float(getattr(self.config, "initializer_range", 0.02))
        rng = np.random.default_rng()
        new = (rng.standard_normal((new_num_tokens, old.shape[1])) * std).astype(old.dtype)
        keep = min(new_num_tokens, old.shape[0])
        new[:keep] = old[:keep]
        table.set_data(from_numpy(new, name=table.name), slice_shape=True)

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None):
        """Resize the input embedding table (and a separate output table) to ``new_num_tokens`` rows.

        Existing rows are kept; new rows are drawn from N(0, ``config.initializer_range`` or 0.02).
        ``config.vocab_size`` is updated.  Returns the input embeddings.
        """
        emb = self.get_input_embeddings()
        if new_num_tokens is None:
            return emb
        if int(new_num_tokens) <= 0:
            raise ConfigError(f"new_num_tokens must be positive, got {new_num_tokens}")
        table = self._table_of(emb)
        self._resized(table, int(new_num_tokens))
        out = self.get_output_embeddings()
        if out is not None:
            out_table = self._table_of(out)
            if out_table is not table:
                self._resized(out_table, int(new_num_tokens))
        self.set_input_embeddings(emb)
        self.config.vocab_size = int(new_num_tokens)  # type: ignore[attr-defined]
        return emb

    def prune_heads(self, heads_to_prune: Mapping[int, list[int]]) -> None:
        """Prune attention heads: ``{layer: [head, ...]}``; delegates to the model's ``_prune_heads`` hook."""
        hook = getattr(self.base_model, "_prune_heads", None)
        if hook is None:
            raise NotImplementedError(f"{type(self).__name__} cannot prune heads (no _prune_heads hook)")
        todo: dict[int, list[int]] = {}
        for layer, heads in heads_to_prune.items():
            have = set(self.config.pruned_heads.get(int(layer), []))
            new = sorted(set(int(h) for h in heads) - have)
            self.config.pruned_heads[int(layer)] = sorted(have | set(new))
            if new:
                todo[int(layer)] = new
        if todo:
            hook(todo)

    # --------------------------------------------------------- book-keeping
    @classmethod
    def get_model_support_list(cls, hub_url: Optional[str] = None, **kwargs) -> list[str]:
        """Model names the hub offers (``{hub}/models.json``; like ``MindFormerBook.get_model_support_list``)."""
        from .. import hub

        return hub.list_models(hub_url, **kwargs)

    @staticmethod
    def get_default_checkpoint_save_folder() -> str:
        return default_checkpoint_save_folder()

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """Register this class with an auto class (``"AutoModel"`` or the class itself)."""
        name = auto_class if isinstance(auto_class, str) else getattr(auto_class, "__name__", str(auto_class))
        if name not in _AUTO_MODEL_CLASSES:
            raise ConfigError(f"{cls.__name__}.register_for_auto_class: {name!r} is not a valid auto class; use one of {_AUTO_MODEL_CLASSES}")
        from .auto import AutoModel

        cls._auto_class = name
        AutoModel.register(cls.config_class if cls.config_class is not PretrainedConfig else None, cls)

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory=None, save_name: str = "mindspore_model", **kwargs) -> str:
        """Save weights and config; see :func:`distckpt.mindspore.save_pretrained` for the keywords.

        MindFormers' ``save_json=True`` is accepted: the ``config.json`` layout,
        sharded at ``max_shard_size`` (default ``"5GB"``).
        """
        if kwargs.pop("save_json", False):
            kwargs.setdefault("max_shard_size", "5GB")
        allowed = {"strategy", "comm", "max_shard_size", "storage_options"}
        bad = set(kwargs) - allowed
        if bad:
            raise UsageError(f"save_pretrained got unexpected keyword argument(s) {sorted(bad)}")
        self.config.architectures = [type(self).__name__]
        return save_pretrained(self, save_directory, save_name, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_dir=None, *model_args, **kwargs):
        """Build the model from a name, a local directory or an fsspec URL, and load its weights.

        Keywords: ``pretrained_model_name_or_path`` (overrides the positional),
        ``config`` (a config instead of the saved one), the download options
        (``cache_dir``, ``force_download``, ``resume_download``, ``proxies``,
        ``local_files_only``, ``hub_url``, ``storage_options``), ``strategy`` /
        ``rank`` (distributed load: each rank reads only its slices; the Cell
        built must hold sliced Parameters, e.g. under semi-auto parallel),
        ``strict``, ``output_loading_info``.  Other keywords override config
        fields of the same name, the rest go to ``__init__``.
        """
        from .. import hub

        name = kwargs.pop("pretrained_model_name_or_path", None) or pretrained_model_name_or_dir
        if name is None:
            raise ConfigError(f"{cls.__name__}.from_pretrained needs a model name, a directory or a URL")
        config = kwargs.pop("config", None)
        strategy = kwargs.pop("strategy", None)
        rank = kwargs.pop("rank", None)
        strict = kwargs.pop("strict", False)
        info = kwargs.pop("output_loading_info", False)
        dl = pop_download_kwargs(kwargs)
        path = hub.resolve(os.fspath(name), **dl)
        opts = dl.get("storage_options")
        if config is None:
            config = cls.config_class.from_pretrained(path, storage_options=opts)
        elif not isinstance(config, PretrainedConfig):
            config = cls.config_class.from_pretrained(config, storage_options=opts)
        model_kwargs: dict[str, Any] = {}
        for k, v in kwargs.items():
            if hasattr(config, k):
                setattr(config, k, v)
            else:
                model_kwargs[k] = v
        config.name_or_path = os.fspath(name)
        model = cls(config, *model_args, **model_kwargs)
        missing, unexpected = load_pretrained(model, path, strategy=strategy, rank=rank, strict=strict, **_only_opts(opts))
        model.set_train(False)
        if info:
            return model, {"missing_keys": missing, "unexpected_keys": unexpected}
        return model


def _only_opts(opts) -> dict:
    return {"storage_options": opts} if opts is not None else {}
