"""train.extra_losses end to end on real Ray / Serve / Train: a transformer student (kept from a
BERT teacher's layer 1) learns from the soft labels plus a hint (the BERT teacher's last hidden
state, through a learned projection) and an RKD distance term (a torch teacher's hidden layer).
A worker killed mid-run (under fsdp) resumes with the projection's trained state and its optimiser
(and ends exactly where an uninterrupted run ends); the exported student carries no projection."""
from __future__ import annotations

import json

import pytest
import torch

from orchestrator import pipeline
from orchestrator.config import config_from_dict
from orchestrator.store import LabelStore
from orchestrator.training import TEST_HOOKS_ENV
from tests.helpers import save_state_teacher, tiny_config
from tests.test_features_pipeline import _bert

pytestmark = pytest.mark.slow
EVERY = 3  # train.checkpoint_every (not a divisor of the 8 steps per epoch: the last two checkpoints differ)
TERMS = [{"kind": "hint", "weight": 0.5, "teacher": "bert", "teacher_layer": 2, "student_layer": 1},
         {"kind": "rkd_distance", "teacher": "mlp", "teacher_layer": "net.1", "student_layer": 1}]
LABELS = ["hint x0.5: bert/2 -> student hidden state 1, projection 8->8",
          "rkd_distance x1: mlp/net.1 -> student hidden state 1"]


@pytest.fixture(scope="module")
def labeled(ray_local, teachers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extra")
    bert = _bert(tmp / "bert")
    raw = tiny_config(tmp, {"linear": teachers["linear"]}, run={"name": "extra"},
                      student={"arch": "hf", "init": "teacher", "teacher": "bert", "layers": [1]},
                      train={"epochs": 2, "batch_size": 16, "max_samples": 256, "checkpoint_every": EVERY,
                             "max_failures": 1, "extra_losses": TERMS})
    del raw["student"]["hidden"]
    raw["teachers"] += [
        {"name": "mlp", "backend": "torch", "path": str(save_state_teacher(tmp / "mlp.pt")), "num_cpus": 0.25,
         "module": "tests.helpers:TinyMLP", "features": ["net.1"]},
        {"name": "bert", "backend": "hf", "path": str(bert), "num_cpus": 0.25, "features": [2]}]
    cfg = config_from_dict(raw)
    pipeline.label(cfg, pipeline.prepare(cfg))
    return raw, cfg.store_path


def _train(raw: dict, store_path: str, out, monkeypatch, strategy: str = "ddp", **hooks):
    cfg = config_from_dict({**raw, "output_dir": str(out), "store": {**raw["store"], "path": store_path},
                            "train": {**raw["train"], "strategy": strategy}})
    monkeypatch.setenv(TEST_HOOKS_ENV, json.dumps(hooks))
    store = LabelStore(store_path)
    store.load_manifest()
    state = pipeline.train(cfg, pipeline.prepare(cfg), store, "student", cfg.train.loss, cfg.train.alpha,
                           extra_losses=cfg.train.extra_losses)
    kept = sorted((cfg.run_dir / "train").glob("student-*/checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime)
    return cfg, state, [torch.load(p, weights_only=False) for p in kept]  # the last 2 kept, oldest first


@pytest.fixture(scope="module")
def reference(labeled, tmp_path_factory):
    """The uninterrupted DDP run (its config, final state, last two checkpoints): both tests compare with it."""
    raw, store_path = labeled
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _train(raw, store_path, tmp_path_factory.mktemp("ref"), monkeypatch)


def test_trains_with_the_projection_and_exports_without_it(reference):
    from transformers import AutoModelForSequenceClassification

    cfg, ref, kept = reference
    before, ref_ckpt = kept[-2:]
    # every epoch logs each term's mean (weighted) value; the terms are live and finite
    for h in ref["history"]:
        assert list(h["extra_losses"]) == LABELS and all(0 < v < 100 for v in h["extra_losses"].values()), h
    proj = ref_ckpt["extra_terms"]
    assert set(proj) == {"losses.0.0.loss.proj.weight", "losses.0.0.loss.proj.bias"}
    assert proj["losses.0.0.loss.proj.weight"].shape == (8, 8)  # student width 8 -> the teacher's 8

    # (a worker killed mid-epoch and restored with the projection: the fsdp test below, whose
    # projection has its own optimiser to restore too; under ddp: the extended test after this one)
    assert before["history"] != ref_ckpt["history"]  # an earlier checkpoint, whose projection differs: it trains
    assert not torch.allclose(before["extra_terms"]["losses.0.0.loss.proj.weight"], proj["losses.0.0.loss.proj.weight"])

    # the student's own state and its export: no projection anywhere
    saved = torch.load(cfg.run_dir / "students" / "student.pt", weights_only=False)
    assert "extra_terms" not in saved and not any("proj" in k for k in saved["model"])
    model = AutoModelForSequenceClassification.from_pretrained(ref["export"], local_files_only=True)
    assert set(model.state_dict()) == set(saved["model"])
    assert model.config.num_hidden_layers == 1


# extended: one more Ray Train run; the fsdp test below restores a projection too (with its own optimiser).
@pytest.mark.extended
def test_ddp_worker_killed_resumes_with_the_projection(labeled, reference, tmp_path, monkeypatch):
    """Killed mid-epoch 1 (past 2 mid-epoch checkpoints), restored by Ray Train: the same end as the
    uninterrupted run, the projection's trained state included."""
    raw, store_path = labeled
    _, ref, kept = reference
    proj = kept[-1]["extra_terms"]
    steps = ref["history"][0]["steps"]
    assert steps > 2 * EVERY
    _, res, kept = _train(raw, store_path, tmp_path / "killed", monkeypatch, kill_at_step=steps + 3, kill_rank=1)
    res_ckpt = kept[-1]  # the latest (checkpoints of the attempt before the restore may be kept too)
    assert len(res["resumed_at"]) == 1 and res["resumed_at"][0][0] in (0, 1), res["resumed_at"]
    for name, want in ref["model"].items():
        assert torch.allclose(res["model"][name], want, rtol=1e-5, atol=1e-6), name
    for name, want in proj.items():  # a fresh projection after the restore would have ended elsewhere
        assert torch.allclose(res_ckpt["extra_terms"][name], want, rtol=1e-5, atol=1e-6), name


def test_fsdp_trains_like_ddp_with_the_projection_and_resumes(labeled, reference, tmp_path, monkeypatch):
    """train.strategy fsdp: the BERT student (no ``_no_split_modules``: one FSDP unit, the whole
    model, sharded over the 2 workers) with the hint projection beside it (replicated, its own
    optimiser: actors/fsdp_terms.py) ends where DDP ends, student and projection; its checkpoints
    carry the projection's optimiser; a worker killed mid-epoch 1 resumes to the same end."""
    raw, store_path = labeled
    _, ddp, ddp_kept = reference
    cfg, fsdp, kept = _train(raw, store_path, tmp_path / "fsdp", monkeypatch, "fsdp")
    ckpt, ddp_ckpt = kept[-1], ddp_kept[-1]
    # FSDP's gathered optimiser state is keyed by parameter name, DDP's by index: FSDP did run
    assert all(isinstance(k, str) for k in fsdp["optimizer"]["state"]) and len(fsdp["optimizer"]["state"]) > 0
    assert all(isinstance(k, int) for k in ddp["optimizer"]["state"])
    assert fsdp["model"].keys() == ddp["model"].keys()  # the whole model, plain names
    for name, want in ddp["model"].items():  # same math, other reduction order
        assert torch.allclose(fsdp["model"][name], want, rtol=1e-4, atol=1e-5), name
    assert ckpt["extra_terms"].keys() == ddp_ckpt["extra_terms"].keys()
    for name, want in ddp_ckpt["extra_terms"].items():  # the projection's own AdamW = DDP's shared one
        assert torch.allclose(ckpt["extra_terms"][name], want, rtol=1e-4, atol=1e-5), name
    for got, want in zip(fsdp["history"], ddp["history"]):
        assert list(got["extra_losses"]) == LABELS
        assert got["extra_losses"] == pytest.approx(want["extra_losses"], rel=1e-3)
    # the projection's optimiser in the checkpoint (DDP keeps it in the student's), not in the student's state
    opt = ckpt["extra_terms_optimizer"]
    assert len(opt["optimizer"]["state"]) == 2 and opt["scheduler"]["last_epoch"] == sum(h["steps"] for h in fsdp["history"])
    assert "extra_terms_optimizer" not in ddp_ckpt
    saved = torch.load(cfg.run_dir / "students" / "student.pt", weights_only=False)
    assert "extra_terms" not in saved and not any("proj" in k for k in saved["model"])

    # killed mid-epoch 1: restored with the projection and its AdamW moments (fresh ones end elsewhere)
    steps = fsdp["history"][0]["steps"]
    _, res, kept = _train(raw, store_path, tmp_path / "killed", monkeypatch, "fsdp", kill_at_step=steps + 3, kill_rank=1)
    assert len(res["resumed_at"]) == 1 and res["resumed_at"][0][0] in (0, 1), res["resumed_at"]
    for name, want in fsdp["model"].items():
        assert torch.allclose(res["model"][name], want, rtol=1e-5, atol=1e-6), name
    for name, want in ckpt["extra_terms"].items():
        assert torch.allclose(kept[-1]["extra_terms"][name], want, rtol=1e-5, atol=1e-6), name


# extended: two more Ray Train runs; FSDP with a hint is the BERT student's test above.
@pytest.mark.extended
def test_fsdp_mlp_student_with_a_hint_trains_like_ddp(labeled, tmp_path, monkeypatch):
    """The MLP student (student.arch mlp): no layer to wrap either, so FSDP shards it whole as one
    unit; the hint's forward hook on its ReLU (net.1) still fires inside FSDP's wrapper."""
    raw, store_path = labeled
    terms = [{"kind": "hint", "weight": 0.5, "teacher": "mlp", "teacher_layer": "net.1", "student_layer": "net.1"},
             {"kind": "rkd_distance", "teacher": "mlp", "teacher_layer": "net.1", "student_layer": "net.1"}]
    mlp = {**raw, "student": {"hidden": [16]}, "train": {**raw["train"], "extra_losses": terms, "epochs": 1}}
    (_, ddp, ddp_kept), (_, fsdp, kept) = (_train(mlp, store_path, tmp_path / s, monkeypatch, s) for s in ("ddp", "fsdp"))
    assert all(isinstance(k, str) for k in fsdp["optimizer"]["state"]) and "extra_terms_optimizer" in kept[-1]
    assert fsdp["model"].keys() == ddp["model"].keys()
    for name, want in ddp["model"].items():
        assert torch.allclose(fsdp["model"][name], want, rtol=1e-4, atol=1e-5), name
    proj = ddp_kept[-1]["extra_terms"]
    assert proj["losses.0.0.loss.proj.weight"].shape == (32, 16)  # student net.1 (16) -> the teacher's net.1 (32)
    for name, want in proj.items():
        assert torch.allclose(kept[-1]["extra_terms"][name], want, rtol=1e-4, atol=1e-5), name
    assert fsdp["history"][0]["extra_losses"] == pytest.approx(ddp["history"][0]["extra_losses"], rel=1e-3)
