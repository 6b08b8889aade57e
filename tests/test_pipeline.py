"""End to end on real Ray (local cluster), Serve, Data and Train, with tiny real teachers."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import pipeline, training
from orchestrator.config import config_from_dict
from orchestrator.ensemble import ensemble_dense
from orchestrator.errors import DistillError
from orchestrator.store import SOFT_COLUMN, LabelStore, decode_teachers, to_numpy
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(ray_local, teachers, tmp_path_factory):
    """One full run (label, train KD + hard baseline, eval) that several tests inspect."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = config_from_dict(tiny_config(tmp, teachers, eval={"baseline": True}, train={"epochs": 3}))
    return cfg, pipeline.run(cfg)


def _store_table(cfg):
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    return store, pq.ParquetDataset(store.shard_paths()).read()


def test_store_has_every_sample_once_with_all_columns(finished_run):
    cfg, _ = finished_run
    prep = pipeline.prepare(cfg)
    store, table = _store_table(cfg)
    ids = table.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == prep.train.num_rows
    assert set(ids) == set(prep.train.column("sample_id").to_pylist())
    assert sorted(table.column("row").to_pylist()) == list(range(prep.train.num_rows))
    for col in ("teacher.linear.logits", "teacher.mlp.logits", SOFT_COLUMN, "features", "label"):
        assert col in table.column_names
    soft = to_numpy(table.column(SOFT_COLUMN))
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    # The soft column is exactly the configured ensemble of the stored teacher logits.
    expect = ensemble_dense(decode_teachers(table, ["linear", "mlp"]), mode="mean_prob", temperature=2.0)
    np.testing.assert_allclose(soft, expect, rtol=1e-5)
    assert store.manifest["num_classes"] == 10 and store.complete


def test_report_shape_and_student_quality(finished_run):
    cfg, out = finished_run
    report = json.loads((cfg.run_dir / "report.json").read_text())
    assert report["run"] == "tiny" and report["task"] == "classification"
    assert set(report["models"]) == {"linear", "mlp", "ensemble", "student", "student_hard"}
    for m in report["models"].values():
        assert isinstance(m["accuracy"], float) and isinstance(m["nll"], float) and isinstance(m["params"], int)
    assert report["models"]["student"]["accuracy"] > 0.6  # chance is 0.1
    assert report["models"]["ensemble"]["params"] == report["models"]["linear"]["params"] + report["models"]["mlp"]["params"]
    for png in report["plots"]:
        assert (cfg.run_dir / png).stat().st_size > 1000
    assert "| student |" in (cfg.run_dir / "report.md").read_text()
    assert len(report["curves"]["student"]) == 3


@pytest.mark.parametrize("rows", [None, 100])  # train.max_samples unset / 100
def test_both_train_read_paths_give_the_stores_rows(finished_run, rows, monkeypatch):
    """train.read_in_driver_mb picks a driver read (from_arrow) or streaming read_parquet:
    both must hand training exactly the store's first `rows` rows, in store order."""
    cfg, _ = finished_run
    store, table = _store_table(cfg)
    rows = rows or table.num_rows
    cols = ["row", "features", SOFT_COLUMN]
    got = {}
    import ray.data

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx.execution_options, "preserve_order", True)  # as train's DataConfig sets it
    for path, mb in (("driver", 1e6), ("streamed", 0)):
        ds = training.train_dataset(store, cols, rows, mb)
        got[path] = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    expect = table.select(cols).slice(0, rows)
    for path, t in got.items():
        assert t.column_names == cols, path
        assert t.column("row").to_pylist() == list(range(rows)), path  # store order, first rows
        assert t.equals(expect), path


def test_relabel_of_finished_store_calls_no_teacher(finished_run, monkeypatch):
    cfg, _ = finished_run
    import actors.teacher

    def no_deploy(*a, **k):
        raise AssertionError("a finished store must not deploy teachers")

    monkeypatch.setattr(actors.teacher, "deploy", no_deploy)  # a spy: fails the test if called
    store, _ = _store_table(cfg)
    before = {p: open(p, "rb").read() for p in store.shard_paths()}
    pipeline.label(cfg, pipeline.prepare(cfg))
    assert {p: open(p, "rb").read() for p in before} == before


def test_changed_ensemble_is_refused_then_reensembled_without_teachers(finished_run, monkeypatch):
    cfg, _ = finished_run
    import actors.teacher

    monkeypatch.setattr(actors.teacher, "deploy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("deployed")))
    changed = cfg.model_copy(deep=True)
    changed.ensemble.mode = "best_teacher"
    prep = pipeline.prepare(changed)
    with pytest.raises(DistillError, match=r"ensemble settings differ.*mode: store 'mean_prob' vs config 'best_teacher'.*--reensemble"):
        pipeline.label(changed, prep)
    pipeline.label(changed, prep, reensemble=True)
    _, table = _store_table(changed)
    logits = decode_teachers(table, ["linear", "mlp"])
    expect = ensemble_dense(logits, mode="best_teacher", temperature=2.0, labels=table.column("label").to_numpy())
    np.testing.assert_allclose(to_numpy(table.column(SOFT_COLUMN)), expect, rtol=1e-5)
    # Back to the original so the other tests see the store they expect.
    pipeline.label(cfg, pipeline.prepare(cfg), reensemble=True)


def test_reordered_teachers_resume_to_the_same_bytes(finished_run, tmp_path):
    """One teacher order everywhere: a shard relabeled under a config that lists the teachers
    the other way round is byte-identical to the original (before: columns and ensemble sums
    followed the config's order)."""
    import shutil

    cfg, _ = finished_run
    copy = tmp_path / "store"
    shutil.copytree(cfg.store_path, copy)
    flipped = cfg.model_copy(deep=True)
    flipped.teachers = flipped.teachers[::-1]
    flipped.store.path = str(copy)
    store = LabelStore(str(copy))
    store.load_manifest()
    original = open(store.shard_path(0), "rb").read()
    import os

    os.remove(store._sidecar(0))  # shard 0 is unfinished: the next label relabels it
    pipeline.label(flipped, pipeline.prepare(flipped))
    assert open(store.shard_path(0), "rb").read() == original


def test_training_resumes_from_latest_checkpoint(ray_local, teachers, tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, teachers, train={"epochs": 2}))
    prep = pipeline.prepare(cfg)
    pipeline.label(cfg, prep)
    first = pipeline.train_students(cfg, prep)["student"]
    cfg.train.epochs = 3  # same run name: resumes after epoch 2 instead of starting over
    resumed = pipeline.train_students(cfg, prep)["student"]
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["history"][:2] == first["history"]


def test_label_attaches_to_running_teachers_and_leaves_them_up(ray_local, teachers, tmp_path):
    """The RayService case: teachers already served (via build_app, as a serve config would)."""
    from ray import serve

    from actors.teacher import build_app

    raw = tiny_config(tmp_path, teachers)
    for t in raw["teachers"]:
        serve.run(build_app(t), name=f"longlived-{t['name']}", route_prefix=None)
        t["serve_app"] = f"longlived-{t['name']}"
    cfg = config_from_dict(raw)
    try:
        store = pipeline.label(cfg, pipeline.prepare(cfg))
        assert store.complete
        assert {"longlived-linear", "longlived-mlp"} <= set(serve.status().applications)  # still up

        # An app serving other weights than `path` names is refused before any labeling.
        wrong = cfg.model_copy(deep=True)
        wrong.run.name, wrong.teachers[0].path = "wrong", str(teachers["mlp"])
        with pytest.raises(DistillError, match=r"teacher 'linear': Serve application 'longlived-linear' serves other weights"):
            pipeline.label(wrong, pipeline.prepare(wrong))
        assert not LabelStore(wrong.store_path).exists()

        gone = cfg.model_copy(deep=True)
        gone.run.name, gone.teachers[1].serve_app = "gone", "no-such-app"
        with pytest.raises(DistillError, match=r"teacher 'mlp': no running Serve application 'no-such-app'"):
            pipeline.label(gone, pipeline.prepare(gone))
    finally:
        for t in raw["teachers"]:
            serve.delete(t["serve_app"])
