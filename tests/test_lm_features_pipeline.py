"""LM teacher features end to end on real Ray / Serve / Train, on packed instruction rows: Serve
teachers' hidden states stored per response token (float16, aligned with the top-k), mean-pooled
and cls-pooled per row; `distill inspect`'s bytes per token; an LM student trained with hint terms
(per token and on cls features) and a similarity term (mean features) on Ray Train (2 workers),
under fsdp killed mid-run and resumed with the projections' saved state, ending at DDP's weights;
an export that loads with transformers and holds no projection weights; grad_clip with grad_accum
clipping the accumulated gradient once per optimiser step, projections included."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import pipeline
from orchestrator.cli import main
from orchestrator.config import config_from_dict
from orchestrator.instruct import rows_of, targets
from orchestrator.lm_features import decode_lm_feature
from orchestrator.models import CausalLMTeacher
from orchestrator.store import LabelStore, topk_columns
from orchestrator.training import TEST_HOOKS_ENV
from tests.helpers_lm import lm_config, make_untrained_lm_setup, write_instruct_files

pytestmark = pytest.mark.slow
K = 8
TERMS = [{"kind": "hint", "weight": 0.5, "teacher": "large", "teacher_layer": 2, "student_layer": 1},  # pool none
         {"kind": "similarity", "teacher": "small", "teacher_layer": 1, "student_layer": 1},  # pool mean
         {"kind": "hint", "weight": 0.5, "distance": "cosine", "teacher": "large_cls", "teacher_layer": 2,
          "student_layer": 0}]  # pool cls
LABELS = ["hint x0.5: large/2 -> student hidden state 1, projection 16->48",
          "similarity x1: small/1 -> student hidden state 1",
          "hint x0.5: large_cls/2 -> student hidden state 0, projection 16->48"]
EVERY = 3  # train.checkpoint_every (not a divisor of the steps per epoch: the last two checkpoints differ)


@pytest.fixture(scope="module")
def labeled(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmfeat")
    setup = make_untrained_lm_setup(root)  # the plumbing is under test, not what the teachers know
    train, test = write_instruct_files(root)
    raw = lm_config(root, setup, run={"name": "lmfeat"}, lm={"max_len": 64, "k": K},
                    dataset={"source": str(train), "test_source": str(test), "format": "prompt_response"},
                    train={"epochs": 2, "batch_size": 2, "extra_losses": TERMS, "checkpoint_every": EVERY,
                           "max_failures": 1, "grad_clip": 0.5},  # one norm over student + projections
                    eval={"baseline": False, "sample_max_new_tokens": 0})
    raw["teachers"][0].update(features=[1], pool="mean")  # 'small': 1 layer, hidden 32
    raw["teachers"][1].update(features=[2], pool="none")  # 'large': 2 layers, hidden 48
    raw["teachers"].append({**raw["teachers"][1], "name": "large_cls", "pool": "cls"})  # the same model, cls-pooled
    cfg = config_from_dict(raw)
    pipeline.label(cfg, pipeline.prepare(cfg))
    return raw, cfg


def test_features_are_the_teachers_hidden_state_at_the_stored_positions(labeled, capsys):
    raw, cfg = labeled
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    table = pq.ParquetFile(store.shard_paths()[0]).read()
    sel = targets(rows_of(table))
    stored = decode_lm_feature(table, "large", 2)
    assert stored.dtype == np.float16 and stored.shape == (int(sel.sum()), 48)  # one vector per labeled token
    lengths = np.diff(table.column("feat__large__2").combine_chunks().offsets.to_numpy())
    np.testing.assert_array_equal(lengths, sel.sum(1) * 48)  # row by row, as the top-k
    np.testing.assert_array_equal(np.diff(table.column(topk_columns("large")[0]).combine_chunks().offsets.to_numpy()),
                                  sel.sum(1) * K)
    teacher = CausalLMTeacher({**raw["teachers"][1], "features": [2], "pool": "none"}, K)
    _, _, want = teacher.forward_features(rows_of(table))  # the same model, here instead of on Serve
    np.testing.assert_allclose(stored.astype(np.float32), want["2"].astype(np.float32), atol=1e-2, rtol=1e-2)
    capsys.readouterr()
    assert main(["inspect", cfg.store_path]) == 0  # the text lines a user reads
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("features:   feat__large__2"))
    assert line.endswith(" per token") and "bytes per sample" in line
    assert main(["inspect", cfg.store_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    per_sample, per_token = info["feature_bytes_per_sample"]["feat__large__2"], info["feature_bytes_per_token"]["feat__large__2"]
    rows = pq.ParquetFile(store.shard_paths()[0]).metadata.num_rows
    assert per_token == pytest.approx(per_sample * rows / sel.sum())  # per labeled position, first shard
    assert 0 < per_token <= 2 * 48 + 8  # float16 (zstd), a few bytes of list overhead at most


def test_pooled_features_are_the_teachers_mean_and_first_position(labeled):
    """pool mean: the mean of the teacher's per-token hidden state over each row's labeled positions
    (computed here from its per-token features); pool cls: its hidden state at position 0, which a
    causal model computes from the row's first token alone (computed here with transformers)."""
    from transformers import AutoModelForCausalLM

    raw, cfg = labeled
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    table = pq.ParquetFile(store.shard_paths()[0]).read()
    rows = rows_of(table)
    counts = targets(rows).sum(1)
    mean = decode_lm_feature(table, "small", 1)
    assert mean.dtype == np.float16 and mean.shape == (len(rows), 32)  # one vector per row
    _, _, per_token = CausalLMTeacher({**raw["teachers"][0], "pool": "none"}, K).forward_features(rows)
    want = np.stack([t.mean(0) for t in np.split(per_token["1"].astype(np.float32), np.cumsum(counts)[:-1])])
    np.testing.assert_allclose(mean.astype(np.float32), want, atol=1e-2, rtol=1e-2)
    cls = decode_lm_feature(table, "large_cls", 2)
    assert cls.dtype == np.float16 and cls.shape == (len(rows), 48)
    model = AutoModelForCausalLM.from_pretrained(raw["teachers"][1]["path"], local_files_only=True)
    with torch.no_grad():
        first = model(input_ids=torch.from_numpy(rows[:, 0, :1]).long(), output_hidden_states=True).hidden_states[2]
    np.testing.assert_allclose(cls.astype(np.float32), first[:, 0].numpy(), atol=1e-2, rtol=1e-2)


def _train(labeled, out, monkeypatch, strategy="ddp", **hooks):
    raw, first = labeled
    cfg = config_from_dict({**raw, "output_dir": str(out), "store": {**raw["store"], "path": str(first.store_path)},
                            "train": {**raw["train"], "strategy": strategy}})
    monkeypatch.setenv(TEST_HOOKS_ENV, json.dumps(hooks))
    store = LabelStore(str(cfg.store_path))
    store.load_manifest()
    state = pipeline.train(cfg, pipeline.prepare(cfg), store, "student", cfg.train.loss, cfg.train.alpha,
                           extra_losses=cfg.train.extra_losses)
    kept = sorted((cfg.run_dir / "train").glob("student-*/checkpoint_*/state.pt"), key=os.path.getmtime)
    return state, [torch.load(p, weights_only=False) for p in kept]  # the last 2 kept, oldest first


def test_trains_resumes_with_the_projections_and_exports_without_them(labeled, tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ref, kept = _train(labeled, tmp_path / "ref", monkeypatch)
    for h in ref["history"]:  # every term live and finite, each epoch
        assert list(h["extra_losses"]) == LABELS and all(0 < v < 100 for v in h["extra_losses"].values()), h
    assert "extra_terms" not in ref  # the students/ state file holds the student only
    before, proj = kept[-2]["extra_terms"], kept[-1]["extra_terms"]
    assert {k: tuple(v.shape) for k, v in proj.items()} == {  # student width 16 -> the teacher's 48, the hints only
        "losses.0.0.loss.proj.weight": (48, 16), "losses.0.0.loss.proj.bias": (48,),
        "losses.2.0.loss.proj.weight": (48, 16), "losses.2.0.loss.proj.bias": (48,)}
    for name in proj:  # an earlier checkpoint's projections differ: they train
        assert not torch.allclose(before[name], proj[name]), name

    # The same run under train.strategy fsdp (actors/fsdp_terms.py: the student's hidden states
    # through FSDP's forward, the projections replicated beside it, inside the one grad_clip norm and
    # in the checkpoints with their own optimiser's state), a worker killed mid-epoch 1 (past a
    # checkpoint of that epoch) and restored by Ray Train: it ends where DDP's uninterrupted run did,
    # projections included (fresh ones after the restore would have ended elsewhere). DDP's own kill
    # and resume with projections: tests/test_extra_terms_pipeline.py (one killed run here, not two).
    steps = ref["history"][0]["steps"]
    assert steps > 2 * EVERY and steps % EVERY, ref["history"]
    res, kept = _train(labeled, tmp_path / "killed", monkeypatch, "fsdp", kill_at_step=steps + EVERY + 1, kill_rank=1)
    assert len(res["resumed_at"]) == 1 and res["resumed_at"][0][0] in (0, 1), res["resumed_at"]
    assert all(isinstance(k, str) for k in res["optimizer"]["state"])  # FSDP's gathered state: by name (DDP's: index)
    assert kept[-1]["extra_terms_optimizer"]["optimizer"]["state"]  # the projections' AdamW, checkpointed
    assert [list(h["extra_losses"]) for h in res["history"]] == [LABELS, LABELS]
    for name, want in ref["model"].items():  # same math, other reduction order (tests/test_fsdp.py)
        assert torch.allclose(res["model"][name], want, rtol=1e-4, atol=1e-5), name
    for name, want in proj.items():
        assert torch.allclose(kept[-1]["extra_terms"][name], want, rtol=1e-4, atol=1e-5), name

    model = AutoModelForCausalLM.from_pretrained(ref["export"], local_files_only=True)
    export = Path(ref["export"])
    names = [k for f in sorted(export.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()]
    assert names and not [k for k in names if k.startswith("losses") or ".loss." in k]  # no projection
    assert set(names) <= set(model.state_dict()) and json.loads((export / "config.json").read_text())["hidden_size"] == 16


# extended: two more Ray Train runs; tests/test_grad_clip_terms.py checks the one norm over student
# and projections (two gloo processes, no Ray) in the default run.
@pytest.mark.extended
def test_grad_clip_clips_the_accumulated_gradient_once_per_step_projections_included(labeled, tmp_path, monkeypatch):
    """train.grad_accum 2 and max_steps 1 on Ray Train (2 workers, the fused head with the terms):
    AdamW's first moment after its first step is (1 - beta1) x the gradient it applied, read here
    from the checkpoint. With grad_clip far below the accumulated gradient's norm, the applied
    gradient must be the unclipped run's x clip / its norm: one factor for every student parameter
    and hint projection alike. Clipping each micro-batch would add two differently scaled gradients
    (not parallel to the unclipped one); projections left out of the norm would keep their size; a
    step per micro-batch would stop after one batch (the rows each worker consumed say two)."""
    raw, first = labeled

    def run(name: str, clip):
        train = {**raw["train"], "grad_accum": 2, "max_steps": 1, "grad_clip": clip, "checkpoint_every": None,
                 "epochs": 1, "max_failures": 0}
        cfg = config_from_dict({**raw, "train": train, "output_dir": str(tmp_path / name),
                                "store": {**raw["store"], "path": str(first.store_path)}})
        monkeypatch.setenv(TEST_HOOKS_ENV, json.dumps({"record_rows": True}))
        store = LabelStore(str(cfg.store_path))
        store.load_manifest()
        state = pipeline.train(cfg, pipeline.prepare(cfg), store, "student", cfg.train.loss, cfg.train.alpha,
                               extra_losses=cfg.train.extra_losses)
        (kept,) = (cfg.run_dir / "train").glob("student-*/checkpoint_*/state.pt")
        opt = torch.load(kept, weights_only=False)["optimizer"]
        moments = [opt["state"][i]["exp_avg"] / (1 - opt["param_groups"][0]["betas"][0]) for i in sorted(opt["state"])]
        return state["history"], moments

    clip = 1e-4
    free, want = run("free", None)
    clipped, got = run("clipped", clip)
    for h in (free, clipped):
        assert h[0]["steps"] == 1 and [len(r) for r in h[0]["rows"]] == [2 * raw["train"]["batch_size"]] * 2, h
    assert clipped[0]["rows"] == free[0]["rows"]  # the same micro-batches
    assert [tuple(g.shape) for g in want[-4:]] == [(48, 16), (48,), (48, 16), (48,)]  # the two hint projections
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in want))
    assert norm > 100 * clip
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert w.abs().max() > 0, i
        torch.testing.assert_close(g.double(), w.double() * clip / norm, rtol=1e-4, atol=1e-12, msg=f"parameter {i}")
