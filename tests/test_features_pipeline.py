"""Teacher features end to end on real Ray / Serve / Train: a run whose `mlp` teacher stores two of
its layers beside its logits, next to the same run without features."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator import cli, pipeline
from orchestrator.config import config_from_dict
from orchestrator.datasets import features_of
from orchestrator.errors import DistillError
from orchestrator.features import decode_feature
from orchestrator.models import ClassifierTeacher
from orchestrator.store import LabelStore
from tests.helpers import save_state_teacher, tiny_config

pytestmark = pytest.mark.slow
LAYERS = ["net.0", "net.1"]


def _config(tmp, teachers, mlp_state, bert_dir, name, mlp=None, bert=None):
    cfg = tiny_config(tmp, {"linear": teachers["linear"]}, run={"name": name}, train={"epochs": 1})
    cfg["teachers"] += [
        {"name": "mlp", "backend": "torch", "path": str(mlp_state), "num_cpus": 0.25, "module": "tests.helpers:TinyMLP",
         **(mlp or {})},
        {"name": "bert", "backend": "hf", "path": str(bert_dir), "num_cpus": 0.25, "weight": 0.1, **(bert or {})}]
    return config_from_dict(cfg)


def _bert(path):
    """A random 2-layer BERT classifier reading the digits' pixel values (0..16) as token ids."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=17, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=64, num_labels=10)
    BertForSequenceClassification(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(ray_local, teachers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feat")
    state, bert = save_state_teacher(tmp / "mlp.pt"), _bert(tmp / "bert")
    plain = _config(tmp, teachers, state, bert, "plain")
    rich = _config(tmp, teachers, state, bert, "rich", mlp={"features": LAYERS}, bert={"features": [0, 2], "pool": "none"})
    pipeline.label(plain, pipeline.prepare(plain))
    out = pipeline.run(rich)  # label, train, evaluate: the extra columns must not disturb the rest
    return plain, rich, state, out


def _shards(cfg):
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    return store, [pq.read_table(p) for p in store.shard_paths()]


def test_stored_features_are_the_teachers_layers(runs):
    _, rich, state, _ = runs
    store, shards = _shards(rich)
    mlp = next(t for t in store.manifest["teachers"] if t["name"] == "mlp")
    assert (mlp["features"], mlp["pool"]) == (LAYERS, "mean")
    teacher = ClassifierTeacher({"name": "mlp", "backend": "torch", "path": str(state), "module": "tests.helpers:TinyMLP",
                                 "features": LAYERS})
    for shard in shards:
        direct = teacher.forward_features(features_of(shard))["features"]
        for layer in LAYERS:
            stored = decode_feature(shard, "mlp", layer)
            assert stored.dtype == np.float16 and stored.shape == (shard.num_rows, 32)
            np.testing.assert_allclose(stored.astype(np.float32), direct[layer], rtol=2e-3, atol=2e-3)  # float16
        assert not any(c.startswith("feat__linear") for c in shard.column_names)


def test_stored_token_level_hidden_states_of_the_hf_teacher(runs):
    """pool: none keeps [64 tokens, 8] per sample through Serve, the store and back."""
    _, rich, _, _ = runs
    _, shards = _shards(rich)
    bert = rich.teachers[2].model_dump()
    teacher = ClassifierTeacher(bert)
    shard = shards[0]
    direct = teacher.forward_features(features_of(shard))["features"]
    for layer in ("0", "2"):
        stored = decode_feature(shard, "bert", layer)
        assert stored.dtype == np.float16 and stored.shape == (shard.num_rows, 64, 8)
        np.testing.assert_allclose(stored.astype(np.float32), direct[layer], rtol=2e-3, atol=2e-3)


def test_features_only_add_columns(runs):
    """The run without features stores exactly the featureless columns of the run with them."""
    plain, rich, _, _ = runs
    _, a = _shards(plain)
    _, b = _shards(rich)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert y.drop_columns([*(f"feat__mlp__{layer}" for layer in LAYERS), "feat__bert__0", "feat__bert__2"]).equals(x)
        assert not any(c.startswith("feat__") for c in x.column_names)


def test_changed_features_are_another_store(runs):
    _, rich, _, _ = runs
    other = rich.model_copy(deep=True)
    other.teachers[1].features = ["net.0"]  # mlp
    with pytest.raises(DistillError, match=r"teacher 'mlp' features changed \(store \(\['net.0', 'net.1'\], 'mean'\), "
                                           r"config \(\['net.0'\], 'mean'\)\)"):
        pipeline.label(other, pipeline.prepare(other))


def test_run_with_features_trains_and_reports(runs):
    _, rich, _, _ = runs
    report = json.loads((rich.run_dir / "report.json").read_text())
    assert set(report["models"]) == {"linear", "mlp", "bert", "ensemble", "student"}
    assert report["models"]["mlp"]["accuracy"] > 0.6  # the features teacher still scores as before (chance 0.1)


def test_inspect_reports_feature_bytes(runs, capsys):
    plain, rich, _, _ = runs
    assert cli.main(["inspect", rich.store_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    fb = info["feature_bytes_per_sample"]
    assert sorted(fb) == ["feat__bert__0", "feat__bert__2", "feat__mlp__net.0", "feat__mlp__net.1"]
    # 32 float16 values are 64 raw bytes, 64 x 8 are 1024; no dictionary + zstd keeps them under that
    assert 0 < fb["feat__mlp__net.0"] < 64 and 0 < fb["feat__mlp__net.1"] < 64 and 0 < fb["feat__bert__2"] < 1024, fb
    assert cli.main(["inspect", rich.store_path]) == 0
    assert "features:   feat__mlp__net.0:" in capsys.readouterr().out
    assert cli.main(["inspect", plain.store_path, "--json"]) == 0
    assert "feature_bytes_per_sample" not in json.loads(capsys.readouterr().out)


def test_reensemble_keeps_the_stored_features(runs):
    _, rich, _, _ = runs
    _, before = _shards(rich)
    other = rich.model_copy(deep=True)
    other.ensemble.temperature = 3.0
    pipeline.label(other, pipeline.prepare(other), reensemble=True)  # no teacher runs
    _, after = _shards(other)
    for x, y in zip(before, after):
        for c in [c for c in x.column_names if c.startswith("feat__")]:
            assert y.column(c).equals(x.column(c)) and y.schema.field(c).metadata == x.schema.field(c).metadata
        assert not y.column("soft.probs").equals(x.column("soft.probs"))
    pipeline.label(rich, pipeline.prepare(rich), reensemble=True)  # back, for the other tests


def test_unknown_module_is_one_line_naming_teacher_and_module(runs, tmp_path):
    _, rich, _, _ = runs
    bad = rich.model_copy(deep=True)
    bad.teachers[1].features = ["net.7"]
    bad.store.path = str(tmp_path / "store")
    with pytest.raises(DistillError) as e:
        pipeline.label(bad, pipeline.prepare(bad))
    msg = str(e.value)
    assert "teacher 'mlp'" in msg and "no module 'net.7' for features" in msg and "\n" not in msg
