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


def _config(tmp, teachers, mlp_state, name, **mlp):
    cfg = tiny_config(tmp, {"linear": teachers["linear"]}, run={"name": name}, train={"epochs": 1})
    cfg["teachers"].append({"name": "mlp", "backend": "torch", "path": str(mlp_state), "num_cpus": 0.25,
                            "module": "tests.helpers:TinyMLP", **mlp})
    return config_from_dict(cfg)


@pytest.fixture(scope="module")
def runs(ray_local, teachers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feat")
    state = save_state_teacher(tmp / "mlp.pt")
    plain = _config(tmp, teachers, state, "plain")
    rich = _config(tmp, teachers, state, "rich", features=LAYERS)
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


def test_features_only_add_columns(runs):
    """The run without features stores exactly the featureless columns of the run with them."""
    plain, rich, _, _ = runs
    _, a = _shards(plain)
    _, b = _shards(rich)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert y.drop_columns([f"feat__mlp__{layer}" for layer in LAYERS]).equals(x)
        assert not any(c.startswith("feat__") for c in x.column_names)


def test_changed_features_are_another_store(runs):
    _, rich, _, _ = runs
    other = rich.model_copy(deep=True)
    other.teachers[1].features = ["net.0"]
    with pytest.raises(DistillError, match=r"teacher 'mlp' features changed \(store \(\['net.0', 'net.1'\], 'mean'\), "
                                           r"config \(\['net.0'\], 'mean'\)\)"):
        pipeline.label(other, pipeline.prepare(other))


def test_run_with_features_trains_and_reports(runs):
    _, rich, _, _ = runs
    report = json.loads((rich.run_dir / "report.json").read_text())
    assert set(report["models"]) == {"linear", "mlp", "ensemble", "student"}
    assert report["models"]["mlp"]["accuracy"] > 0.6  # the features teacher still scores as before (chance 0.1)


def test_inspect_reports_feature_bytes(runs, capsys):
    plain, rich, _, _ = runs
    assert cli.main(["inspect", rich.store_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(info["feature_bytes_per_sample"]) == ["feat__mlp__net.0", "feat__mlp__net.1"]
    # 32 float16 values are 64 raw bytes; no dictionary + zstd keeps them under that (page headers included)
    assert all(0 < b < 64 for b in info["feature_bytes_per_sample"].values()), info["feature_bytes_per_sample"]
    assert cli.main(["inspect", rich.store_path]) == 0
    assert "features:   feat__mlp__net.0:" in capsys.readouterr().out
    assert cli.main(["inspect", plain.store_path, "--json"]) == 0
    assert "feature_bytes_per_sample" not in json.loads(capsys.readouterr().out)
