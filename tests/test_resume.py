"""Exact mid-epoch resume on real Ray Train (train.checkpoint_every).

A worker is SIGKILLed in the middle of an epoch (test hook, see orchestrator.training.TEST_HOOKS_ENV)
with max_failures 1; Ray Train restores the latest checkpoint, written every few optimiser steps.
The resumed run must consume exactly the rows of an uninterrupted run with the same settings,
in the same order, on every rank and in every epoch (so none is seen twice or skipped), and end
with the same weights. Three places an epoch's order comes from (actors/student.py EpochBatches):
an epoch streamed from Ray Data with a seeded local shuffle (the store read by the driver, or
read_parquet; the first epoch, or any with train.cache_rows 0), and a later epoch replayed from the
workers' memory.
"""
from __future__ import annotations

import json

import pytest

from orchestrator import pipeline
from orchestrator.config import config_from_dict
from orchestrator.store import LabelStore
from orchestrator.training import TEST_HOOKS_ENV
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow
EVERY = 4  # train.checkpoint_every


@pytest.fixture(scope="module")
def labeled(ray_local, teachers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(tmp, teachers, train={"epochs": 3, "batch_size": 16, "checkpoint_every": EVERY, "max_failures": 1})
    pipeline.label(config_from_dict(cfg), pipeline.prepare(config_from_dict(cfg)))
    return tmp, cfg


def _train(raw: dict, out, monkeypatch, **hooks) -> dict:
    cfg = config_from_dict({**raw, "output_dir": str(out), "store": {**raw["store"], "path": str(config_from_dict(raw).store_path)}})
    monkeypatch.setenv(TEST_HOOKS_ENV, json.dumps({"record_rows": True, **hooks}))
    store = LabelStore(str(cfg.store_path))
    store.load_manifest()
    return pipeline.train(cfg, pipeline.prepare(cfg), store, "student", cfg.train.loss, cfg.train.alpha)


@pytest.fixture(scope="module")
def references(labeled, tmp_path_factory):
    """Uninterrupted runs by train settings: the cases that differ only in where the kill lands
    share one (each run is a 3-epoch Ray Train job: the suite's time matters)."""
    runs: dict[str, dict] = {}

    def get(raw: dict, monkeypatch) -> dict:
        key = json.dumps(raw["train"], sort_keys=True)
        if key not in runs:
            runs[key] = _train(raw, tmp_path_factory.mktemp("ref"), monkeypatch)
        return runs[key]
    return get


@pytest.mark.parametrize("kill_epoch, train", [
    (0, {}),  # streamed first epoch, store read by the driver
    (1, {}),  # an epoch replayed from memory: the resumed process reads the shard back in first (driver_read's reference)
    # read_parquet, 2 batches per step, nothing kept in memory: epoch 1 streamed again with its own seed
    (1, {"read_in_driver_mb": 0, "grad_accum": 2, "cache_rows": 0}),
    pytest.param(0, {"read_in_driver_mb": 0, "grad_accum": 2}, marks=pytest.mark.extended),  # its first epoch
], ids=["driver_read", "replayed", "read_parquet_accum2_streamed_epoch1", "read_parquet_accum2"])
def test_killed_mid_epoch_resumes_exactly(labeled, references, tmp_path, monkeypatch, kill_epoch, train):
    import torch

    tmp, raw = labeled
    raw = {**raw, "train": {**raw["train"], **train}}
    ref = references(raw, monkeypatch)
    steps_per_epoch = ref["history"][0]["steps"]
    assert steps_per_epoch > 3 * EVERY  # room for mid-epoch checkpoints before the kill
    # Past two mid-epoch checkpoints: the second report returns only once the controller has taken
    # the first, so the restore point is mid-epoch (which one does not matter: each is exact).
    kill = kill_epoch * steps_per_epoch + 2 * EVERY + 3
    res = _train(raw, tmp_path / "killed", monkeypatch, kill_at_step=kill, kill_rank=1)

    assert len(res["resumed_at"]) == 1, res["resumed_at"]
    epoch, batches = res["resumed_at"][0]
    assert epoch == kill_epoch and batches > 0, res["resumed_at"]  # restored mid-epoch, in the epoch killed
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]
    for h_ref, h_res in zip(ref["history"], res["history"]):
        rows = h_ref["rows"]
        assert len(rows) == 2 and len(rows[0]) == len(rows[1]) > 0
        assert len(set(rows[0] + rows[1])) == len(rows[0]) + len(rows[1])  # no row twice within an epoch
        assert h_res["rows"] == rows  # the same rows, in the same order, on each rank
        assert h_res["steps"] == h_ref["steps"] and h_res["samples"] == h_ref["samples"]
        assert h_res["loss"] == pytest.approx(h_ref["loss"], rel=1e-6)
    for rank in range(2):  # each epoch reshuffles (the rows compared above are not trivially alike)
        assert len({tuple(h["rows"][rank]) for h in ref["history"]}) == 3
    for name, want in ref["model"].items():
        assert torch.allclose(res["model"][name], want, rtol=1e-6, atol=1e-7), name

