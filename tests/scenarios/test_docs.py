"""Issue 11, items 25-27: the docs are true, because a test runs every example in them.

Every fenced ``bash`` / ``python`` block of README.md and launch/README.md is either run here, in
document order, or carries ``<!-- docs-test: not run: REASON -->`` on the line before it -- and no
block that holds a ``distckpt`` command or imports distckpt may be skipped.  The blocks are read
from the Markdown, so the docs cannot drift from what is tested:

* launch/README.md's CPU block is the quickstart's three phases (4 ranks under mpirun train and
  save, one process merges and reshards, 2 ranks resume); its output is what the README's
  examples run against, in a fresh directory (``output/quickstart/...``);
* ``distckpt ...`` lines run through ``distckpt.cli.main`` and must exit 0; python blocks run
  with ``exec``, and a ``print(...)  # expected`` line must print exactly the expected text;
* ``s3://`` examples run against a local moto S3 server (the endpoint in the docs,
  ``http://127.0.0.1:9000``, is replaced by the server's);
* the ``distckpt CMD --help`` examples (the CLI's epilogs) run too.

Item 26 (a strategy file without MindSpore's parallel compiler) and item 27 (the quickstart says
what it compared, bit for bit, and prints no MindSpore deprecation warning) are checked on the
quickstart's own output.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from issue11_util import REPO

import distckpt

DOCS = ("README.md", "launch/README.md")
DOC_ENDPOINT = "http://127.0.0.1:9000"
BUCKET = "my-bucket"
SKIP = re.compile(r"^<!-- docs-test: not run: (?P<why>\S.*?) -->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    text: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    """The fenced code blocks of ``doc``, dedented, with the reason given if they are not run."""
    lines = (REPO / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group("indent")), m.group("lang"), i
        body = []
        i += 1
        while not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(prev)
        out.append(Block(doc, start + 1, lang, "\n".join(body) + "\n", skip.group("why") if skip else None))
        i += 1
    return out


def commands(block: Block) -> list[list[str]]:
    """The shell commands of a bash block (continuations joined, comments dropped)."""
    out, pending = [], ""
    for raw in block.text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def expected_prints(code: str) -> list[str]:
    """``print(...)  # text`` lines at the top level of a python block: the text each must print."""
    return [ln.split("  # ", 1)[1].strip() for ln in code.splitlines()
            if ln.startswith("print(") and "  # " in ln]


def test_every_example_is_run_or_says_why_not():
    seen = 0
    for doc in DOCS:
        for b in blocks(doc):
            if b.lang not in ("bash", "sh", "python"):
                continue
            seen += 1
            if b.skip is None:
                continue
            assert b.skip.strip(), b.where
            assert not re.search(r"^distckpt |\bimport distckpt|\bfrom distckpt", b.text, re.M), (
                f"{b.where}: a block with distckpt commands must run in the docs test")
    assert seen >= 12


# ---------------------------------------------------------------- the quickstart, as documented
def _substitute(text: str, endpoint: str) -> str:
    return text.replace(DOC_ENDPOINT, endpoint)


@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, s3):
    """A fresh checkout-like directory where launch/README.md's CPU block ran: ``output/quickstart``."""
    root = tmp_path_factory.mktemp("docs")
    for d in ("examples", "launch"):
        (root / d).symlink_to(REPO / d)
    (root / "configs").mkdir()
    for cfg in (REPO / "configs").glob("*.yaml"):
        (root / "configs" / cfg.name).write_text(_substitute(cfg.read_text(), s3.endpoint))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("DISTCKPT_COMM_TIMEOUT", None)
    runnable = [b for b in blocks("launch/README.md") if b.lang == "bash" and b.skip is None]
    assert len(runnable) == 1, [b.where for b in runnable]
    outputs = []
    for argv in commands(runnable[0]):
        argv = [sys.executable if a == "python" else a for a in argv]
        res = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, (argv, res.stdout[-3000:], res.stderr[-3000:])
        outputs.append((argv, res.stdout, res.stderr))
    return root, outputs


def _cli(capsys, argv: list[str], where: str) -> str:
    from distckpt.cli import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage error
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 0, (where, argv, out, err)
    assert "error:" not in err, (where, argv, err)
    return out


def _run_blocks(doc: str, root: Path, endpoint: str, capsys, monkeypatch) -> list[str]:
    monkeypatch.chdir(root)
    ran = []
    for b in blocks(doc):
        if b.lang not in ("bash", "sh", "python") or b.skip is not None:
            continue
        if b.lang == "python":
            code = _substitute(b.text, endpoint)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(code, b.where, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own README
            printed = [ln.strip() for ln in buf.getvalue().splitlines()]
            assert printed == expected_prints(code), (b.where, printed)
        else:
            for argv in commands(b):
                assert argv[0] == "distckpt", f"{b.where}: README bash examples are distckpt commands: {argv}"
                _cli(capsys, [_substitute(a, endpoint) for a in argv[1:]], b.where)
        ran.append(b.where)
    return ran


def test_readme_examples_run_against_the_quickstart(quickstart, s3, capsys, monkeypatch):
    """Item 25: every distckpt command and library example in README.md, as written."""
    root, _ = quickstart
    ran = _run_blocks("README.md", root, s3.endpoint, capsys, monkeypatch)
    assert len(ran) >= 8, ran
    # what the examples promise is what they made
    out = root / "output"
    assert sorted(p.name for p in (out / "native_tp2").iterdir()) == ["rank_0", "rank_1", "strategy.ckpt"]
    assert (out / "model").is_dir() and any(out.glob("model/mindspore_model-00001-of-0000*.ckpt"))
    full = distckpt.load(out / "quickstart" / "ckpt")
    for other in (out / "model.safetensors", out / "from_native.ckpt", out / "split_tp4", out / "shards",
                  out / "lib" / "model.ckpt", out / "lib" / "saved", f"s3://{BUCKET}/quickstart/cli"):
        opts = {"client_kwargs": {"endpoint_url": s3.endpoint}} if str(other).startswith("s3://") else None
        got = distckpt.load(other, storage_options=opts)
        for k in ("w1", "b1", "w2", "b2"):
            assert got[k].tobytes() == full[k].tobytes(), (other, k)
    assert (out / "w2.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_help_examples_run(quickstart, s3, capsys, monkeypatch, tmp_path):
    """The examples in ``distckpt --help`` and ``distckpt CMD --help`` run too (same quickstart output)."""
    from distckpt.cli import build_parser

    root, _ = quickstart
    work = tmp_path / "help"
    (work / "output").mkdir(parents=True)
    (work / "output" / "quickstart").symlink_to(root / "output" / "quickstart")
    (work / "configs").symlink_to(root / "configs")
    monkeypatch.chdir(work)
    # what the finalize and list examples say they follow: a rank-mode save, a CheckpointManager root
    tp2 = "output/quickstart/strategy_tp2.ckpt"
    for r in range(2):
        distckpt.save(distckpt.load("output/quickstart/ckpt", strategy=tp2, rank=r), "output/rank_mode",
                      strategy=tp2, rank=r)
    distckpt.CheckpointManager("output/run").save(5, distckpt.load("output/quickstart/ckpt"))
    parser = build_parser()
    texts = [parser.epilog or ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [p.epilog or "" for p in action.choices.values()]
    lines = [ln.strip() for t in texts for ln in t.splitlines() if ln.strip().startswith("distckpt ")]
    assert len(lines) >= 14, lines
    for line in lines:
        _cli(capsys, [_substitute(a, s3.endpoint) for a in shlex.split(line, comments=True)[1:]], "--help: " + line)


# ---------------------------------------------------------------- item 26
def _strategy_json_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Strategy files"):]
    section = section[:section.index("\n## ", 1)]
    return next(b.text for b in blocks("README.md") if b.lang == "json" and b.text.strip() in section)


def test_strategy_files_without_mindspores_compiler(quickstart, tmp_path):
    """Item 26: save_strategy is exported, and the README's hand-written JSON strategy is read by
    distckpt and by MindSpore alike, and loads exactly the slices the quickstart's own 2-rank file does."""
    from mindspore import build_searched_strategy

    root, _ = quickstart
    assert "save_strategy" in distckpt.__all__ and distckpt.save_strategy is not None
    hand = tmp_path / "tp2_by_hand.json"
    hand.write_text(_strategy_json_block())
    ours = distckpt.load_strategy(hand)
    written = distckpt.load_strategy(root / "output" / "quickstart" / "strategy_tp2.ckpt")
    assert set(ours.params) == set(written.params) == {"w1", "b1", "w2", "b2"}
    assert ours.world_size == 2
    ms_view = build_searched_strategy(str(hand))
    for name, spec in ours.params.items():
        assert spec.layout == written.params[name].layout, name
        assert list(ms_view[name].dev_matrix[0].dim) == list(spec.layout.dev_matrix), name
        flat = [e[0] if e else -1 for e in spec.layout.tensor_map]
        assert list(ms_view[name].tensor_map[0].dim) == flat, name
    ck = root / "output" / "quickstart" / "ckpt"
    for rank in range(2):
        a = distckpt.load(ck, strategy=hand, rank=rank)
        b = distckpt.load(ck, strategy=written, rank=rank)
        assert all(a[k].tobytes() == b[k].tobytes() for k in ("w1", "b1", "w2", "b2"))
    # a tensor_shape that contradicts the checkpoint is refused (item 3), so the example's shapes are checked
    bad = json.loads(_strategy_json_block())
    bad["parallel_layout_item"]["w1"]["tensor_shape"] = [512, 64]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(distckpt.StrategyError, match=r"\[512, 64\]"):
        distckpt.load(ck, strategy=tmp_path / "bad.json", rank=0)


# ---------------------------------------------------------------- item 27
def test_the_quickstart_says_what_it_compared(quickstart):
    """Item 27: "first loss 0.917306 vs 0.917307 -> same weights" looked wrong, and six MindSpore
    deprecation warnings (device_target) came from the quickstart's own code."""
    root, outputs = quickstart
    phases = [next(a for a in argv if a in ("train", "merge", "resume")) for argv, _, _ in outputs]
    assert phases == ["train", "merge", "resume"]
    merge_out = outputs[1][1]
    assert "bit for bit" in merge_out and "mindspore.load_checkpoint" in merge_out
    resume_out = outputs[2][1]
    success = [ln for ln in resume_out.splitlines() if ln.startswith("[resume]") and "same weights" in ln]
    assert len(success) == 1 and "bit for bit" in success[0] and "w1" in success[0], resume_out
    assert " vs " not in success[0] and "loss" not in success[0]
    assert "weights bit for bit the 4-rank job's" in resume_out
    logs = "".join(p.read_text(errors="replace") for p in (root / "output" / "quickstart" / "logs").rglob("*.log"))
    everything = logs + "".join(o + e for _, o, e in outputs)
    assert logs and "[train]" in logs
    assert "deprecat" not in everything.lower(), [ln for ln in everything.splitlines() if "eprecat" in ln][:5]
    assert "device_target" not in (REPO / "examples" / "quickstart.py").read_text().replace(
        "set_context(device_target=...) is deprecated", "")
    # launch/quickstart.sh runs the same three phases, in the same order
    script = (REPO / "launch" / "quickstart.sh").read_text()
    assert re.findall(r"examples/quickstart\.py (\w+)", script) == phases


def test_configs_are_true(quickstart):
    """Every shipped config validates, and configs/quickstart.yaml describes the quickstart that ran."""
    from distckpt.jobconfig import load_config

    root, outputs = quickstart
    for cfg in sorted((REPO / "configs").glob("*.yaml")):
        load_config(cfg)
    q = load_config(REPO / "configs" / "quickstart.yaml")
    train_argv = outputs[0][0]
    assert train_argv[train_argv.index("-n") + 1] == str(q["job"]["np"])
    assert json.loads((root / "output" / "quickstart" / "train.json").read_text())["ranks"] == q["job"]["np"]
    assert len(json.loads((root / "output" / "quickstart" / "train.json").read_text())["losses"]) == q["train"]["steps"]
    for key in (q["checkpoint"]["path"], q["strategy"]["src"], q["strategy"]["dst"]):
        assert (root / key).exists(), key
    readme = (REPO / "README.md").read_text() + (REPO / "launch" / "README.md").read_text()
    for name in re.findall(r"configs/([\w-]+\.yaml)", readme):
        assert (REPO / "configs" / name).is_file(), name
    assert not re.search(r"examples/train\.py", readme)


def test_quickstart_weights_match_the_merge(quickstart):
    """The quickstart's oracle (full weights gathered in training) equals what distckpt reads back."""
    root, _ = quickstart
    q = root / "output" / "quickstart"
    expected = np.load(q / "expected_full.npz")
    got = distckpt.load(q / "ckpt")
    for name in expected.files:
        assert got[name].tobytes() == expected[name].tobytes(), name
