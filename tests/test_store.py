"""The label store: inputs/row groups, atomic shard writes, checksums, identity checks."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import xxhash

from orchestrator.datasets import content_ids, fingerprint, make_table
from orchestrator.errors import DistillError
from orchestrator.models import teacher_fingerprint
from orchestrator.store import (
    IDENTITY_KEYS,
    SCHEMA_VERSION,
    SOFT_COLUMN,
    LabelStore,
    ShardInfo,
    decode_teachers,
    encode_dense,
    resolve,
    teacher_column,
    to_numpy,
)

N, D, C, S = 10, 3, 4, 4  # rows, feature dim, classes, shard size -> shards of 4, 4, 2


def inputs_table(n: int = N, d: int = D, seed: int = 0) -> pa.Table:
    """A canonical table (sample_id, features, label) plus the `row` column the pipeline adds."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, C, size=n)
    table = make_table(content_ids(x), x, y)
    return table.append_column("row", pa.array(np.arange(n), pa.int64()))


def write_weights(path: Path, tag: str) -> None:
    """A real (zip-format) torch.save file whose content depends on `tag`."""
    import torch

    torch.save({"w": torch.tensor(list(tag.encode()), dtype=torch.float32)}, path)


@pytest.fixture
def teacher_files(tmp_path) -> dict[str, Path]:
    files = {}
    for name in ("a", "b"):
        files[name] = tmp_path / "teachers" / f"{name}.pt"
        files[name].parent.mkdir(exist_ok=True)
        write_weights(files[name], f"weights of {name}")
    return files


def teacher_entries(files: dict[str, Path]) -> list[dict]:
    return [{"name": n, "backend": "torch",
             "fingerprint": teacher_fingerprint({"name": n, "backend": "torch", "path": str(p)})}
            for n, p in files.items()]


def make_identity(table: pa.Table, teachers: list[dict], shard_size: int = S) -> dict:
    """The identity dict the pipeline builds (see pipeline.prepare)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": {"source": "synthetic", "fingerprint": fingerprint(table), "rows": table.num_rows,
                    "feature_dim": D},
        "teachers": teachers,
        "label_kind": "dense",
        "k": None,
        "shard_size": shard_size,
    }


def fake_labels(rows: int, names=("a", "b"), seed: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = {n: rng.normal(size=(rows, C)) for n in names}  # float64 on purpose: stored as float32
    soft = rng.dirichlet(np.ones(C), size=rows)
    return logits, soft


def label_shard(store: LabelStore, i: int) -> tuple[ShardInfo, dict[str, np.ndarray], np.ndarray]:
    inputs = store.read_inputs(i)
    logits, soft = fake_labels(inputs.num_rows, seed=i)
    return store.write_shard(i, encode_dense(inputs, logits, soft)), logits, soft


@pytest.fixture
def table() -> pa.Table:
    return inputs_table()


@pytest.fixture
def identity(table, teacher_files) -> dict:
    return make_identity(table, teacher_entries(teacher_files))


@pytest.fixture
def store(tmp_path, table, identity) -> LabelStore:
    s = LabelStore(str(tmp_path / "store"))
    s.create(identity, table)
    return s


def shard_file(store: LabelStore, i: int) -> Path:
    return Path(store.shard_path(i))


def sha(path: Path) -> str:
    """The checksum a sidecar records for this file: xxh3-128, computed here with xxhash itself."""
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(path.read_bytes())


# ---- create / inputs ------------------------------------------------------------------------


def test_create_writes_inputs_with_one_row_group_per_shard(store, tmp_path, table):
    root = tmp_path / "store"
    assert sorted(p.name for p in root.iterdir()) == ["inputs.parquet", "manifest.json"]
    meta = pq.ParquetFile(root / "inputs.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    assert pq.read_table(root / "inputs.parquet").equals(table)


def test_create_writes_manifest_with_identity(store, tmp_path, identity):
    on_disk = json.loads((tmp_path / "store" / "manifest.json").read_text())
    for key in IDENTITY_KEYS:
        assert on_disk[key] == identity[key], key
    assert on_disk["shards"] == {}
    assert isinstance(on_disk["created"], float) and on_disk["updated"] >= on_disk["created"]
    assert store.exists()
    assert not store.complete


def test_row_groups_follow_shard_size_even_for_a_chunked_table(tmp_path, teacher_files):
    t = inputs_table(11)
    chunked = pa.concat_tables([t.slice(0, 3), t.slice(3, 5), t.slice(8)])
    assert chunked.column("features").num_chunks == 3
    s = LabelStore(str(tmp_path / "st"))
    s.create(make_identity(t, teacher_entries(teacher_files), shard_size=5), chunked)
    assert [s.read_inputs(i).column("row").to_pylist() for i in range(s.num_shards)] == \
        [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]


@pytest.mark.parametrize("rows, shard_size, expected", [(10, 4, 3), (8, 4, 2), (1, 256, 1), (256, 256, 1),
                                                         (257, 256, 2), (1797, 1, 1797)])
def test_num_shards_is_ceil(rows, shard_size, expected):
    s = LabelStore("unused")
    s.manifest = {"dataset": {"rows": rows}, "shard_size": shard_size}
    assert s.num_shards == expected


@pytest.mark.parametrize("i", [0, 1, 2])
def test_read_inputs_returns_exactly_the_shard_rows(store, table, i):
    got = store.read_inputs(i)
    lo, hi = i * S, min((i + 1) * S, N)
    assert got.column("row").to_pylist() == list(range(lo, hi))
    assert got.equals(table.slice(lo, hi - lo))


# ---- shards: codec, write, read -------------------------------------------------------------


def test_encode_dense_columns_and_round_trip(store, tmp_path):
    inputs = store.read_inputs(1)
    logits, soft = fake_labels(inputs.num_rows)
    dense = encode_dense(inputs, logits, soft)
    assert dense.column_names == ["sample_id", "features", "label", "row",
                                  teacher_column("a"), teacher_column("b"), SOFT_COLUMN]
    assert teacher_column("a") == "teacher.a.logits" and SOFT_COLUMN == "soft.probs"
    assert dense.schema.field(SOFT_COLUMN).type == pa.list_(pa.float32(), C)

    store.write_shard(1, dense)
    back = store.read_shard(1)
    got = decode_teachers(back, ["a", "b"])
    assert got.dtype == np.float32 and got.shape == (2, 4, C)
    np.testing.assert_array_equal(got[0], logits["a"].astype(np.float32))
    np.testing.assert_array_equal(got[1], logits["b"].astype(np.float32))
    np.testing.assert_array_equal(decode_teachers(back, ["b"])[0], logits["b"].astype(np.float32))
    probs = to_numpy(back.column(SOFT_COLUMN))
    assert probs.dtype == np.float32
    np.testing.assert_array_equal(probs, soft.astype(np.float32))
    assert back.select(["sample_id", "features", "label", "row"]).equals(inputs)


def test_to_numpy_on_chunked_and_sliced_columns():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    t = make_table([str(i) for i in range(6)], x, np.zeros(6, dtype=np.int64))
    chunked = pa.concat_tables([t.slice(0, 2), t.slice(2)]).column("features")
    np.testing.assert_array_equal(to_numpy(chunked), x)
    np.testing.assert_array_equal(to_numpy(t.column("features").chunk(0).slice(3, 2)), x[3:5])


def test_write_shard_returns_info_and_writes_sidecar(store):
    info, _, _ = label_shard(store, 2)
    path = shard_file(store, 2)
    assert path.name == "shard-00002.parquet"
    assert info == ShardInfo(rows=2, bytes=path.stat().st_size, checksum=sha(path))
    assert json.loads(path.with_suffix(".json").read_text()) == {"rows": 2, "bytes": info.bytes, "checksum": info.checksum}


def test_no_temporary_files_left_after_writes(store, tmp_path):
    for i in range(3):
        label_shard(store, i)
    store.record_finished()
    store.save_manifest()
    all_files = sorted(p.relative_to(tmp_path / "store").as_posix() for p in (tmp_path / "store").rglob("*")
                       if p.is_file())
    assert not [f for f in all_files if ".tmp-" in f]
    assert all_files == ["inputs.parquet", "manifest.json",
                         "shards/shard-00000.json", "shards/shard-00000.parquet",
                         "shards/shard-00001.json", "shards/shard-00001.parquet",
                         "shards/shard-00002.json", "shards/shard-00002.parquet"]


# ---- finished shards and resume -------------------------------------------------------------


def test_missing_shards_are_listed(store):
    assert store.finished_shards() == {}
    info, _, _ = label_shard(store, 1)
    assert store.finished_shards() == {1: info}
    assert store.record_finished() == [0, 2]
    assert store.manifest["shards"] == {"1": {"rows": 4, "bytes": info.bytes, "checksum": info.checksum}}
    assert not store.complete
    label_shard(store, 0)
    label_shard(store, 2)
    assert store.record_finished() == []
    assert store.complete
    assert store.shard_paths() == [store.shard_path(i) for i in range(3)]


def test_record_finished_persists_to_manifest_json(store, tmp_path):
    info, _, _ = label_shard(store, 0)
    store.record_finished()
    on_disk = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert on_disk["shards"] == {"0": {"rows": 4, "bytes": info.bytes, "checksum": info.checksum}}


def test_truncated_shard_is_not_finished(store):
    for i in range(3):
        label_shard(store, i)
    path = shard_file(store, 1)
    path.write_bytes(path.read_bytes()[:-10])
    assert sorted(store.finished_shards()) == [0, 2]
    assert store.record_finished() == [1]
    assert sorted(store.finished_shards(verify=False)) == [0, 1, 2]  # without verify: sidecar is trusted


def test_altered_shard_bytes_are_not_finished(store):
    for i in range(3):
        label_shard(store, i)
    path = shard_file(store, 0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert sorted(store.finished_shards()) == [1, 2]
    assert store.record_finished() == [0]


def test_shard_without_sidecar_is_not_finished(store):
    label_shard(store, 0)
    label_shard(store, 1)
    shard_file(store, 1).with_suffix(".json").unlink()
    assert shard_file(store, 1).exists()
    assert sorted(store.finished_shards()) == [0]
    assert store.record_finished() == [1, 2]


def test_sidecar_without_shard_is_not_finished(store):
    label_shard(store, 2)
    shard_file(store, 2).unlink()
    assert store.finished_shards() == {}


def test_relabeled_shard_replaces_the_old_one(store):
    old, _, _ = label_shard(store, 0)
    store.record_finished()
    inputs = store.read_inputs(0)
    logits, soft = fake_labels(inputs.num_rows, seed=99)
    new = store.write_shard(0, encode_dense(inputs, logits, soft))
    assert new.checksum != old.checksum
    assert store.finished_shards() == {0: new}
    store.record_finished()
    np.testing.assert_array_equal(decode_teachers(store.read_shard(0), ["a"])[0], logits["a"].astype(np.float32))


def test_unreadable_sidecar_means_not_finished(store):
    label_shard(store, 0)
    label_shard(store, 1)
    shard_file(store, 1).with_suffix(".json").write_bytes(b"")  # e.g. zero-length after a crash
    assert sorted(store.finished_shards()) == [0]


def test_read_shard_refuses_checksum_mismatch_once_recorded(store):
    label_shard(store, 1)
    store.record_finished()
    path = shard_file(store, 1)
    good = path.read_bytes()
    # Altered in the footer magic, in the data, or truncated: the checksum names it (even where
    # pyarrow's parse, which runs beside the hash, fails first).
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), good[:40] + bytes([good[40] ^ 1]) + good[41:], good[:-100]):
        path.write_bytes(bad)
        with pytest.raises(DistillError) as info:
            store.read_shard(1)
        assert str(info.value) == f"store {store.uri}: shard 1 does not match its checksum; re-run `distill label`"
    path.write_bytes(good)
    assert store.read_shard(1).num_rows == 4


# ---- identity -------------------------------------------------------------------------------


def identity_error(store: LabelStore, expected: dict) -> str:
    with pytest.raises(DistillError) as info:
        store.check_identity(expected)
    msg = str(info.value)
    assert msg.startswith(f"store {store.uri} was labeled with a different setup: ")
    assert msg.endswith("Use another store.path (or run.name), or delete the store to relabel")
    assert "\n" not in msg
    return msg


def test_same_identity_is_accepted(store, identity):
    store.check_identity(identity)
    fresh = LabelStore(store.uri)
    fresh.check_identity(json.loads(json.dumps(identity)))  # as read back from JSON (tuples -> lists etc.)


def test_identity_refuses_other_dataset(store, identity, table):
    changed = inputs_table(seed=5)
    other = {**identity, "dataset": {**identity["dataset"], "fingerprint": fingerprint(changed)}}
    msg = identity_error(store, other)
    assert f"dataset.fingerprint: store '{fingerprint(table)}' vs config '{fingerprint(changed)}'" in msg
    assert "dataset.rows" not in msg


def test_identity_refuses_other_row_count(store, identity):
    msg = identity_error(store, {**identity, "dataset": {**identity["dataset"], "rows": 12}})
    assert "dataset.rows: store 10 vs config 12" in msg


def test_identity_refuses_other_teacher_set(store, identity, teacher_files, tmp_path):
    c = tmp_path / "teachers" / "c.pt"
    write_weights(c, "weights of c")
    other = teacher_entries({"a": teacher_files["a"], "c": c})
    msg = identity_error(store, {**identity, "teachers": other})
    assert "store has teachers ['a', 'b'], config has ['a', 'c']" in msg
    assert "teacher 'a'" not in msg


def test_identity_refuses_changed_teacher_weights(store, identity, teacher_files):
    write_weights(teacher_files["b"], "retrained b")
    changed = teacher_entries(teacher_files)
    assert changed[0] == identity["teachers"][0] and changed[1] != identity["teachers"][1]
    msg = identity_error(store, {**identity, "teachers": changed})
    assert "teacher 'b' weights/config changed" in msg
    assert "teacher 'a'" not in msg and "store has teachers" not in msg


def test_identity_refuses_other_shard_size(store, identity):
    msg = identity_error(store, {**identity, "shard_size": 8})
    assert "shard_size: store 4 vs config 8" in msg


def test_identity_lists_every_difference(store, identity):
    msg = identity_error(store, {**identity, "shard_size": 8, "label_kind": "topk", "k": 3})
    assert "label_kind: store 'dense' vs config 'topk'" in msg
    assert "k: store None vs config 3" in msg
    assert "shard_size: store 4 vs config 8" in msg


def test_reordered_teachers_are_accepted_or_explained(store, identity):
    reordered = {**identity, "teachers": identity["teachers"][::-1]}
    try:
        store.check_identity(reordered)
    except DistillError as e:
        reason = str(e).split("different setup: ", 1)[1].split(". Use another", 1)[0]
        assert reason.strip(), f"no reason given: {e}"


# ---- summary, reopen, resolve ---------------------------------------------------------------


def test_summary_of_partly_labeled_store(store, identity):
    empty = store.summary()
    assert (empty["rows"], empty["bytes"], empty["shards"], empty["columns"]) == (0, 0, "0/3", [])
    i0, _, _ = label_shard(store, 0)
    i2, _, _ = label_shard(store, 2)
    store.record_finished()
    s = store.summary()
    assert s["store"] == store.uri
    assert s["rows"] == 6
    assert s["expected_rows"] == 10
    assert s["shards"] == "2/3"
    assert s["bytes"] == i0.bytes + i2.bytes
    assert s["label_kind"] == "dense"
    assert s["num_classes"] is None  # not part of this identity
    assert s["teachers"] == identity["teachers"]
    cols = dict(c.split(": ", 1) for c in s["columns"])
    assert list(cols) == ["sample_id", "features", "label", "row", "teacher.a.logits", "teacher.b.logits",
                          "soft.probs"]
    assert (cols["sample_id"], cols["label"], cols["row"]) == ("string", "int64", "int64")
    assert cols["features"].startswith("fixed_size_list<") and cols["features"].endswith(": float>[3]")
    for name in ("teacher.a.logits", "teacher.b.logits", "soft.probs"):
        assert cols[name].startswith("fixed_size_list<") and cols[name].endswith(": float>[4]")


def test_reopened_store_reads_the_same_manifest(store, identity):
    label_shard(store, 1)
    store.record_finished()
    fresh = LabelStore(store.uri)
    assert fresh.manifest is None
    assert fresh.exists()
    assert fresh.load_manifest() == store.manifest
    assert fresh.num_shards == 3
    assert sorted(fresh.finished_shards()) == [1]
    assert fresh.summary()["shards"] == "1/3"
    assert fresh.read_inputs(2).column("row").to_pylist() == [8, 9]


def test_unreadable_manifest_is_a_distill_error(store, tmp_path):
    (tmp_path / "store" / "manifest.json").write_text("{not json")
    with pytest.raises(DistillError) as info:
        LabelStore(store.uri).load_manifest()
    msg = str(info.value)
    assert msg.startswith(f"store {store.uri}: manifest.json unreadable (")
    assert msg.endswith("delete the store to relabel")


def test_store_does_not_exist_before_create(tmp_path):
    assert not LabelStore(str(tmp_path / "nothing")).exists()


def test_resolve_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("runs/exp/store")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == os.path.join(str(tmp_path), "runs", "exp", "store")
    assert os.path.isabs(path)


def test_resolve_file_uri(tmp_path):
    fs, path = resolve(f"file://{tmp_path}/store")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/store"


def test_relative_store_writes_under_cwd(tmp_path, monkeypatch, table, identity):
    monkeypatch.chdir(tmp_path)
    s = LabelStore("rel/store")
    s.create(identity, table)
    assert (tmp_path / "rel" / "store" / "manifest.json").is_file()
    assert s.inputs_path == str(tmp_path / "rel" / "store" / "inputs.parquet")
