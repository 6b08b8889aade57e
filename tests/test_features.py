"""Teacher features (teachers[].features): capture in the teacher's forward, checks, the float16
store columns, the fingerprint, and a store without features unchanged to the byte. No Ray."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import xxhash

from orchestrator.config import config_from_dict
from orchestrator.errors import DistillError
from orchestrator.feature_capture import pool_tokens
from orchestrator.features import (SHAPE_KEY, check_features, concat_outputs, decode_feature, encode_features,
                                   feature_column, split_output)
from orchestrator.models import ClassifierTeacher, teacher_fingerprint
from orchestrator.soft_labels import build_shard, stored_outputs
from orchestrator.store import SOFT_COLUMN, LabelStore, teacher_column
from tests.helpers import TinyMLP, save_script, save_state_teacher, train_tiny
from tests.test_store import inputs_table, make_identity

X = np.random.default_rng(0).integers(0, 17, size=(5, 64)).astype(np.float32)  # digits-like rows


@pytest.fixture(scope="module")
def state_file(tmp_path_factory) -> Path:
    return save_state_teacher(tmp_path_factory.mktemp("t") / "mlp.pt")


def torch_cfg(path, **kw) -> dict:
    return {"name": "mlp", "backend": "torch", "path": str(path), "module": "tests.helpers:TinyMLP", **kw}


# ---- capture in the teacher's forward ---------------------------------------------------------

def test_torch_teacher_features_are_the_hooked_module_outputs(state_file):
    teacher = ClassifierTeacher(torch_cfg(state_file, features=["net.0", "net.1"]))
    out = teacher.forward_features(X)
    np.testing.assert_array_equal(out["logits"], teacher(X))  # the same logits as without features
    # by hand: net.0 is W0 (x / 16) + b0, net.1 its ReLU
    sd = torch.load(state_file)
    h0 = (torch.from_numpy(X) / 16) @ sd["net.0.weight"].T + sd["net.0.bias"]
    np.testing.assert_allclose(out["features"]["net.0"], h0.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["features"]["net.1"], h0.clamp_min(0).numpy(), rtol=1e-5, atol=1e-5)
    assert list(out["features"]) == ["net.0", "net.1"] and out["features"]["net.0"].shape == (5, 32)


def test_torch_teacher_bad_features_are_one_line_errors(state_file, tmp_path):
    with pytest.raises(DistillError, match=r"^teacher 'mlp': no module 'net.9' for features \(modules: net, net.0"):
        ClassifierTeacher(torch_cfg(state_file, features=["net.9"]))
    script = save_script(train_tiny(0, seed=1, steps=1), tmp_path / "s.pt")
    with pytest.raises(DistillError, match=r"^teacher 'lin': features by module name need a `module"):
        ClassifierTeacher({"name": "lin", "backend": "torch", "path": str(script), "features": ["net"]})


def test_layers_are_checked_before_any_deployment(state_file, hf_dir):
    from orchestrator.feature_capture import check_layers

    check_layers(torch_cfg(state_file, features=["net.0", "net.2"]))
    with pytest.raises(DistillError, match=r"^teacher 'mlp': no module 'net.7' for features \(modules: net, net.0"):
        check_layers(torch_cfg(state_file, features=["net.7"]))
    with pytest.raises(DistillError, match=r"^teacher 'mlp': cannot build tests.helpers:NoSuch to check its features"):
        check_layers(torch_cfg(state_file, module="tests.helpers:NoSuch", features=["net.0"]))
    check_layers({"name": "b", "backend": "hf", "path": str(hf_dir), "features": [0, 2, -3]})
    with pytest.raises(DistillError, match=r"^teacher 'b': features index -4 out of range"):
        check_layers({"name": "b", "backend": "hf", "path": str(hf_dir), "features": [-4]})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=17, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=64, num_labels=10)
    path = tmp_path_factory.mktemp("hf") / "bert"
    BertForSequenceClassification(cfg).eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("pool", ["cls", "mean", "none"])
def test_hf_teacher_hidden_states_pooled(hf_dir, pool):
    from transformers import AutoModelForSequenceClassification

    teacher = ClassifierTeacher({"name": "bert", "backend": "hf", "path": str(hf_dir), "features": [0, -1], "pool": pool})
    out = teacher.forward_features(X)
    ref = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hs = ref(input_ids=torch.from_numpy(X).long(), output_hidden_states=True).hidden_states
    for key, h in (("0", hs[0]), ("-1", hs[-1])):
        want = {"cls": h[:, 0], "mean": h.mean(1), "none": h}[pool].numpy()
        np.testing.assert_allclose(out["features"][key], want, rtol=1e-4, atol=1e-5)
    assert out["features"]["0"].shape == ((5, 64, 8) if pool == "none" else (5, 8))
    np.testing.assert_array_equal(out["logits"], teacher(X))
    with pytest.raises(DistillError, match=r"^teacher 'bert': features index 3 out of range: the model has 3 hidden"):
        ClassifierTeacher({"name": "bert", "backend": "hf", "path": str(hf_dir), "features": [3]})


def test_pool_tokens_hand_values():
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])  # [1, 3, 2]
    assert pool_tokens(x, "cls").tolist() == [[1.0, 2.0]]
    assert pool_tokens(x, "mean", torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 4.0]]  # padding left out
    assert pool_tokens(x, "none").shape == (1, 3, 2)
    assert pool_tokens(x[:, 0], "mean").tolist() == [[1.0, 2.0]]  # [B, D]: as it is


# ---- Serve's batching and the labeler's checks --------------------------------------------------

def test_split_and_concat_outputs_are_inverse():
    out = {"logits": np.arange(10.0).reshape(5, 2), "features": {"a": np.arange(15.0).reshape(5, 3)}}
    parts = split_output(out, np.array([2, 3]))
    assert [len(p["logits"]) for p in parts] == [2, 1, 2] and parts[2]["features"]["a"].tolist() == [[9, 10, 11], [12, 13, 14]]
    joined = concat_outputs(parts)
    np.testing.assert_array_equal(joined["features"]["a"], out["features"]["a"])
    np.testing.assert_array_equal(concat_outputs([out["logits"][:2], out["logits"][2:]]), out["logits"])


def test_check_features_refuses_bad_answers():
    good = {"net.0": np.zeros((4, 3), np.float32)}
    check_features("t", good, ["net.0"], 4, 0)
    cases = [
        ({}, r"returned features \[\] for teachers\[\].features \['net.0'\]"),
        ({"net.0": np.zeros((3, 3))}, r"shape \[3, 3\] for 4 rows"),
        ({"net.0": np.array([[0, 0, 0]] * 3 + [[0, np.nan, 0]])}, r"NaN/Inf .* in 1 rows of shard 0 \(first: row 3\)"),
        ({"net.0": np.array([[0, 0, 0]] * 3 + [[7e4, 0, 0]])}, r"beyond float16's range"),
    ]
    for feats, msg in cases:
        with pytest.raises(DistillError, match=msg):
            check_features("t", feats, ["net.0"], 4, 0)


# ---- the store columns -------------------------------------------------------------------------

def manifest(features: bool) -> dict:
    teachers = [{"name": "a", "backend": "torch", "fingerprint": "f"},
                {"name": "b", "backend": "torch", "fingerprint": "g", **({"features": ["h", 2], "pool": "none"} if features else {})}]
    return {"teachers": teachers, "label_kind": "dense", "k": None,
            "ensemble": {"mode": "mean_prob", "temperature": 2.0, "tau": 1.0, "weights": {"a": 1.0, "b": 1.0}}}


def outputs(rows: int, features: bool) -> dict:
    rng = np.random.default_rng(7)
    out = {n: rng.normal(size=(rows, 4)).astype(np.float32) for n in ("b", "a")}
    if features:
        out["b"] = {"logits": out["b"], "features": {"h": rng.normal(size=(rows, 3)).astype(np.float32),
                                                     "2": rng.normal(size=(rows, 2, 3)).astype(np.float32)}}
    return out


def test_feature_columns_are_float16_after_the_labels_and_round_trip():
    inputs = inputs_table(6)
    table, _ = build_shard(inputs, outputs(6, True), manifest(True))
    names = table.column_names
    assert names[-5:-2] == [teacher_column("a"), teacher_column("b"), SOFT_COLUMN]
    assert names[-2:] == [feature_column("b", "h"), feature_column("b", 2)] and names[-3] == SOFT_COLUMN
    assert table.schema.field("feat__b__2").type == pa.list_(pa.float16(), 6)
    assert json.loads(table.schema.field("feat__b__2").metadata[SHAPE_KEY]) == [2, 3]
    want = outputs(6, True)["b"]["features"]
    np.testing.assert_array_equal(decode_feature(table, "b", "2"), want["2"].astype(np.float16))
    np.testing.assert_array_equal(decode_feature(table, "b", "h"), want["h"].astype(np.float16))


def test_without_feature_columns_the_shard_is_the_featureless_one(tmp_path):
    """Features only add columns: the rest of the shard (schema, values, bytes) is unchanged."""
    inputs = inputs_table(6)
    plain, _ = build_shard(inputs, outputs(6, False), manifest(False))
    rich, _ = build_shard(inputs, outputs(6, True), manifest(True))
    assert rich.drop_columns(["feat__b__h", "feat__b__2"]).equals(plain)
    store = LabelStore(str(tmp_path / "s"))
    a = store.write_shard(0, plain)
    b = store.write_shard(1, rich.drop_columns(["feat__b__h", "feat__b__2"]).replace_schema_metadata(plain.schema.metadata))
    assert a.checksum == b.checksum


def test_reensemble_keeps_features_byte_identical():
    """stored_outputs -> build_shard (distill label --reensemble) gives the shard back exactly."""
    inputs = inputs_table(6)
    table, _ = build_shard(inputs, outputs(6, True), manifest(True))
    again, _ = build_shard(*stored_outputs(table, manifest(True)), manifest(True))
    assert again.equals(table) and again.schema.equals(table.schema, check_metadata=True)


def test_fingerprint_and_identity_unchanged_without_features(state_file):
    base = torch_cfg(state_file)
    fp = teacher_fingerprint(base)
    assert teacher_fingerprint({**base, "features": [], "pool": "mean"}) == fp
    with_f = teacher_fingerprint({**base, "features": ["net.0"], "pool": "mean"})
    assert with_f != fp and with_f != teacher_fingerprint({**base, "features": ["net.0"], "pool": "cls"})
    from orchestrator.prepare import teacher_identities

    cfg = {"dataset": {"source": "sklearn:digits"}, "teachers": [base, {**base, "name": "b", "features": ["net.1"]}]}
    ids = teacher_identities(config_from_dict(cfg))
    dumped = {**base, "kwargs": {}}  # as the config gives it
    assert ids[0] == {"name": "b", "backend": "torch", "fingerprint": teacher_fingerprint({**dumped, "features": ["net.1"]}),
                      "features": ["net.1"], "pool": "mean"}
    assert ids[1] == {"name": "mlp", "backend": "torch", "fingerprint": teacher_fingerprint(dumped)}  # no features key


def test_config_refuses_misplaced_features(state_file):
    def err(**teacher):
        with pytest.raises(DistillError) as e:
            config_from_dict({"dataset": {"source": "sklearn:digits"}, "teachers": [torch_cfg(state_file, **teacher)]})
        return str(e.value)

    assert "features: backend torch takes module names (strings), got 2" in err(features=[2])
    assert "pool: applies with features only" in err(pool="cls")
    assert "features: listed twice" in err(features=["net.0", "net.0"])
    with pytest.raises(DistillError, match="features: a TorchScript teacher takes no forward hooks"):
        config_from_dict({"dataset": {"source": "sklearn:digits"},
                          "teachers": [{"name": "s", "backend": "torch", "path": "s.pt", "features": ["net"]}]})
    with pytest.raises(DistillError, match="features: backend hf takes hidden-state indices"):
        config_from_dict({"dataset": {"source": "sklearn:digits"},
                          "teachers": [{"name": "h", "backend": "hf", "path": "x", "features": ["net.0"]}]})


def test_store_refuses_other_features_naming_them(tmp_path, state_file):
    table = inputs_table()
    t = {"name": "mlp", "backend": "torch", "fingerprint": "x", "features": ["net.0"], "pool": "mean"}
    store = LabelStore(str(tmp_path / "s"))
    store.create(make_identity(table, [t]), table)
    with pytest.raises(DistillError, match=r"teacher 'mlp' features changed \(store \(\['net.0'\], 'mean'\), "
                                           r"config \(\['net.1'\], 'mean'\)\)"):
        store.check_identity(make_identity(table, [{**t, "fingerprint": "y", "features": ["net.1"]}]))


def test_inspect_reports_feature_bytes_per_sample(tmp_path):
    table = inputs_table(6)
    store = LabelStore(str(tmp_path / "s"))
    ident = make_identity(table, manifest(True)["teachers"], shard_size=6)
    store.create({**ident, "ensemble": manifest(True)["ensemble"]}, table)
    store.write_shard(0, build_shard(table, outputs(6, True), {**store.manifest})[0])
    store.record_finished()
    fb = store.summary()["feature_bytes_per_sample"]
    assert sorted(fb) == ["feat__b__2", "feat__b__h"] and all(b > 0 for b in fb.values())
    plain = LabelStore(str(tmp_path / "p"))
    plain.create({**make_identity(table, manifest(False)["teachers"], 6), "ensemble": manifest(False)["ensemble"]}, table)
    plain.write_shard(0, build_shard(table, outputs(6, False), plain.manifest)[0])
    plain.record_finished()
    assert "feature_bytes_per_sample" not in plain.summary()


def test_feature_columns_are_written_without_dictionary_in_zstd(tmp_path):
    import pyarrow.parquet as pq

    store = LabelStore(str(tmp_path / "s"))
    inputs = inputs_table(6)
    store.write_shard(0, build_shard(inputs, outputs(6, True), manifest(True))[0])
    meta = pq.ParquetFile(store.shard_path(0)).metadata
    cols = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    feat, logits = cols["feat__b__h.list.element"], cols["teacher.a.logits.list.element"]
    assert feat.compression == "ZSTD" and "RLE_DICTIONARY" not in feat.encodings
    assert logits.compression == "SNAPPY" and "RLE_DICTIONARY" in logits.encodings  # the rest as before


# ---- a store without features is today's, byte for byte -----------------------------------------

# xxh3-128 of the shard and inputs files of `_golden_store`, computed with the code on main before
# teachers[].features existed (commit bcfc80a: this function run with PYTHONPATH=/work/main).
GOLDEN = {"inputs": "4310838a0620df0280b49be8d9b753e8", "shard": "9d6acc09f5f9caf45d67f8d22568986b"}


def _golden_store(root: Path) -> dict:
    table = inputs_table(6)
    store = LabelStore(str(root))
    store.create({**make_identity(table, manifest(False)["teachers"], 6), "ensemble": manifest(False)["ensemble"]}, table)
    store.write_shard(0, build_shard(table, outputs(6, False), store.manifest)[0])
    read = lambda p: xxhash.xxh3_128_hexdigest(Path(p).read_bytes())  # noqa: E731
    return {"inputs": read(store.inputs_path), "shard": read(store.shard_path(0))}


def test_store_without_features_is_byte_identical_to_before(tmp_path):
    assert _golden_store(tmp_path / "s") == GOLDEN
