"""Storage behind six primitives: local disks, object stores (fsspec), HTTP; one retry policy; staging.

Modules, in the order a reader needs them:

* :mod:`.urls` -- :func:`safe_name` (the one validator of names read from
  storage), :func:`is_url`, :func:`split_url`, storage options from the environment;
* :mod:`.retry` -- :class:`RetryPolicy` and the transient/permanent classification;
* :mod:`.base` -- :class:`Store` (primitives a backend implements, everything
  callers use derived on top), :class:`Capabilities`, :class:`Writer`;
* :mod:`.local`, :mod:`.fsspec`, :mod:`.http` -- the backends;
* :mod:`.factory` -- :func:`open_storage` (URL -> backend) and :func:`read_small`;
* :mod:`.staging` -- :class:`Staging` (temporary place -> commit, or nothing),
  :func:`find_staging_debris`, :func:`handle_termination`.

Who calls what for one save (see ``distckpt.api``):

1. (all ranks) ``open_write`` their own data files, named with a fresh save id,
   so nothing a committed index refers to is ever overwritten; ``commit`` each;
2. (coordinator) after every rank reported success, ``put_atomic`` the index;
3. (coordinator) remove data files the new index no longer names.

Readers only trust what the index names, so debris of a failed save is
invisible; ``gc`` removes it.  Outputs of merge/split/reshard are built inside
a :class:`Staging` and appear at DST whole, or not at all.

Storage options come from the caller (API ``storage_options=``, CLI
``--storage-options JSON``, YAML ``checkpoint.storage_options``) merged over
the environment (:func:`env_storage_options`: ``AWS_ENDPOINT_URL``, ...).
:func:`distckpt.testing.check_storage_contract` checks a backend against this contract.
"""

from __future__ import annotations

from .base import STREAM_BLOCK, Capabilities, Stat, Store, Stream, Writer, is_space_error, space_error
from .factory import SMALL_FILE_LIMIT, open_storage, read_small
from .retry import RetryExhausted, RetryPolicy, TransientError, is_transient
from .staging import MARKER_NAME, Staging, Terminated, find_staging_debris, handle_termination
from .urls import env_storage_options, is_url, merge_options, safe_name, split_url

#: the old name of :class:`Store`
Storage = Store

__all__ = [
    "open_storage",
    "Store",
    "Storage",
    "Staging",
    "safe_name",
    "is_url",
    "split_url",
    "env_storage_options",
    "merge_options",
    "read_small",
    "SMALL_FILE_LIMIT",
    "Capabilities",
    "Stat",
    "Stream",
    "STREAM_BLOCK",
    "Writer",
    "RetryPolicy",
    "RetryExhausted",
    "TransientError",
    "is_transient",
    "is_space_error",
    "space_error",
    "find_staging_debris",
    "handle_termination",
    "Terminated",
    "MARKER_NAME",
]
