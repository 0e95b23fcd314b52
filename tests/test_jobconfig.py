"""YAML job configs: strict validation, clear errors, CLI overrides, shipped examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from distckpt.errors import ConfigError
from distckpt.jobconfig import (
    SCHEMA,
    Field,
    default_config,
    load_config,
    merge_cli_overrides,
    parse_size,
    validate_config,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert set(cfg) == set(SCHEMA)
    assert cfg["version"] == 1


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"quickstart.yaml", "s3.yaml"}
    q = load_config(ROOT / "configs" / "quickstart.yaml")
    assert q["job"]["np"] == 4 and q["job"]["device"] == "cpu"
    assert q["train"]["steps"] == 5 and q["checkpoint"]["path"] == "./output/quickstart/ckpt"
    assert q["strategy"]["src"]
    s3 = load_config(ROOT / "configs" / "s3.yaml")
    assert s3["checkpoint"]["path"].startswith("s3://") and s3["checkpoint"]["storage_options"]


def test_empty_file_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == default_config()
    assert load_config(write(tmp_path, "save:\n", "b.yaml")) == default_config()


def test_defaults_and_normalisation(tmp_path):
    cfg = load_config(write(tmp_path, "checkpoint:\n  max_shard_size: 512MiB\njob:\n  comm_timeout: 30\n"))
    assert cfg["checkpoint"]["max_shard_size"] == 512 * 2**20
    assert cfg["job"]["comm_timeout"] == 30.0 and isinstance(cfg["job"]["comm_timeout"], float)
    assert cfg["save"] == {"interval_steps": 1, "max_to_keep": None, "keep_period": None, "async_save": False}
    assert cfg["load"]["verify"] is True


def test_unknown_key_names_the_path_and_line(tmp_path):
    p = write(tmp_path, "checkpoint:\n  path: out\n  pathh: out2\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}:3: unknown key 'checkpoint.pathh'")
    assert "did you mean 'checkpoint.path'" in msg and "known: format, max_shard_size" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml:1: unknown key 'chekpoint' \(did you mean 'checkpoint'\?\)"):
        load_config(write(tmp_path, "chekpoint:\n  path: x\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("job:\n  np: '4'\n", r"job.yaml:2: 'job.np' must be int, got string '4'"),
        ("job:\n  np: true\n", r"'job.np' must be int, got bool True"),
        ("job:\n  np: 0\n", r"'job.np' must be >= 1, got 0"),
        ("job:\n  np: null\n", r"'job.np' must be int, got null"),
        ("job:\n  device: tpu\n", r"'job.device' must be one of cpu, gpu, ascend, got 'tpu'"),
        ("save:\n  async_save: 1\n", r"'save.async_save' must be bool, got int 1"),
        ("save: 5\n", r"'save' must be a mapping, got int 5"),
        ("checkpoint:\n  storage_options: [1]\n", r"'checkpoint.storage_options' must be mapping, got list"),
        ("checkpoint:\n  max_shard_size: lots\n", r"'checkpoint.max_shard_size' not a size"),
        ("load:\n  names: [a, 3]\n", r"'load.names' must be a list of strings"),
        ("version: 2\n", r"'version' only version 1 exists"),
        ("- a\n- b\n", r"a config must be a mapping of sections, got list"),
    ],
)
def test_wrong_types_and_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "job:\n  np: 4\n   device: [cpu\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value).startswith(f"{p}:3:") and "malformed YAML" in str(info.value)


def test_duplicate_keys_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml:3: duplicate key 'job'"):
        load_config(write(tmp_path, "job:\n  np: 4\njob:\n  np: 2\n"))
    with pytest.raises(ConfigError, match=r"duplicate key 'job.np'"):
        load_config(write(tmp_path, "job:\n  np: 4\n  np: 2\n"))


def test_unsafe_yaml_tags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(write(tmp_path, "checkpoint:\n  path: !!python/object/apply:os.system ['echo hi']\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_load_from_fsspec_url():
    import fsspec

    with fsspec.open("memory://cfg/job.yaml", "w") as f:
        f.write("job:\n  np: 3\n")
    assert load_config("memory://cfg/job.yaml")["job"]["np"] == 3


def test_merge_cli_overrides():
    cfg = validate_config({"job": {"np": 4}, "checkpoint": {"path": "a"}})
    out = merge_cli_overrides(cfg, {"checkpoint.path": "b", "job.np": None, "save": {"async_save": True, "max_to_keep": None}})
    assert out["checkpoint"]["path"] == "b"
    assert out["job"]["np"] == 4  # None: flag not given
    assert out["save"]["async_save"] is True and out["save"]["max_to_keep"] is None
    assert cfg["checkpoint"]["path"] == "a"  # input untouched
    assert merge_cli_overrides(cfg, {"checkpoint.max_shard_size": "1KiB"})["checkpoint"]["max_shard_size"] == 1024
    with pytest.raises(ConfigError, match="command line: unknown key 'job.nproc'"):
        merge_cli_overrides(cfg, {"job.nproc": 2})
    with pytest.raises(ConfigError, match="'job.np' must be int"):
        merge_cli_overrides(cfg, {"job.np": "many"})


@pytest.mark.parametrize(
    "value, size",
    [(5000, 5000), ("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kb", 1500), ("2k", 2000), ("3GiB", 3 * 2**30), ("10", 10)],
)
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "five", "-1", "1 XB", 0, True])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_schema_and_docstring_agree():
    import distckpt.jobconfig as mod

    for section, spec in SCHEMA.items():
        keys = [section] if isinstance(spec, Field) else [f"{section}.{k}" for k in spec]
        for key in keys:
            assert f"``{key}``" in mod.__doc__, f"{key} is not documented in the config docstring table"
