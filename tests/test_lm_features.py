"""LM teacher features (teachers[].features with task lm): the positions kept, the teacher's
answer, the store columns, the collate, and an LM store without features unchanged to the byte.
No Ray."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import xxhash

from actors.lm_batch import LMBatch
from orchestrator.datasets import token_table
from orchestrator.features import SHAPE_KEY, feature_column
from orchestrator.instruct import example_table, rows_of
from orchestrator.lm_features import (concat_answers, decode_lm_feature, dense_positions, gather_student, keep_positions,
                                      split_answer)
from orchestrator.models import CausalLMTeacher
from orchestrator.soft_labels import build_shard, stored_outputs
from orchestrator.store import SCHEMA_VERSION, LabelStore, topk_columns

K, V, L = 4, 50, 6


# ---- which positions are kept ------------------------------------------------------------------

def test_keep_positions_hand_values():
    h = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)  # [B=2, L=4, D=2]: h[b, t] = (8b+2t, 8b+2t+1)
    sel = torch.tensor([[False, True, True], [True, False, False]])  # labeled positions (of L-1 = 3)
    got = keep_positions(h, sel, "none", windows=False)
    assert got.dtype == torch.float16 and got.tolist() == [[2, 3], [4, 5], [8, 9]]  # row order, position t < L-1
    assert keep_positions(h, sel, "mean", windows=False).tolist() == [[3, 4], [8, 9]]  # (2+4)/2, (3+5)/2; row 1: t=0
    assert keep_positions(h, sel, "cls", windows=False).tolist() == [[0, 1], [8, 9]]
    win = keep_positions(h, torch.ones(2, 3, dtype=torch.bool), "none", windows=True)
    assert win.shape == (2, 3, 2) and win[1, 2].tolist() == [12, 13]  # the last position (t = L-1) is never kept
    # the student's side, gathered at the same positions and pooled the same way
    assert gather_student(h, sel, "none").tolist() == [[2, 3], [4, 5], [8, 9]]
    assert gather_student(h, sel, "mean").tolist() == [[3, 4], [8, 9]]
    assert gather_student(h, sel, "cls").tolist() == [[0, 1], [8, 9]]


def test_split_and_concat_answers_are_inverse():
    ids, lps = np.arange(5 * K).reshape(5, K), -np.arange(5 * K, dtype=np.float32).reshape(5, K)
    per_token = {"1": np.arange(10, dtype=np.float16).reshape(5, 2)}  # 5 labeled positions
    parts = split_answer((ids, lps, per_token), np.array([2]), np.array([3]), per_token=True)
    assert [p[0].shape[0] for p in parts] == [3, 2] and [p[2]["1"].shape[0] for p in parts] == [3, 2]
    back = concat_answers(parts)
    assert all(np.array_equal(a, b) for a, b in zip(back[:2], (ids, lps))) and np.array_equal(back[2]["1"], per_token["1"])
    pooled = {"1": np.zeros((3, 2), np.float16)}  # 3 rows, pooled: cut at the row boundary, not the position one
    parts = split_answer((ids, lps, pooled), np.array([2]), np.array([3]), per_token=False)
    assert [p[2]["1"].shape[0] for p in parts] == [2, 1]
    assert len(split_answer((ids, lps), np.array([2]), np.array([3]), True)[0]) == 2  # no features: as before


def test_dense_positions_fills_the_labeled_positions_in_row_order():
    sel = np.array([[False, True, True], [True, False, False]])
    dense = dense_positions(np.arange(6, dtype=np.float16), sel, [-1, 2])
    assert dense.shape == (2, 3, 2) and dense[0, 0].tolist() == [0, 0]
    assert dense[0, 1].tolist() == [0, 1] and dense[0, 2].tolist() == [2, 3] and dense[1, 0].tolist() == [4, 5]
    assert dense_positions(np.arange(4, dtype=np.float16), sel, [2]).tolist() == [[0, 1], [2, 3]]


# ---- the teacher's answer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("lm") / "t"
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _packed_rows() -> np.ndarray:
    ids = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    pos = np.array([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 0]])
    return np.stack([ids, pos, mask], axis=1)


@pytest.mark.parametrize("packed", [False, True])
def test_teacher_features_are_its_hidden_states_at_the_labeled_positions(lm_dir, packed):
    teacher = CausalLMTeacher({"name": "t", "path": str(lm_dir), "features": [1, -1], "pool": "none"}, K)
    rows = _packed_rows() if packed else np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    ids, lps, feats = teacher.forward_features(rows)
    want_ids, want_lps = teacher(rows)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(lps, want_lps, atol=1e-6)
    x = torch.from_numpy(rows[:, 0] if packed else rows)
    kw = {"position_ids": torch.from_numpy(rows[:, 1]), "use_cache": False} if packed else {}
    with torch.no_grad():
        hs = teacher.model(input_ids=x, output_hidden_states=True, **kw).hidden_states
    sel = torch.from_numpy(rows[:, 2, 1:].astype(bool)) if packed else torch.ones(2, L - 1, dtype=torch.bool)
    assert sorted(feats) == ["-1", "1"] and all(f.dtype == np.float16 for f in feats.values())
    for key, i in (("1", 1), ("-1", 2)):
        want = hs[i][:, :-1][sel] if packed else hs[i][:, :-1]
        assert feats[key].shape == tuple(want.shape)  # [N = 5, D] packed; [B, L-1, D] windows
        np.testing.assert_allclose(feats[key].astype(np.float32), want.numpy(), atol=2e-3, rtol=2e-3)


def test_teacher_refuses_a_layer_it_lacks(lm_dir):
    from orchestrator.errors import DistillError

    with pytest.raises(DistillError, match=r"teacher 't': features index 3 out of range: the model has 3 hidden states"):
        CausalLMTeacher({"name": "t", "path": str(lm_dir), "features": [3], "pool": "none"}, K)


# ---- the store -------------------------------------------------------------------------------------

def _manifest(features: bool, pool: str = "none") -> dict:
    teachers = [{"name": "a", "backend": "hf", "fingerprint": "fa"},
                {"name": "b", "backend": "hf", "fingerprint": "fb", **({"features": [1], "pool": pool} if features else {})}]
    return {"label_kind": "topk", "k": K, "teachers": teachers, "lm": {"vocab_size": V, "max_len": L},
            "ensemble": {"mode": "mean_prob", "temperature": 2.0, "tau": 1.0, "weights": {"a": 1.0, "b": 1.0}}}


def _inputs(packed: bool):
    rows = _packed_rows()
    table = example_table(rows[:, 0], rows[:, 1], rows[:, 2]) if packed else token_table(rows[:, 0].astype(np.int32))
    import pyarrow as pa

    return table.append_column("row", pa.array(np.arange(2), pa.int64()))


def _outputs(inputs, features: bool, pool: str = "none", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = rows_of(inputs)
    n = int(rows[:, 2, 1:].sum()) if rows.ndim == 3 else None
    shape = (n,) if n is not None else (2, L - 1)
    out = {}
    for name in ("a", "b"):
        ids = np.stack([rng.permutation(V)[:K] for _ in range(int(np.prod(shape)))]).reshape(*shape, K).astype(np.int32)
        lps = np.sort(np.log(rng.dirichlet(np.ones(V), size=int(np.prod(shape)))[:, :K]), axis=1)[:, ::-1]
        out[name] = (ids, lps.reshape(*shape, K).astype(np.float32))
    if features:
        f = rng.normal(size=(*shape, 3) if pool == "none" else (2, 3)).astype(np.float16)
        out["b"] = (*out["b"], {"1": f})
    return out


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("pool", ["none", "mean"])
def test_feature_columns_follow_the_topk_and_round_trip(packed, pool):
    inputs = _inputs(packed)
    outs = _outputs(inputs, True, pool)
    table, _ = build_shard(inputs, outs, _manifest(True, pool))
    plain, _ = build_shard(inputs, _outputs(inputs, False), _manifest(False))
    assert table.column_names[-1] == feature_column("b", 1) and table.drop_columns(["feat__b__1"]).equals(plain)
    shape = json.loads(table.schema.field("feat__b__1").metadata[SHAPE_KEY])
    assert shape == ([-1, 3] if packed else [L - 1, 3]) if pool == "none" else shape == [3]
    np.testing.assert_array_equal(decode_lm_feature(table, "b", 1), outs["b"][2]["1"])
    # distill label --reensemble: the stored outputs give the same shard back, features and all
    again, _ = build_shard(*stored_outputs(table, _manifest(True, pool)), _manifest(True, pool))
    assert again.equals(table) and again.schema.equals(table.schema, check_metadata=True)
    # the train collate puts each stored vector back at its position
    cols = ["input_ids", *(["position_ids", "loss_mask"] if packed else []), *topk_columns("soft")]
    batch = LMBatch(cols, K, {"feat__b__1": shape})(table)
    f = batch["feat__b__1"]
    if pool == "none":
        assert f.shape == (2, L - 1, 3)
        np.testing.assert_array_equal(f[batch["sel"]].numpy(), outs["b"][2]["1"].reshape(-1, 3))
        assert not f[~batch["sel"]].any()
    else:
        assert f.shape == (2, 3)


def test_inspect_reports_feature_bytes_per_token(tmp_path):
    inputs = _inputs(True)
    store = LabelStore(str(tmp_path / "s"))
    store.create({**_identity(inputs, _manifest(True)), "ensemble": _manifest(True)["ensemble"],
                  "lm": {"vocab_size": V, "max_len": L}}, inputs)
    store.write_shard(0, build_shard(inputs, _outputs(inputs, True), store.manifest)[0])
    store.record_finished()
    info = store.summary()
    per_sample, per_token = info["feature_bytes_per_sample"]["feat__b__1"], info["feature_bytes_per_token"]["feat__b__1"]
    assert per_token == pytest.approx(per_sample * 2 / 5)  # 2 rows, 5 labeled positions


# ---- an LM store without features is today's, byte for byte ----------------------------------------

def _identity(inputs, manifest: dict) -> dict:
    from orchestrator.datasets import fingerprint

    return {"schema_version": SCHEMA_VERSION, "dataset": {"source": "synthetic", "fingerprint": fingerprint(inputs),
            "rows": inputs.num_rows, "max_len": L}, "teachers": manifest["teachers"], "label_kind": "topk", "k": K,
            "shard_size": 2}


def _golden_lm_store(root: Path, packed: bool) -> dict:
    inputs = _inputs(packed)
    m = _manifest(False)
    store = LabelStore(str(root))
    store.create({**_identity(inputs, m), "ensemble": m["ensemble"], "lm": m["lm"]}, inputs)
    store.write_shard(0, build_shard(inputs, _outputs(inputs, False), store.manifest)[0])
    read = lambda p: xxhash.xxh3_128_hexdigest(Path(p).read_bytes())  # noqa: E731
    return {"inputs": read(store.inputs_path), "shard": read(store.shard_path(0))}


# xxh3-128 of `_golden_lm_store`'s files, computed with the code on main before LM features existed
# (this function run with PYTHONPATH=/work/main at commit d48839b).
GOLDEN_LM = {
    False: {"inputs": "a7c7d8325672953477ad954cc1121abd", "shard": "89887d7ec8c2462de5a98fe500f57c36"},
    True: {"inputs": "82c76a420e42ad1918b6fd9251660837", "shard": "bf19adb8808c58a146fd60bd8ed12827"},
}


@pytest.mark.parametrize("packed", [False, True])
def test_lm_store_without_features_is_byte_identical_to_before(tmp_path, packed):
    assert _golden_lm_store(tmp_path / "s", packed) == GOLDEN_LM[packed]
    assert pq.ParquetFile(LabelStore(str(tmp_path / "s")).shard_path(0)).schema_arrow.names[-1].endswith("logprobs")


def test_lm_feature_columns_are_written_byte_stream_split_in_zstd(tmp_path):
    inputs = _inputs(False)
    store = LabelStore(str(tmp_path / "s"))
    store.write_shard(0, build_shard(inputs, _outputs(inputs, True), _manifest(True))[0])
    meta = pq.ParquetFile(store.shard_path(0)).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    feat = cols["feat__b__1.list.element"]
    assert feat.compression == "ZSTD" and "BYTE_STREAM_SPLIT" in feat.encodings and "RLE_DICTIONARY" not in feat.encodings
