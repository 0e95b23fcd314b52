"""distckpt.codecs.mindformers against MindFormers 1.9's own checkpoints, writers and loader.

* Real checkpoints (``tests/mfckpt.py``: MindFormers' own ``save_checkpoint`` replayed rank by
  rank) -- plain and balanced, DP2xMP2, MP4 and standalone, fp32/bf16/int32, model and opt --
  are parsed with the codec and reassembled with distckpt's own safetensors header reader and
  numpy only; every tensor equals, bit for bit, both what the fixture saved and what
  MindFormers' ``load_checkpoint`` merges in standalone mode.
* What the codec writes is MindFormers' own form: re-describing a real checkpoint reproduces its
  ``metadata.json`` exactly, and metadata we write for other cuts (an even grid, a layout with
  an optimizer shard) is accepted by ``load_metadata`` and loaded exactly by ``load_checkpoint``.
* Tracker, iteration directories, file names and ``common.json`` agree with MindFormers' own
  functions; hostile inputs raise FormatError naming the file and the problem; hypothesis
  fuzzes the metadata parser and the ``storage_data`` key grammar.

MindFormers writes ``./output/log`` into the working directory, so every test runs in a
temporary one.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mfckpt import COMMON, make_mf_checkpoint, mf_load_standalone

from distckpt.codecs import mindformers as mf
from distckpt.codecs.safetensors import read_safetensors_header
from distckpt.dtypes import to_numpy
from distckpt.errors import FormatError
from distckpt.layout import Box, TensorLayout

MULTI = [("dp2mp2", False), ("dp2mp2", True), ("mp4", False), ("mp4", True)]
CASES = MULTI + [("standalone", False)]
ITERATION = 30


@pytest.fixture(scope="module")
def mfcwd(tmp_path_factory):
    """cwd in a temporary directory for the whole module (MindFormers logs to ./output)."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("mfcwd"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def built(mfcwd, tmp_path_factory):
    """Checkpoints built so far in this module, by case: each is written and merged once."""
    cache: dict = {}

    def get(layout: str, balanced: bool) -> SimpleNamespace:
        if (layout, balanced) not in cache:
            root = tmp_path_factory.mktemp(f"mf-{layout}-{'balanced' if balanced else 'plain'}")
            full = make_mf_checkpoint(root, layout=layout, balanced=balanced, iteration=ITERATION, seed=3)
            specs = {n: (a.shape, _dtype_name(a)) for n, a in full.items()}
            cache[layout, balanced] = SimpleNamespace(
                root=root,
                dir=root / mf.iteration_dir(ITERATION),
                layout=layout,
                balanced=balanced,
                full=full,
                specs=specs,
                oracle=mf_load_standalone(root, specs),
            )
        return cache[layout, balanced]

    return get


def _case_id(case) -> str:
    return f"{case[0]}-{'balanced' if case[1] else 'plain'}"


@pytest.fixture(params=CASES, ids=_case_id)
def ckpt(request, built):
    """A real MindFormers checkpoint (any case), its saved tensors and MindFormers' own merge of it."""
    return built(*request.param)


@pytest.fixture(params=MULTI, ids=_case_id)
def multi(request, built):
    """A real multi-rank MindFormers checkpoint (it has metadata.json)."""
    return built(*request.param)


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == np.dtype(ml_dtypes.bfloat16) else str(a.dtype)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _read(path: Path, name: str) -> np.ndarray:
    """One tensor of a safetensors file, read with distckpt's header reader and numpy only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        entries, meta = read_safetensors_header(f, size=size, name=str(path))
        assert meta == {"format": "ms"}
        (e,) = [e for e in entries if e.name == name]
        data = b""
        for off, n in e.segments:
            f.seek(off)
            data += f.read(n)
    return np.frombuffer(data, dtype=to_numpy(e.dtype)).reshape(e.shape)


def _entries(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    with open(path, "rb") as f:
        entries, _ = read_safetensors_header(f, size=path.stat().st_size, name=str(path))
    return [(e.name, e.dtype, e.shape) for e in entries]


def _names_in(path: Path) -> list[str]:
    return [name for name, _, _ in _entries(path)]


def _reassemble(dir_: Path, md: mf.MFMetadata) -> dict[str, np.ndarray]:
    out = {}
    for t in md.tensors:
        arr = np.zeros(t.shape, to_numpy(t.dtype))
        for c in t.chunks:
            copies = [_read(dir_ / s.file_name, t.name) for s in c.storage]
            for piece in copies:  # every replica a plain save lists holds the same bytes
                assert piece.shape == c.box.sizes and _same(piece, copies[0])
            arr[tuple(slice(o, o + n) for o, n in zip(c.box.offsets, c.box.sizes))] = copies[0]
        out[t.name] = arr
    return out


def _metadata(ckpt) -> tuple[bytes, mf.MFMetadata]:
    raw = (ckpt.dir / mf.METADATA).read_bytes()
    return raw, mf.parse_metadata(raw, where=str(ckpt.dir / mf.METADATA))


# --------------------------------------------------------------------------- real checkpoints


def test_reassembled_tensors_equal_mindformers_load_and_the_saved_arrays(ckpt):
    assert mf.parse_tracker((ckpt.root / mf.TRACKER).read_bytes()) == ITERATION
    assert ckpt.dir.is_dir()
    if ckpt.layout == "standalone":
        assert not (ckpt.dir / mf.METADATA).exists()  # world size 1: no metadata.json
        md = mf.standalone_metadata({f.name: _entries(f) for f in sorted(ckpt.dir.glob("*.safetensors"))})
    else:
        _, md = _metadata(ckpt)
    assert {t.name for t in md.tensors} == set(ckpt.full)
    got = _reassemble(ckpt.dir, md)
    assert sorted(got) == sorted(ckpt.full) == sorted(ckpt.oracle)
    dtypes = {_dtype_name(a) for a in got.values()}
    assert {"float32", "bfloat16", "int32"} <= dtypes
    for name, arr in got.items():
        assert _same(arr, ckpt.full[name]), name
        assert _same(arr, ckpt.oracle[name]), name


def test_file_names_kinds_and_balance(ckpt):
    files = sorted(p.name for p in ckpt.dir.glob("*.safetensors"))
    parsed = {f: mf.parse_file_name(f) for f in files}
    assert all(p is not None and p.prefix is None for p in parsed.values()), files
    for f, p in parsed.items():
        assert mf.file_name(p.kind, p.file_index, p.file_count) == f
        for name in _names_in(ckpt.dir / f):  # MindFormers' opt rule, by names only
            assert mf.is_optimizer_state(name) == (p.kind == "opt"), (f, name)
    for kind in mf.KINDS:  # i numbers the files of a kind, n counts them
        ps = sorted((p.file_index, p.file_count) for p in parsed.values() if p.kind == kind)
        assert ps == [(i, len(ps)) for i in range(len(ps))]
    if ckpt.layout == "standalone":
        assert files == [mf.file_name("model", 0, 1), mf.file_name("opt", 0, 1)]
        return
    _, md = _metadata(ckpt)
    assert set(md.files) == set(files)
    for t in md.tensors:
        assert t.layout is not None
        for c in t.chunks:
            if ckpt.balanced:  # each slice written once, by a rank that holds it
                assert len(c.storage) == 1 and c.storage[0].storage_rank in c.storage[0].rank_group
            else:  # every holder wrote its copy into its own file
                assert sorted(s.storage_rank for s in c.storage) == sorted(c.storage[0].rank_group)
                assert [mf.parse_file_name(s.file_name).file_index for s in c.storage] == [
                    s.storage_rank for s in c.storage
                ]


def test_layouts_match_mindformers_slicing(multi):
    """Every rank's box under the parsed layout is the area MindFormers' own rule gives it."""
    ckpt = multi
    from mindformers.checkpoint.reshard import infer_slice_area_by_rank
    from mindformers.checkpoint.sharded_tensor import _get_global_offset_and_replica_id_from_layout
    from mindspore.parallel import Layout

    _, md = _metadata(ckpt)
    for t in md.tensors:
        d = t.mf_layout.to_json()
        for pos, rank in enumerate(t.mf_layout.rank_list):
            area = infer_slice_area_by_rank(d["device_matrix"], d["tensor_map"], pos, t.shape)
            assert t.layout.box(rank, t.shape) == Box(tuple(a for a, _ in area), tuple(b - a for a, b in area))
        # slice indices and replica ids as MindFormers computes them from the same Layout
        lay = Layout(tuple(d["device_matrix"]), tuple(d["alias_name"]))
        names = {len(d["alias_name"]) - 1 - i: a for i, a in enumerate(d["alias_name"])}
        tm = [names.get(e, "None") for e in d["tensor_map"]]
        offsets, replica = _get_global_offset_and_replica_id_from_layout(lay(*tm))
        assert tuple(offsets) == t.mf_layout.slice_indices()
        assert tuple(replica) == t.replica_id


def test_common_json_is_parsed(ckpt):
    common = mf.parse_common((ckpt.dir / mf.COMMON).read_bytes())
    assert common == mf.MFCommon(step_num=ITERATION, global_step=ITERATION, **COMMON)


# --------------------------------------------------------------------------- writing metadata


def test_redescribing_reproduces_mindformers_metadata_exactly(multi):
    """describe_tensor + dump_metadata from the parsed facts == MindFormers' own metadata.json."""
    raw, md = _metadata(multi)
    assert json.loads(mf.dump_metadata(md)) == json.loads(raw)
    again = [
        mf.describe_tensor(
            t.name,
            t.dtype,
            t.shape,
            [mf.StoredChunk(c.box, s.file_name, s.storage_rank) for c in t.chunks for s in c.storage],
            layout=t.mf_layout,
        )
        for t in md.tensors
    ]
    assert json.loads(mf.dump_metadata(again)) == json.loads(raw)
    assert mf.parse_metadata(mf.dump_metadata(again)) == md


def _save_files(dir_: Path, files: dict[str, dict[str, np.ndarray]]) -> None:
    import mindspore as ms
    from mfckpt import _ms_tensor

    for fname, tensors in files.items():
        ms.save_checkpoint(
            [{"name": n, "data": _ms_tensor(a)} for n, a in tensors.items()], str(dir_ / fname), format="safetensors"
        )


def _write_checkpoint(root: Path, described: list[mf.MFTensor], files: dict, iteration: int) -> None:
    d = root / mf.iteration_dir(iteration)
    d.mkdir(parents=True)
    _save_files(d, files)
    (d / mf.METADATA).write_bytes(mf.dump_metadata(described))
    (d / mf.COMMON).write_bytes(mf.dump_common(mf.MFCommon(step_num=iteration, global_step=iteration)))
    (root / mf.TRACKER).write_bytes(mf.dump_tracker(iteration))


def _grid_cut(arr: np.ndarray) -> list[Box]:
    """Halves along dim 0 where it divides (another cut than any fixture layout), else whole."""
    if arr.ndim == 0 or arr.shape[0] % 2:
        return [Box((0,) * arr.ndim, arr.shape)]
    h = arr.shape[0] // 2
    rest = arr.shape[1:]
    return [Box((i * h,) + (0,) * len(rest), (h,) + rest) for i in range(2)]


@pytest.mark.parametrize("how", ["grid", "tensorlayout"])
def test_written_metadata_loads_exactly_in_mindformers(multi, tmp_path, how):
    """Metadata we describe and data files ms.save_checkpoint writes: MindFormers loads them exactly."""
    from mindformers.checkpoint.metadata import load_metadata

    ckpt = multi
    _, md = _metadata(ckpt)
    files: dict[str, dict[str, np.ndarray]] = {}
    described = []
    for t in md.tensors:
        arr = ckpt.full[t.name]
        kind = "opt" if mf.is_optimizer_state(t.name) else "model"
        if how == "grid":  # balanced over 3 writers: each box once, no layout given
            boxes = _grid_cut(arr)
            chunks = [mf.StoredChunk(b, mf.file_name(kind, (i + len(t.name)) % 3, 3)) for i, b in enumerate(boxes)]
            layout = None
        else:  # plain: every rank of the parsed TensorLayout writes its box
            chunks = [mf.StoredChunk(t.layout.box(r, t.shape), mf.file_name(kind, r, 4), r) for r in range(4)]
            layout = t.layout
        for c in chunks:
            sl = tuple(slice(o, o + n) for o, n in zip(c.box.offsets, c.box.sizes))
            files.setdefault(c.file_name, {})[t.name] = arr[sl]
        described.append(mf.describe_tensor(t.name, t.dtype, t.shape, chunks, layout=layout))
    _write_checkpoint(tmp_path, described, files, 7)
    metas, storage = load_metadata(str(tmp_path / mf.iteration_dir(7) / mf.METADATA))
    assert sorted(metas) == sorted(ckpt.full)
    assert len(storage) == sum(len(t.chunks) for t in described)
    got = mf_load_standalone(tmp_path, ckpt.specs)
    for name, arr in ckpt.full.items():
        assert _same(got[name], arr), name


def test_optimizer_shard_layout_is_written_as_a_nested_map(mfcwd, tmp_path):
    """A TensorLayout with a parallel-optimizer shard: MindFormers reads our nested Layout exactly."""
    rng = np.random.default_rng(5)
    full = {
        "w": rng.standard_normal((8, 6)).astype(np.float32),
        "adam_m.w": rng.standard_normal((8, 6)).astype(ml_dtypes.bfloat16),
    }
    tl = TensorLayout((2, 2), ((-1,), (0,)), opt_shard_step=2, opt_shard_size=2)  # dim 0 over axis 0 (optimizer)
    files: dict[str, dict[str, np.ndarray]] = {}
    described = []
    for name, arr in full.items():
        kind = "opt" if mf.is_optimizer_state(name) else "model"
        chunks = [mf.StoredChunk(tl.box(r, arr.shape), mf.file_name(kind, r, 4), r) for r in range(4)]
        for c in chunks:
            files.setdefault(c.file_name, {})[name] = arr[
                tuple(slice(o, o + n) for o, n in zip(c.box.offsets, c.box.sizes))
            ]
        t = mf.describe_tensor(name, _dtype_name(arr), arr.shape, chunks, layout=tl)
        assert t.mf_layout.tensor_map == (1, 0) and t.axis_fragmentations == (2, 2)
        assert t.layout == TensorLayout((2, 2), ((1,), (0,)))
        assert all(t.layout.box(r, arr.shape) == tl.box(r, arr.shape) for r in range(4))
        described.append(t)
    _write_checkpoint(tmp_path, described, files, 3)
    got = mf_load_standalone(tmp_path / mf.iteration_dir(3), {n: (a.shape, _dtype_name(a)) for n, a in full.items()})
    for name, arr in full.items():
        assert _same(got[name], arr), name


def test_partial_axis_optimizer_shard_is_refused():
    tl = TensorLayout((4, 1), ((-1,), (-1,)), opt_shard_step=1, opt_shard_size=2)
    assert tl.box(1, (8, 2)) != tl.box(2, (8, 2))
    with pytest.raises(FormatError, match="cannot express"):
        mf.describe_tensor(
            "w", "float32", (8, 2), [mf.StoredChunk(tl.box(0, (8, 2)), "model-0000000-0000001.safetensors")], layout=tl
        )


def test_describe_refuses_what_mindformers_would_misread():
    box = Box((0, 0), (4, 6))
    with pytest.raises(FormatError, match="is not the slice rank 1 holds"):
        mf.describe_tensor(
            "w",
            "float32",
            (8, 6),
            [mf.StoredChunk(box, "a.safetensors", 1), mf.StoredChunk(Box((4, 0), (4, 6)), "b.safetensors")],
        )
    with pytest.raises(FormatError, match="equal slices|even slices"):
        mf.describe_tensor(
            "w",
            "float32",
            (8, 6),
            [
                mf.StoredChunk(Box((0, 0), (5, 6)), "a.safetensors"),
                mf.StoredChunk(Box((5, 0), (3, 6)), "b.safetensors"),
            ],
        )
    with pytest.raises(FormatError, match="holds a tensor once"):
        mf.describe_tensor(
            "w",
            "float32",
            (8, 6),
            [mf.StoredChunk(box, "a.safetensors"), mf.StoredChunk(Box((4, 0), (4, 6)), "a.safetensors")],
        )
    with pytest.raises(FormatError, match="equal slices"):
        mf.describe_tensor("w", "float32", (8, 6), [mf.StoredChunk(box, "a.safetensors")])
    with pytest.raises(FormatError, match="does not match shape"):
        mf.describe_tensor("w", "float32", (8, 6), [mf.StoredChunk(Box((0,), (8,)), "a.safetensors")])
    with pytest.raises(FormatError, match="listed twice"):
        mf.describe_tensor("w", "float32", (8,), [mf.StoredChunk(Box((0,), (8,)), "a.safetensors")] * 2)
    with pytest.raises(FormatError, match="storage_rank must be None or an integer"):
        mf.StoredChunk(box, "a.safetensors", -1)
    with pytest.raises(FormatError, match="cover 24 elements"):
        mf.describe_tensor(
            "w", "float32", (8, 6), [mf.StoredChunk(box, "a.safetensors")], layout=TensorLayout((2,), ((0,), (-1,)))
        )


# --------------------------------------------------------------------------- hostile metadata

WHERE = "ckpt/iteration_00000030/metadata.json"


def _valid() -> dict:
    """A small valid metadata.json (two tensors, DP2xMP2 plain save), built without MindSpore."""
    tl = TensorLayout((2, 2), ((0,), (-1,)))
    tensors = []
    for name, dtype in (("w", "float32"), ("adam_m.w", "bfloat16")):
        kind = "opt" if mf.is_optimizer_state(name) else "model"
        chunks = [mf.StoredChunk(tl.box(r, (8, 6)), mf.file_name(kind, r, 4), r) for r in range(4)]
        tensors.append(mf.describe_tensor(name, dtype, (8, 6), chunks, layout=tl))
    tensors.append(
        mf.describe_tensor("b", "int32", (6,), [mf.StoredChunk(Box((0,), (6,)), "model-0000000-0000004.safetensors")])
    )
    return json.loads(mf.dump_metadata(tensors))


def _key(name: str, k: int) -> str:
    return mf.shard_id(name, k)


def _set(path, value):
    def mutate(d):
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return d

    return mutate


def _rename_key(old, new):
    def mutate(d):
        sd = d["storage_data"]
        d["storage_data"] = {(new if k == old else k): v for k, v in sd.items()}
        return d

    return mutate


def _drop_chunk(d):
    d["state_dict_metadata"]["w"]["chunk"].pop(1)
    del d["storage_data"][_key("w", 1)]
    return d


def _dup_chunk(d):
    d["state_dict_metadata"]["w"]["chunk"].append(copy.deepcopy(d["state_dict_metadata"]["w"]["chunk"][0]))
    return d


def _uneven(d):
    t = d["state_dict_metadata"]["w"]
    t["global_shape"] = [7, 6]
    for c in t["chunk"]:
        c["local_shape"] = [3, 6]
    return d


_ENTRY = {"file_name": "model-0000000-0000004.safetensors", "storage_rank": 0, "rank_group": [0]}


def _pop(path):
    def mutate(d):
        node = d
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
        return d

    return mutate


W = ("state_dict_metadata", "w")
S0 = ("storage_data", _key("w", 0), 0)

# case -> (mutation of _valid(), regex of the problem, whether the message names tensor 'w')
HOSTILE = {
    "key-is-code": (
        _rename_key(_key("w", 0), "__import__('os').system('touch pwned')"),
        "not a MindFormers shard id",
        False,
    ),
    "key-is-call-in-tuple": (
        _rename_key(_key("w", 0), "('w', (__import__('os'),))"),
        "not a MindFormers shard id",
        False,
    ),
    "key-not-canonical": (_rename_key(_key("w", 0), "('w', (0, ))"), "canonical", False),
    "key-two-offsets": (_rename_key(_key("w", 0), "('w', (0, 0))"), "one linear slice index", False),
    "key-unknown-tensor": (_rename_key(_key("w", 0), "('x', (0,))"), "names tensor 'x'", False),
    "key-orphan-chunk": (_set(("storage_data", _key("b", 3)), [_ENTRY]), "\\[3\\] of tensor 'b'", False),
    "chunks-overlap": (_set(W + ("chunk", 0, "local_shape"), [8, 6]), "overlap", True),
    "chunk-listed-twice": (_dup_chunk, "listed twice", True),
    "chunks-leave-a-gap": (_drop_chunk, "cover 24 elements but shape", True),
    "uneven-split": (_uneven, "does not divide into 2 slices", True),
    "global-offset-out-of-range": (_set(W + ("chunk", 1, "global_offset"), [9]), "out of range", True),
    "global-offset-two-entries": (_set(W + ("chunk", 1, "global_offset"), [1, 0]), "one linear slice index", True),
    "dtype-not-mindspore": (_set(W + ("properties", "dtype"), "Float33"), "not a MindSpore dtype name", True),
    "dtype-unsupported": (_set(W + ("properties", "dtype"), "Complex64"), "not supported by distckpt", True),
    "file-name-parent": (_set(S0 + ("file_name",), "../model-0000000-0000004.safetensors"), "file_name", False),
    "file-name-absolute": (_set(S0 + ("file_name",), "/etc/passwd"), "file_name", False),
    "file-name-subdir": (_set(S0 + ("file_name",), "a/b.safetensors"), "file_name", False),
    "file-name-not-string": (_set(S0 + ("file_name",), 3), "file_name", False),
    "storage-rank-bool": (_set(S0 + ("storage_rank",), True), "storage_rank", False),
    "rank-group-string": (_set(S0 + ("rank_group",), "0,2"), "rank_group", False),
    "storage-empty": (_set(("storage_data", _key("w", 0)), []), "non-empty list", False),
    "chunk-without-storage": (_pop(("storage_data", _key("w", 1))), "no storage_data entry", True),
    "global-shape-string": (_set(W + ("global_shape",), "8,6"), "global_shape", True),
    "local-shape-float": (_set(W + ("chunk", 0, "local_shape"), [4.0, 6]), "local_shape", True),
    "local-shape-rank": (_set(W + ("chunk", 0, "local_shape"), [4]), "local_shape", True),
    "fragmentations-vs-layout": (_set(W + ("axis_fragmentations",), [1, 2]), "axis_fragmentations", True),
    "replica-id-string": (_set(W + ("properties", "replica_id"), "0"), "replica_id", True),
    "replica-id-length": (_set(W + ("properties", "replica_id"), [0, 1]), "replica_id", True),
    "device-matrix-zero": (_set(W + ("layout", "device_matrix"), [0, 2]), "device_matrix", True),
    "tensor-map-axis": (_set(W + ("layout", "tensor_map"), [5, -1]), "tensor_map", True),
    "tensor-map-twice": (_set(W + ("layout", "tensor_map"), [0, 0]), "tensor_map", True),
    "alias-name-length": (_set(W + ("layout", "alias_name"), ["d0"]), "alias_name", True),
    "rank-list-length": (_set(W + ("layout", "rank_list"), [0, 1, 2]), "rank_list", True),
    "layout-missing": (_pop(W + ("layout",)), "lacks layout", True),
    "chunk-not-list": (_set(W + ("chunk",), {"global_offset": [0]}), "chunk must be a list", True),
    "flag-not-bool": (_set(W + ("properties", "allow_to_save"), "yes"), "allow_to_save", True),
    "top-level-list": (lambda d: [d], "top level must be a JSON object", False),
    "no-storage-data": (_pop(("storage_data",)), "lacks storage_data", False),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metadata_is_refused_naming_file_and_problem(case):
    mutate, problem, names_tensor = HOSTILE[case]
    data = json.dumps(mutate(_valid())).encode()
    with pytest.raises(FormatError) as ei:
        mf.parse_metadata(data, where=WHERE)
    msg = str(ei.value)
    assert msg.startswith(WHERE + ": "), msg
    assert re.search(problem, msg), msg
    assert "\n" not in msg
    if names_tensor:
        assert "tensor 'w'" in msg, msg


@pytest.mark.parametrize(
    "data, problem",
    [
        (b'{"state_dict_metadata": {}, "storage_data": {}, "storage_data": {}}', "twice"),
        (b'{"state_dict_metadata": {"w": NaN}, "storage_data": {}}', "not valid"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100000, "not valid"),
        (b"", "not valid"),
    ],
)
def test_malformed_json_is_refused(data, problem):
    with pytest.raises(FormatError, match=problem) as ei:
        mf.parse_metadata(data, where=WHERE)
    assert str(ei.value).startswith(WHERE)


def test_standalone_metadata_refuses_a_tensor_in_two_files():
    files = {
        "model-0000000-0000002.safetensors": [("w", "float32", (2, 2))],
        "model-0000001-0000002.safetensors": [("w", "float32", (1, 2))],
    }
    with pytest.raises(
        FormatError, match="'w' appears in both 'model-0000000-0000002.safetensors' and 'model-0000001"
    ) as ei:
        mf.standalone_metadata(files, where="ckpt/iteration_00000001")
    assert str(ei.value).startswith("ckpt/iteration_00000001: ")
    with pytest.raises(FormatError, match="refusing file_name"):
        mf.standalone_metadata({"../x.safetensors": [("w", "float32", (2,))]})
    md = mf.standalone_metadata({"a.safetensors": [("s", "float32", ()), ("w", "bfloat16", (0, 3))]})
    assert [c.box for t in md.tensors for c in t.chunks] == [Box((), ()), Box((0, 0), (0, 3))]


def test_valid_metadata_round_trips_and_maps_layouts():
    md = mf.parse_metadata(json.dumps(_valid()).encode(), where=WHERE)
    assert json.loads(mf.dump_metadata(md)) == _valid()
    w = md.by_name["w"]
    assert w.dtype == "float32" and md.by_name["adam_m.w"].dtype == "bfloat16"
    assert [c.box for c in w.chunks] == [Box((0, 0), (4, 6)), Box((4, 0), (4, 6))]
    assert w.replica_id == (0, 0, 1, 1)
    assert md.by_name["b"].layout == TensorLayout((1,), ((-1,),))
    assert md.files == tuple(sorted({mf.file_name(k, r, 4) for k in mf.KINDS for r in range(4)}))


def test_permuted_rank_list_has_no_distckpt_layout():
    d = _valid()
    d["state_dict_metadata"]["w"]["layout"]["rank_list"] = [4, 5, 6, 7]  # pipeline stage 1: representable
    assert mf.parse_metadata(json.dumps(d).encode()).by_name["w"].layout == TensorLayout((2, 2), ((0,), (-1,)))
    d["state_dict_metadata"]["w"]["layout"]["rank_list"] = [1, 0, 3, 2]
    assert mf.parse_metadata(json.dumps(d).encode()).by_name["w"].layout is None


# --------------------------------------------------------------------------- fuzz

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_parse_metadata_only_raises_format_error(data):
    doc = _valid()
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = doc
        try:
            for p in path[:-1]:
                node = node[p]
            if data.draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = data.draw(_JSON)
        except (KeyError, IndexError, TypeError):
            pass
    try:
        md = mf.parse_metadata(json.dumps(doc).encode(), where=WHERE)
    except FormatError as exc:
        assert str(exc).startswith(WHERE)
    else:
        mf.parse_metadata(mf.dump_metadata(md))  # what parses also writes back


@st.composite
def _layouts(draw):
    """A random TensorLayout (nested maps included), a shape it divides, and a rank_list."""
    dm = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    ndim = draw(st.integers(0, 3))
    axes = draw(st.permutations(range(len(dm))))
    cut = sorted(draw(st.lists(st.integers(0, len(dm)), min_size=ndim, max_size=ndim)))
    used = draw(st.integers(0, len(dm)))
    tm = []
    for d in range(ndim):
        lo, hi = cut[d], cut[d + 1] if d + 1 < ndim else used
        tm.append(tuple(axes[lo:hi]) if lo < hi else (-1,))
    tl = TensorLayout(dm, tuple(tm))
    shape = tuple(k * draw(st.integers(0, 2)) for k in tl.splits)
    start = draw(st.integers(0, 3)) * tl.device_num
    return tl, shape, tuple(range(start, start + tl.device_num))


@settings(max_examples=300, deadline=None)
@given(_layouts(), st.booleans())
def test_describe_dump_parse_round_trip_any_layout(case, with_layout):
    tl, shape, ranks = case
    chunks = [
        mf.StoredChunk(tl.box(r, shape), mf.file_name("model", r % tl.device_num, tl.device_num), r) for r in ranks
    ]
    if not with_layout:  # boxes only: one virtual rank per distinct slice, each written once
        uniq = sorted({c.box for c in chunks}, key=lambda b: b.offsets)
        chunks = [mf.StoredChunk(b, f"f{i}.safetensors") for i, b in enumerate(uniq)]
    t = mf.describe_tensor("w", "bfloat16", shape, chunks, layout=tl if with_layout else None, rank_list=ranks)
    again = mf.parse_metadata(mf.dump_metadata([t])).by_name["w"]
    assert again == t
    assert t.layout is not None
    if with_layout:
        assert all(t.layout.box(r, shape) == tl.box(r, shape) for r in ranks)
        assert sorted(s.storage_rank for c in t.chunks for s in c.storage) == list(ranks)
        assert all(c.box == tl.box(s.storage_rank, shape) for c in t.chunks for s in c.storage)
    else:
        assert {c.box for c in t.chunks} == {tl.box(r, shape) for r in ranks}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_parse_metadata_on_bytes(blob):
    try:
        mf.parse_metadata(blob, where=WHERE)
    except FormatError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3).map(tuple))
def test_shard_id_grammar_round_trips_python_reprs(name, offsets):
    assert mf.parse_shard_id(str((name, offsets))) == (name, offsets)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=60), st.text(alphabet="()'\", 0123456789x\\-_", max_size=40)))
def test_shard_id_grammar_refuses_everything_else(key):
    try:
        name, offsets = mf.parse_shard_id(key)
    except FormatError:
        return
    assert str((name, offsets)) == key


@pytest.mark.parametrize(
    "key",
    ["('w', (0,)) ", "('w', 0)", "('w',)", "['w', [0]]", "('w', (0,), 1)", "(\"w\", (0,))", "('w', (0x1,))",
     "('w', (+1,))", "('w', (1_0,))", "('\\N{DIGIT ONE}', (0,))", "f'{1}'", "('w' 'x', (0,))"],
)  # fmt: skip
def test_shard_id_refusals(key):
    with pytest.raises(FormatError, match="shard id"):
        mf.parse_shard_id(key)


# --------------------------------------------------------------------------- tracker, names, common


def test_tracker_agrees_with_mindformers(mfcwd, tmp_path):
    from mindformers.checkpoint.utils import get_checkpoint_iter_dir, get_latest_iteration_from_tracker

    for n in (0, 7, 10**8, mf.MAX_ITERATION):
        (tmp_path / mf.TRACKER).write_bytes(mf.dump_tracker(n))
        (tmp_path / mf.iteration_dir(n)).mkdir()
        assert get_latest_iteration_from_tracker(str(tmp_path)) == n
        assert mf.parse_tracker(mf.dump_tracker(n)) == n
        assert os.path.basename(get_checkpoint_iter_dir(str(tmp_path), n)) == mf.iteration_dir(n)
        assert mf.parse_iteration_dir(mf.iteration_dir(n)) == n
    assert mf.dump_tracker(30) == b"30"
    assert mf.parse_tracker(b" 30\n") == 30  # MindFormers strips whitespace too


@pytest.mark.parametrize(
    "data, problem",
    [(b"", "not an iteration"), (b"abc", "not an iteration"), (b"-5", "negative"), (b"1_000", "not an iteration"),
     (b"+3", "not an iteration"), (b"3.0", "not an iteration"), (b"9" * 30, "exceeds"), (b"\xff", "not ASCII"),
     (b"1" * 100, "bytes"), ("٣".encode(), "not ASCII"), (b"3 4", "not an iteration")],
)  # fmt: skip
def test_tracker_refusals(data, problem):
    with pytest.raises(FormatError, match=problem) as ei:
        mf.parse_tracker(data, where="root/latest_checkpointed_iteration.txt")
    assert str(ei.value).startswith("root/latest_checkpointed_iteration.txt: ")


@pytest.mark.parametrize("bad", [-1, True, 2**63, 1.0, "3"])
def test_dump_tracker_refuses_non_iterations(bad):
    with pytest.raises(FormatError):
        mf.dump_tracker(bad)


@pytest.mark.parametrize(
    "name",
    [
        "iteration_1",
        "iteration_0000001x",
        "xiteration_00000001",
        "iteration_000000001",
        "iteration_",
        "iteration_-0000001",
    ],
)
def test_iteration_dir_refusals(name):
    assert mf.parse_iteration_dir(name) is None


def test_file_names_agree_with_get_checkpoint_name(mfcwd):
    from mindformers.checkpoint.utils import FileType, get_checkpoint_name

    for prefix in (None, "CKP", "", "a-model"):
        for kind, ft in (("model", FileType.MODEL), ("opt", FileType.OPTIMIZER)):
            for i, n in ((0, 1), (3, 4), (12, 10**7 + 1)):
                want = get_checkpoint_name(None, prefix, i, n, ft) + ".safetensors"
                assert mf.file_name(kind, i, n, prefix) == want
                assert mf.parse_file_name(want) == (prefix, kind, i, n)


@pytest.mark.parametrize(
    "name",
    ["model-1-4.safetensors", "model-0000004-0000004.safetensors", "model-0000000-0000004.ckpt", "weights.safetensors",
     "model-00000001-0000004.safetensors", "Model-0000000-0000004.safetensors", "model-0000000-0000000.safetensors"],
)  # fmt: skip
def test_file_name_refusals(name):
    assert mf.parse_file_name(name) is None


def test_common_json_is_byte_identical_to_mindformers(mfcwd, tmp_path):
    from mindformers.checkpoint.checkpoint import CommonInfo

    for fields in (
        dict(epoch_num=2, step_num=30, global_step=30, loss_scale=1024.0, global_batch_size=8, ckpt_status=0),
        dict(epoch_num=1, global_step=5),  # what the PyNative callback leaves null
        dict(loss_scale=float("nan"), ckpt_status=1),
    ):
        path = tmp_path / f"common{len(fields)}.json"
        CommonInfo(**fields).save_common(str(path))
        assert mf.dump_common(mf.MFCommon(**fields)) == path.read_bytes()
        got = mf.parse_common(path.read_bytes())
        assert json.dumps(got.__dict__) == json.dumps(mf.MFCommon(**fields).__dict__)
        assert CommonInfo.load_common(str(path)).__dict__.keys() == got.__dict__.keys()


@pytest.mark.parametrize(
    "data, problem",
    [(b'{"epoch_num": 1, "extra": 2}', "unknown field"), (b'{"epoch_num": "2"}', "epoch_num"),
     (b'{"global_step": true}', "global_step"), (b'{"step_num": -1}', "step_num"), (b'{"ckpt_status": 5}', "ckpt_status"),
     (b'{"loss_scale": "1"}', "loss_scale"), (b'{"epoch_num": 1, "epoch_num": 2}', "twice"), (b"[]", "JSON object"),
     (b"{", "not valid")],
)  # fmt: skip
def test_common_refusals(data, problem):
    with pytest.raises(FormatError, match=problem) as ei:
        mf.parse_common(data, where="it/common.json")
    assert str(ei.value).startswith("it/common.json: ")


def test_dtype_names_are_mindsporees_own(mfcwd):
    from mindspore.common.dtype import all_types

    assert mf.MS_DTYPES == tuple(str(d) for d in all_types)
    for name in ("float32", "bfloat16", "int32", "int8", "uint64", "bool", "float16", "float64", "float8_e4m3fn"):
        assert mf.dtype_from_ms(mf.ms_dtype_name(name)) == name
        assert mf.dtype_from_ms(mf.ms_dtype_name(name).lower()) == name  # as case-insensitive as load_metadata


@pytest.mark.parametrize("opt_name", ["AdamW", "FusedAdamW", "Came", "PmaAdamW", "FusedPmaAdamW"])
def test_optimizer_state_names_follow_mindformers_optimizers(mfcwd, opt_name):
    import mindformers.core.optim as optim
    import mindspore as ms
    from mfckpt import _cell

    net = _cell(
        {
            n: ms.Tensor(np.zeros((4, 4), np.float32))
            for n in ("model.layers.0.attention.wq.weight", "model.norm.weight")
        }
    )
    for p in net.get_parameters():
        p.requires_grad = True
    opt = getattr(optim, opt_name)(net.trainable_params(), learning_rate=1e-3)
    model_keys = set(net.parameters_dict())
    for name in opt.parameters_dict():  # MindFormers' rule: opt file = optimizer params not in the network
        assert mf.is_optimizer_state(name) == (name not in model_keys), name
        assert mf.is_optimizer_state(name, model_keys) == (name not in model_keys), name
