"""Every file name and name pattern distckpt writes or recognises, in one place.

Names built here go to storage; names *read* from storage are data and are
only ever matched against these patterns (and checked by
:func:`distckpt.storage.safe_name`), never used to build a path that could
leave the directory.

distckpt checkpoints
    ``distckpt.index.json``                      the commit (written last)
    ``data-{save_id}-{rank:05d}.safetensors``    one data file per writing rank per save
    ``.manifest-{rank:05d}.json``                a rank-mode save's report, until ``finalize``
    ``.distckpt-save-{save_id}.json``            the save marker, written before any data file:
                                                 proof for ``gc`` that the save's files are ours
    ``chunks-{save_id}.safetensors`` /
    ``crc32c-{save_id}.bin``                     index version 2: the columnar chunk table
MindSpore
    ``rank_{r}/``                                a rank directory of a distributed checkpoint
    ``ckpt_strategy_rank_{r}.ckpt``              MindFormers' per-rank strategy file name
    ``{prefix}{r}.ckpt|.safetensors``            the per-rank file distckpt writes
MindFormers / HuggingFace
    ``mindspore_model.ckpt[.index.json]``, ``{stem}-{k:05d}-of-{n:05d}.{ext}``,
    ``model.safetensors[.index.json]``, ``config.json``, ``*.yaml``
"""

from __future__ import annotations

import re
import time
import uuid

__all__ = [
    "INDEX_NAME",
    "SAVE_ID",
    "new_save_id",
    "data_file",
    "is_data_file",
    "save_id_of",
    "manifest_file",
    "is_manifest",
    "rank_of_manifest",
    "save_marker",
    "is_save_marker",
    "chunk_table_file",
    "crc_file",
    "RANK_DIR",
    "rank_dir",
    "rank_file",
    "STRATEGY_FILE",
    "strategy_file",
    "DEFAULT_STEM",
    "shard_file",
    "SHARD_FILE",
    "weight_index_file",
    "CONFIG_FILES",
    "is_yaml",
]

INDEX_NAME = "distckpt.index.json"

#: A save id: UTC-ish timestamp + 8 random hex digits, fresh for every save.
SAVE_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}$")
_DATA = re.compile(r"^data-(?P<sid>\d{8}T\d{6}-[0-9a-f]{8})-(?P<rank>\d{5,})\.safetensors$")
_MANIFEST = re.compile(r"^\.manifest-(?P<rank>\d{5,})\.json$")
_MARKER = re.compile(r"^\.distckpt-save-(?P<sid>\d{8}T\d{6}-[0-9a-f]{8})\.json$")


def new_save_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def data_file(save_id: str, rank: int) -> str:
    return f"data-{save_id}-{rank:05d}.safetensors"


def is_data_file(name: str) -> bool:
    return _DATA.match(name) is not None


def save_id_of(name: str) -> str | None:
    """The save id a data file, marker or chunk table belongs to (None if it is none of those)."""
    for pat in (_DATA, _MARKER, _CHUNKS, _CRCS):
        m = pat.match(name)
        if m:
            return m.group("sid")
    return None


def manifest_file(rank: int) -> str:
    return f".manifest-{rank:05d}.json"


def is_manifest(name: str) -> bool:
    return _MANIFEST.match(name) is not None


def rank_of_manifest(name: str) -> int | None:
    m = _MANIFEST.match(name)
    return int(m.group("rank")) if m else None


def save_marker(save_id: str) -> str:
    return f".distckpt-save-{save_id}.json"


def is_save_marker(name: str) -> bool:
    return _MARKER.match(name) is not None


_CHUNKS = re.compile(r"^chunks-(?P<sid>\d{8}T\d{6}-[0-9a-f]{8})\.safetensors$")
_CRCS = re.compile(r"^crc32c-(?P<sid>\d{8}T\d{6}-[0-9a-f]{8})\.bin$")


def chunk_table_file(save_id: str) -> str:
    return f"chunks-{save_id}.safetensors"


def crc_file(save_id: str) -> str:
    return f"crc32c-{save_id}.bin"


# ------------------------------------------------------------------ MindSpore
RANK_DIR = re.compile(r"^rank_(\d+)$")


def rank_dir(rank: int) -> str:
    return f"rank_{rank}"


def rank_file(rank: int, prefix: str, ext: str) -> str:
    """``rank_{r}/{prefix}{r}.{ext}``: where ``transform_checkpoints`` puts rank r's file."""
    return f"rank_{rank}/{prefix}{rank}.{ext}"


#: Names that look like a strategy file (MindFormers: ``ckpt_strategy_rank_0.ckpt``; ours: ``strategy.ckpt``).
STRATEGY_FILE = re.compile(r".*strateg.*\.(ckpt|pb|json)$", re.IGNORECASE)


def strategy_file(first_rank: int) -> str:
    """MindFormers' per-rank strategy file name (a stage's file is named after its first rank)."""
    return f"ckpt_strategy_rank_{first_rank}.ckpt"


# --------------------------------------------------------- MindFormers / HF dirs
DEFAULT_STEM = "mindspore_model"
SHARD_FILE = re.compile(r"^(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.(?P<ext>ckpt|safetensors)$")
CONFIG_FILES = ("config.json", "generation_config.json")


def shard_file(stem: str, k: int, n: int, ext: str) -> str:
    """``{stem}-0000k-of-0000n.{ext}`` (HuggingFace's and MindFormers' shard names; k counts from 1)."""
    return f"{stem}-{k:05d}-of-{n:05d}.{ext}"


def weight_index_file(stem: str, ext: str) -> str:
    """``{stem}.{ext}.index.json``: the weight map of a sharded directory."""
    return f"{stem}.{ext}.index.json"


def is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))
