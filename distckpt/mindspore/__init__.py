"""MindSpore adapter: Cells, Parameters and Tensors <-> numpy, and MindFormers-style pretrained models.

Nothing here imports MindSpore at import time; the functions do, and fail
with an install hint when it is missing.

* :func:`to_numpy`, :func:`from_numpy`, :func:`cell_state`, :func:`load_into_cell` -- exact
  conversions (bf16 bit for bit, never through ``asnumpy()`` on a bf16 tensor);
* :func:`save_pretrained`, :func:`load_pretrained` -- for any Cell, MindFormers models included,
  single-process (MindFormers' own layouts) or distributed (every rank writes its slices; each rank
  of a new layout reads only its slices);
* :class:`PretrainedConfig`, :class:`PreTrainedModel`, :class:`AutoConfig`, :class:`AutoModel` --
  MindFormers' ``PreTrainedModel`` API on top of those, with model-name downloads
  (:mod:`distckpt.hub`).  ``PreTrainedModel`` subclasses ``mindspore.nn.Cell``, so accessing it
  imports MindSpore.
"""

from __future__ import annotations

from .convert import cell_state, from_numpy, load_into_cell, to_numpy
from .pretrained import default_checkpoint_save_folder, load_pretrained, save_pretrained

__all__ = [
    "to_numpy",
    "from_numpy",
    "cell_state",
    "load_into_cell",
    "save_pretrained",
    "load_pretrained",
    "default_checkpoint_save_folder",
    "PretrainedConfig",
    "PreTrainedModel",
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
]

_LAZY = {
    "PretrainedConfig": ".config",
    "PreTrainedModel": ".modeling",
    "AutoConfig": ".auto",
    "AutoModel": ".auto",
    "AutoModelForCausalLM": ".auto",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        if name == "PreTrainedModel":
            from ..errors import require

            require("mindspore", "mindspore")
        mod = importlib.import_module(_LAZY[name], __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'distckpt.mindspore' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
