"""distckpt.naming: the names distckpt writes are recognised, and only those."""

from __future__ import annotations

from distckpt import naming


def test_data_files_markers_and_manifests_carry_their_save_id():
    sid = naming.new_save_id()
    assert naming.SAVE_ID.match(sid)
    data = naming.data_file(sid, 7)
    assert naming.is_data_file(data) and naming.save_id_of(data) == sid
    marker = naming.save_marker(sid)
    assert naming.is_save_marker(marker) and naming.save_id_of(marker) == sid
    assert naming.rank_of_manifest(naming.manifest_file(12)) == 12
    for other in ("data-train-00000-of-00002.safetensors", "data-x-00001.safetensors", ".manifest-1.json",
                  "model.safetensors", f"{data}.tmp", "../" + data):
        assert not naming.is_data_file(other) and not naming.is_manifest(other), other
        assert naming.save_id_of(other) is None


def test_mindspore_and_hf_names():
    assert naming.rank_file(3, "checkpoint_", "ckpt") == "rank_3/checkpoint_3.ckpt"
    assert naming.RANK_DIR.match("rank_12") and not naming.RANK_DIR.match("rank_1x")
    assert naming.strategy_file(8) == "ckpt_strategy_rank_8.ckpt" and naming.STRATEGY_FILE.match("strategy.ckpt")
    assert naming.shard_file("model", 2, 5, "safetensors") == "model-00002-of-00005.safetensors"
    m = naming.SHARD_FILE.match("mindspore_model-00001-of-00003.ckpt")
    assert m and m.group("stem") == "mindspore_model" and m.group("ext") == "ckpt"
    assert naming.weight_index_file("model", "safetensors") == "model.safetensors.index.json"
