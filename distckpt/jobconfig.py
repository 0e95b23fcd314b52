"""YAML job configs, validated strictly.

A config file says what to save, where, with which parallel strategies, how
often, and how to launch the job.  It is read with ``yaml.safe_load`` semantics
(never an unsafe loader) and checked against :data:`SCHEMA`: an unknown key, a
duplicate key, a wrong type or a bad value is a :class:`~distckpt.errors.ConfigError`
naming the file, the line and the key path (``checkpoint.path``).  Every key is
optional; :func:`load_config` returns the fully defaulted dict.

==============================  ===============  ===========  ====================================================
key                             type             default      meaning
==============================  ===============  ===========  ====================================================
``version``                     int              ``1``        config format version (only 1 exists)
``checkpoint.path``             str | null       ``null``     checkpoint directory or fsspec URL (``s3://b/run``)
``checkpoint.format``           str              distckpt     ``distckpt`` | ``ckpt`` | ``safetensors``: how
                                                              checkpoints (or merge / split output) are written
``checkpoint.prefix``           str              checkpoint_  file prefix of MindSpore per-rank output
                                                              (``rank_r/{prefix}{r}.ckpt``)
``checkpoint.storage_options``  mapping          ``{}``       passed to fsspec (e.g. ``endpoint_url``, ``anon``)
``checkpoint.max_shard_size``   int | str |null  ``null``     largest merged file: bytes or ``"5GB"``, ``"512MiB"``;
                                                              normalised to an int of bytes; null = one file
``checkpoint.overwrite``        bool             ``false``    replace an existing destination
``strategy.src``                str | null       ``null``     strategy file (or per-stage directory) the
                                                              checkpoint was saved with
``strategy.dst``                str | null       ``null``     strategy of the job that loads / the reshard target
``save.interval_steps``         int >= 1         ``1``        save every N steps
``save.max_to_keep``            int >= 1 | null  ``null``     keep the newest K checkpoints (null: keep all)
``save.keep_period``            int >= 1 | null  ``null``     also keep every step divisible by this (Orbax)
``save.async_save``             bool             ``false``    write in the background after staging in host memory
``load.step``                   int >= 0 | null  ``null``     step to resume from (null: latest committed)
``load.verify``                 bool             ``true``     verify checksums of the bytes read
``load.names``                  list[str] | null ``null``     load only these tensors (null: all)
``job.np``                      int >= 1         ``1``        number of ranks (``mpirun -n``)
``job.device``                  str              cpu          ``cpu`` | ``gpu`` | ``ascend``
``job.hostfile``                str | null       ``null``     Open MPI hostfile for multi-node jobs
``job.log_dir``                 str | null       ``null``     per-rank logs ``log_dir/rank_<r>.log``
``job.comm_timeout``            number > 0       ``600``      seconds a collective waits for every rank
                                                              (``DISTCKPT_COMM_TIMEOUT``)
``train.steps``                 int >= 0         ``0``        training steps of the example jobs
``train.seed``                  int              ``0``        random seed of the example jobs
==============================  ===============  ===========  ====================================================

Relative paths are left as written (relative to the working directory, like
MindFormers).  Command-line flags override the file through
:func:`merge_cli_overrides`: a flag that was given (not None) wins.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError

__all__ = ["SCHEMA", "Field", "load_config", "validate_config", "default_config", "merge_cli_overrides", "parse_size", "size_option"]


@dataclass(frozen=True)
class Field:
    """One config key: accepted types, default, optional value check and normaliser, description."""

    types: tuple
    default: Any
    doc: str
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None
    normalize: Callable[[Any], Any] | None = None


def _at_least(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be >= {n}"


def _choice(*options: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _str_list(v: Any) -> str | None:
    bad = [x for x in v if not isinstance(x, str)]
    return None if not bad else f"must be a list of strings (got {bad[0]!r})"


def _str_keys(v: Any) -> str | None:
    bad = [k for k in v if not isinstance(k, str)]
    return None if not bad else f"keys must be strings (got {bad[0]!r})"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_size(value: int | str) -> int:
    """``5000`` → 5000; ``"5GB"`` → 5·10⁹ (decimal, like HuggingFace); ``"512MiB"`` → 512·2²⁰."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"size must be > 0, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"not a size: {value!r} (use bytes or e.g. '5GB', '512MiB')")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    binary = "i" in unit
    unit = unit.replace("i", "").replace("b", "")
    scale = 1024 ** "kmgtp".index(unit) * 1024 if binary and unit else _UNITS[unit]
    if not number * scale < 2**63:  # also inf and nan from a 5000-digit number
        raise ConfigError(f"not a size: {value!r} is too large")
    size = int(number * scale)
    if size <= 0:
        raise ConfigError(f"size must be > 0, got {value!r}")
    return size


def size_option(value: int | str | None, flag: str = "--max-shard-size") -> int | None:
    """A size given as an option (None stays None); a bad one is a :class:`ConfigError` naming ``flag``."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _size_check(v: Any) -> str | None:
    try:
        parse_size(v)
    except ValueError as exc:
        return str(exc)
    return None


INT = (int,)
NUM = (int, float)
STR = (str,)
BOOL = (bool,)

#: section → key → Field.  Extend here (and in the docstring table) to add keys.
SCHEMA: dict[str, Any] = {
    "version": Field(INT, 1, "config format version", check=lambda v: None if v == 1 else "only version 1 exists"),
    "checkpoint": {
        "path": Field(STR, None, "checkpoint directory or fsspec URL", nullable=True),
        "format": Field(STR, "distckpt", "output format", check=_choice("distckpt", "ckpt", "safetensors")),
        "prefix": Field(STR, "checkpoint_", "file prefix of MindSpore per-rank output"),
        "storage_options": Field((dict,), {}, "fsspec storage options", check=_str_keys),
        "max_shard_size": Field((int, str), None, "largest merged file", nullable=True, check=_size_check, normalize=parse_size),
        "overwrite": Field(BOOL, False, "replace an existing destination"),
    },
    "strategy": {
        "src": Field(STR, None, "strategy the checkpoint was saved with", nullable=True),
        "dst": Field(STR, None, "strategy of the loading job / reshard target", nullable=True),
    },
    "save": {
        "interval_steps": Field(INT, 1, "save every N steps", check=_at_least(1)),
        "max_to_keep": Field(INT, None, "keep the newest K", nullable=True, check=_at_least(1)),
        "keep_period": Field(INT, None, "also keep steps divisible by this", nullable=True, check=_at_least(1)),
        "async_save": Field(BOOL, False, "background save"),
    },
    "load": {
        "step": Field(INT, None, "step to resume from", nullable=True, check=_at_least(0)),
        "verify": Field(BOOL, True, "verify checksums"),
        "names": Field((list,), None, "tensors to load", nullable=True, check=_str_list),
    },
    "job": {
        "np": Field(INT, 1, "number of ranks", check=_at_least(1)),
        "device": Field(STR, "cpu", "device target", check=_choice("cpu", "gpu", "ascend")),
        "hostfile": Field(STR, None, "Open MPI hostfile", nullable=True),
        "log_dir": Field(STR, None, "per-rank log directory", nullable=True),
        "comm_timeout": Field(NUM, 600.0, "collective deadline in seconds", check=_positive, normalize=float),
    },
    "train": {
        "steps": Field(INT, 0, "training steps of the example jobs", check=_at_least(0)),
        "seed": Field(INT, 0, "random seed of the example jobs"),
    },
}

_TYPE_NAMES = {int: "int", float: "number", str: "string", bool: "bool", dict: "mapping", list: "list"}


def _type_name(types: tuple, nullable: bool) -> str:
    names = [_TYPE_NAMES.get(t, t.__name__) for t in types]
    if float in types:
        names = [n for n in names if n != "int"]
    return " or ".join(names + (["null"] if nullable else []))


def _yaml_type(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def default_config() -> dict:
    """Every key at its default."""
    out: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        if isinstance(spec, Field):
            out[key] = copy.deepcopy(spec.default)
        else:
            out[key] = {k: copy.deepcopy(f.default) for k, f in spec.items()}
    return out


def _unknown(source: str, path: str, key: str, known: list[str], line: int | None) -> ConfigError:
    where = f"{source}:{line}" if line else source
    full = f"{path}.{key}" if path else key
    hint = difflib.get_close_matches(key, known, n=1)
    did = f" (did you mean '{(path + '.') if path else ''}{hint[0]}'?)" if hint else ""
    return ConfigError(f"{where}: unknown key '{full}'{did}; known: {', '.join(sorted(known))}")


def _check_field(source: str, path: str, field: Field, value: Any, line: int | None) -> Any:
    where = f"{source}:{line}" if line else source
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(f"{where}: '{path}' must be {_type_name(field.types, False)}, got null")
    ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
    if not ok:
        raise ConfigError(
            f"{where}: '{path}' must be {_type_name(field.types, field.nullable)}, got {_yaml_type(value)} {value!r}"
        )
    if field.check is not None:
        complaint = field.check(value)
        if complaint:
            raise ConfigError(f"{where}: '{path}' {complaint}, got {value!r}")
    return field.normalize(value) if field.normalize is not None else copy.deepcopy(value)


def validate_config(data: Any, source: str = "<config>", lines: dict[str, int] | None = None) -> dict:
    """Check a parsed config (a mapping, or None for empty) and return it fully defaulted.

    ``lines`` maps key paths to line numbers for messages (filled by :func:`load_config`).
    """
    lines = lines or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {_yaml_type(data)}")
    out = default_config()
    for key, value in data.items():
        if not isinstance(key, str) or key not in SCHEMA:
            raise _unknown(source, "", str(key), list(SCHEMA), lines.get(str(key)))
        spec = SCHEMA[key]
        if isinstance(spec, Field):
            out[key] = _check_field(source, key, spec, value, lines.get(key))
            continue
        if value is None:  # "save:" with nothing under it
            continue
        if not isinstance(value, dict):
            where = f"{source}:{lines[key]}" if key in lines else source
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {_yaml_type(value)} {value!r}")
        for sub, subvalue in value.items():
            path = f"{key}.{sub}"
            if not isinstance(sub, str) or sub not in spec:
                raise _unknown(source, key, str(sub), list(spec), lines.get(path))
            out[key][sub] = _check_field(source, path, spec[sub], subvalue, lines.get(path))
    return out


def _read_text(path_or_url: str | os.PathLike, storage_options: dict | None) -> str:
    s = os.fspath(path_or_url)
    try:
        if "://" in s and not s.startswith("file://"):
            import fsspec

            with fsspec.open(s, "rb", **(storage_options or {})) as f:
                raw = f.read()
        else:
            with open(s[len("file://") :] if s.startswith("file://") else s, "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{s}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{s}: cannot read config: {exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{s}: config is not UTF-8 text ({exc})") from None


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """safe_load the text; also map key paths to lines and reject duplicate keys."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{context}, {problem}" if context else problem
        if mark is not None:
            raise ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: malformed YAML: {detail}") from None
        raise ConfigError(f"{source}: malformed YAML: {detail}") from None
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if not isinstance(n, yaml.MappingNode):
            return
        seen: set[str] = set()
        for k, v in n.value:
            key = str(k.value)
            path = f"{prefix}.{key}" if prefix else key
            if key in seen:
                raise ConfigError(f"{source}:{k.start_mark.line + 1}: duplicate key '{path}'")
            seen.add(key)
            lines[path] = k.start_mark.line + 1
            if prefix.count(".") < 1:
                walk(v, path)

    walk(node, "")
    return data, lines


def load_config(path_or_url: str | os.PathLike, *, storage_options: dict | None = None) -> dict:
    """Read, validate and default a YAML job config from a path or fsspec URL.

    Raises :class:`ConfigError` naming the file (and line) for a missing file,
    malformed YAML, an unknown or duplicate key, a wrong type or a bad value.
    """
    source = os.fspath(path_or_url)
    data, lines = _parse_yaml(_read_text(source, storage_options), source)
    return validate_config(data, source, lines)


def merge_cli_overrides(config: dict, overrides: dict, *, source: str = "command line") -> dict:
    """Return a copy of ``config`` with every non-None override applied, validated.

    ``overrides`` keys are dotted paths (``{"checkpoint.path": "out", "job.np": 4}``)
    or nested mappings (``{"job": {"np": 4}}``); a None value means "flag not
    given" and leaves the config's value.  Unknown keys and bad values raise
    :class:`ConfigError`.
    """
    flat: dict[str, Any] = {}

    def flatten(d: dict, prefix: str) -> None:
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and path in SCHEMA and not isinstance(SCHEMA[path], Field):
                flatten(v, path)
            else:
                flat[path] = v

    flatten(overrides, "")
    merged = copy.deepcopy(config)
    for path, value in flat.items():
        if value is None:
            continue
        section, _, key = path.partition(".")
        if section not in SCHEMA:
            raise _unknown(source, "", section, list(SCHEMA), None)
        spec = SCHEMA[section]
        if isinstance(spec, Field):
            if key:
                raise _unknown(source, section, key, [], None)
            merged[section] = value
            continue
        if not key or key not in spec:
            raise _unknown(source, section, key or "<missing>", list(spec), None)
        merged.setdefault(section, {})[key] = value
    return validate_config(merged, source)
