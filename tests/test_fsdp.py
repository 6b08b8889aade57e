"""train.strategy fsdp on real Ray Train, CPU and gloo: a tiny causal-LM student (two decoder
layers, dropout on) sharded over 2 workers, with gradient checkpointing, trains to the same weights
as DDP without it, its checkpoints hold the whole state (gathered on rank 0), a worker killed
mid-epoch resumes exactly, and the exported student loads with transformers."""
from __future__ import annotations

import json

import pytest

from orchestrator import pipeline
from orchestrator.config import config_from_dict
from orchestrator.store import LabelStore
from orchestrator.training import TEST_HOOKS_ENV
from tests.helpers_lm import lm_config, make_lm_setup

pytestmark = pytest.mark.slow
EVERY = 2  # train.checkpoint_every


@pytest.fixture(scope="module")
def labeled(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    setup = make_lm_setup(tmp / "setup", teacher_steps=0)  # untrained teachers: labels are labels
    student = json.loads(setup["student_config"].read_text())
    student.update(num_hidden_layers=2, attention_dropout=0.1)  # two FSDP units; dropout draws random numbers
    (tmp / "student.json").write_text(json.dumps(student))
    # The first 48 of the 255 stored rows (max_samples): 12 steps per worker and epoch, room for the
    # kill after step 5; all 255 made 64 steps per epoch, a gathered checkpoint every 2 of them.
    raw = lm_config(tmp, setup, lm={"student_config": str(tmp / "student.json")}, eval={"baseline": False},
                    train={"epochs": 2, "batch_size": 2, "checkpoint_every": EVERY, "max_failures": 1, "grad_clip": 1.0,
                           "max_samples": 48})
    cfg = config_from_dict(raw)
    pipeline.label(cfg, pipeline.prepare(cfg))
    return tmp, raw


def _train(raw: dict, out, monkeypatch, strategy: str, checkpointing: bool = False, **hooks) -> dict:
    cfg = config_from_dict({**raw, "output_dir": str(out), "store": {**raw["store"], "path": str(config_from_dict(raw).store_path)},
                            "train": {**raw["train"], "strategy": strategy, "gradient_checkpointing": checkpointing}})
    monkeypatch.setenv(TEST_HOOKS_ENV, json.dumps({"record_rows": True, **hooks}))
    store = LabelStore(str(cfg.store_path))
    store.load_manifest()
    return pipeline.train(cfg, pipeline.prepare(cfg), store, "student", cfg.train.loss, cfg.train.alpha)


def test_fsdp_trains_like_ddp_checkpoints_resumes_and_exports(labeled, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    _, raw = labeled
    ddp = _train(raw, tmp_path / "ddp", monkeypatch, "ddp")
    # FSDP also recomputes each layer's activations in backward (train.gradient_checkpointing),
    # dropout included (the RNG state is replayed): still the same training as DDP without it.
    fsdp = _train(raw, tmp_path / "fsdp", monkeypatch, "fsdp", checkpointing=True)
    assert all(h["gradient_checkpointing"] for h in fsdp["history"]) and "gradient_checkpointing" not in ddp["history"][0]
    steps = ddp["history"][0]["steps"]
    assert steps > 2 * EVERY + 1
    # FSDP's gathered optimiser state is keyed by parameter name, DDP's by index: FSDP did run.
    assert all(isinstance(k, str) for k in fsdp["optimizer"]["state"]) and len(fsdp["optimizer"]["state"]) > 0
    assert all(isinstance(k, int) for k in ddp["optimizer"]["state"])
    assert fsdp["model"].keys() == ddp["model"].keys()  # the whole model, plain names
    assert [h["rows"] for h in fsdp["history"]] == [h["rows"] for h in ddp["history"]]
    for name, want in ddp["model"].items():  # same math, other reduction order
        assert torch.allclose(fsdp["model"][name], want, rtol=1e-4, atol=1e-5), name

    killed = _train(raw, tmp_path / "killed", monkeypatch, "fsdp", checkpointing=True, kill_at_step=2 * EVERY + 1,
                    kill_rank=1)
    assert len(killed["resumed_at"]) == 1 and killed["resumed_at"][0][0] == 0 and killed["resumed_at"][0][1] > 0
    assert [h["rows"] for h in killed["history"]] == [h["rows"] for h in fsdp["history"]]
    for name, want in fsdp["model"].items():
        assert torch.allclose(killed["model"][name], want, rtol=1e-6, atol=1e-7), name

    student = AutoModelForCausalLM.from_pretrained(killed["export"], local_files_only=True)
    for name, value in student.state_dict().items():
        assert torch.equal(value, killed["model"][name]), name
