"""On-policy training (train.on_policy) end to end on real Ray: two tiny instruction teachers
served by Serve for the whole training run, the student sampling on its two DDP workers.

  a run with fraction 0.5    -> the epochs' on-policy fractions are the seeded choices, samples
                                were scored (tokens, a finite ensemble NLL), one deployment of each
                                teacher served labeling, training and evaluation, and no teacher
                                application is left up; the student's teacher_nll_of_samples, and
                                evaluation's hook for it again with ensemble.mode mean_logit and
                                entropy (the teachers' top-k through Serve, tail bucket), each =
                                an in-process recomputation
  a teacher replica killed   -> (extended) Serve replaces it, the on-policy requests are retried, and the run
  during training               ends with every optimiser step of every epoch; the baseline student
                                trained off-policy only, after the held teachers were shut down
  a train worker killed      -> restored from a mid-epoch checkpoint, the run makes the on-policy
  mid-epoch                     choices and samples of an uninterrupted one
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import config_from_dict
from orchestrator.on_policy import is_on_policy
from tests.helpers import write_yaml
from tests.helpers_gen import sample_nll_in_process
from tests.helpers_lm import lm_config
from tests.test_faults import _actor_pids, _wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(gen_setup):
    return gen_setup  # tests/conftest.py: the instruction teachers, trained once per session


def _config(tmp: Path, setup: dict, name: str, **on_policy) -> dict:
    cfg = lm_config(tmp, setup, run={"name": name},
                    dataset={"source": str(setup["train"]), "test_source": str(setup["test"]), "format": "prompt_response"},
                    lm={"max_len": 64, "k": 4}, ensemble={"mode": "mean_prob", "temperature": 1.0})
    cfg["train"].update(epochs=2, batch_size=2, on_policy={"fraction": 0.5, "max_new_tokens": 8, "divergence": "jsd",
                                                             "beta": 0.3, **on_policy})
    return cfg


def _applications() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def _check_history(history: list[dict], seed: int) -> None:
    for epoch, h in enumerate(history):
        expected = [is_on_policy(seed, epoch, b, 0.5, 1) for b in range(h["steps"])]  # grad_accum 1: a batch a step
        assert h["on_policy_fraction"] == pytest.approx(sum(expected) / len(expected)), (epoch, h)
    assert sum(h["on_policy_tokens"] for h in history) > 0
    nll = [h["on_policy_sample_nll"] for h in history if h["on_policy_tokens"]]
    assert nll and all(math.isfinite(x) and x > 0 for x in nll), history
    assert all(h["on_policy_score_s"] > 0 for h in history if h["on_policy_tokens"])


def _replicas(app: str) -> list[dict]:
    """Every replica actor (alive or dead) the Serve application `app` has had in this Ray."""
    import ray._private.state

    return [a for a in ray._private.state.actors().values() if a["ActorClassName"].startswith(f"ServeReplica:{app}:")]


def test_on_policy_run_trains_and_shuts_the_teachers_down(ray_local, setup, tmp_path):
    cfg = _config(tmp_path, setup, "onpol")
    cfg["eval"] = {"baseline": False}  # (the baseline's off-policy training is checked by the replica-kill test)
    before = _applications()
    assert main(["run", str(write_yaml(tmp_path / "c.yaml", cfg)), "-q"]) == 0
    run_dir = tmp_path / "runs" / "onpol"
    state = torch.load(run_dir / "students" / "student.pt", map_location="cpu", weights_only=False)
    history = state["history"]
    assert len(history) == 2
    _check_history(history, seed=0)
    assert 0 < sum(h["on_policy_fraction"] for h in history) / 2 < 1
    report = json.loads((run_dir / "report.json").read_text())
    assert math.isfinite(report["models"]["student"]["perplexity"])
    assert math.isfinite(report["models"]["student"]["teacher_nll_of_samples"])  # evaluation asked the teachers too
    # One deployment of each teacher served labeling, on-policy training and evaluation
    # (orchestrator/teacher_pool.py), and it is gone at the end.
    for teacher in ("small", "large"):
        assert len(_replicas(f"distill-onpol-{teacher}")) == 1, _replicas(f"distill-onpol-{teacher}")
    assert not {a for a in _applications() - before if a.startswith("distill-onpol-")}

    # teacher_nll_of_samples, exact for mean_prob; then evaluation's hook for it (sample_eval.
    # for_students) under the modes that ensemble the teachers' top-k, one deployment for both.
    # Unequal weights and tau 0.5: the ensemble must get them from the config.
    from orchestrator import teacher_pool
    from orchestrator.prepare import prepare
    from orchestrator.sample_eval import for_students
    from orchestrator.store import open_store

    mean_prob = report["models"]["student"]["teacher_nll_of_samples"]
    assert mean_prob == pytest.approx(sample_nll_in_process(config_from_dict(cfg), "student"), abs=1e-4)
    cfg["teachers"][0]["weight"] = 3.0
    with teacher_pool.hold():
        for mode, tau in (("mean_logit", 1.0), ("entropy", 0.5)):
            c = config_from_dict({**cfg, "ensemble": {**cfg["ensemble"], "mode": mode, "tau": tau}})
            vocab = open_store(c.store_path).load_manifest()["lm"]["vocab_size"]  # as evaluation takes it
            got = for_students(c, prepare(c), {"student": state}, vocab)["student"]
            assert "tail" in got["samples"]["approximation"], got
            want = sample_nll_in_process(c, "student", mode, tau)
            assert got["teacher_nll_of_samples"] == pytest.approx(want, abs=1e-4), mode
            assert abs(want - mean_prob) > 1e-2, f"{mode} scores as mean_prob here: the check above proves little"


# extended: a Serve replica killed under load is test_faults.py's (labeling), and the on-policy
# requests go through the same handles; this run (with a baseline) is two more Ray Train runs.
@pytest.mark.extended
def test_teacher_replica_killed_during_on_policy_training_loses_no_step(ray_local, setup, tmp_path):
    from orchestrator import pipeline, teacher_pool

    raw = _config(tmp_path, setup, "onpol_kill", fraction=1.0)  # every batch asks the teachers
    raw["train"]["epochs"] = 3
    cfg = config_from_dict(raw)
    prep = pipeline.prepare(cfg)
    result: dict = {}

    def work():
        try:  # as pipeline.run does: labeling's teachers kept up for on-policy training
            with teacher_pool.hold():
                store = pipeline.label(cfg, prep)
                result["states"] = pipeline.train_students(cfg, prep, store)
                result["apps_after_training"] = _applications()  # before the hold ends
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    # Training has started once its workers exist; the teachers are up by then (deployed first).
    _wait_for(lambda: len(_actor_pids("RayTrainWorker")) == 2, what="2 train workers")
    victim = _actor_pids("teacher-large")
    assert len(victim) == 1, victim
    os.kill(victim[0], signal.SIGKILL)
    t.join(timeout=600)
    assert not t.is_alive() and "error" not in result, result.get("error")
    history = result["states"]["student"]["history"]
    assert len(history) == 3 and all(h["on_policy_fraction"] == 1.0 for h in history)
    steps = -(-(-(-prep.train.num_rows // 2)) // 2)  # every worker's batches of 2, per epoch
    assert [h["steps"] for h in history] == [steps] * 3
    hard = result["states"]["student_hard"]["history"]
    assert not any("on_policy_fraction" in h for h in hard)  # the hard-label baseline stays off-policy
    # ... and trains without teachers: the held ones were shut down before it (eval.baseline).
    assert not {a for a in result["apps_after_training"] if a.startswith("distill-onpol_kill-")}
    assert not {a for a in _applications() if a.startswith("distill-onpol_kill-")}
    # Serve replaced the victim: the one replica labeling and training shared (killed) and its replacement.
    large = _replicas("distill-onpol_kill-large")
    assert len(large) >= 2 and victim[0] in [a["Pid"] for a in large], large


def test_train_worker_killed_mid_epoch_resumes_the_same_on_policy_choices(ray_local, setup, tmp_path, monkeypatch, caplog):
    """A worker SIGKILLed after optimiser step 5 (test hook), restored from the mid-epoch checkpoint
    at step 4: the on-policy choices, samples and counters continue as in an uninterrupted run.
    The same run under train.strategy fsdp (sharing this test's store and teachers, which cost
    more than a training) samples from the whole gathered student on each worker and ends with
    DDP's student: sampling from a shard fails, from other weights changes the samples."""
    import logging

    from orchestrator import pipeline, teacher_pool
    from orchestrator.training import TEST_HOOKS_ENV

    caplog.set_level(logging.INFO, logger="distill")
    raw = _config(tmp_path, setup, "onpol_resume")
    # The first 16 of the 30 rows (max_samples): 8 steps per worker and epoch (all 30: 15), each an
    # on-policy choice; the kill after step 5 still lands mid-epoch 0, past two checkpoints.
    raw["train"].update(batch_size=1, checkpoint_every=2, max_failures=1, max_samples=16)
    cfg = config_from_dict(raw)
    prep = pipeline.prepare(cfg)

    def train(out: str, train: dict | None = None, **hooks) -> dict:
        monkeypatch.setenv(TEST_HOOKS_ENV, json.dumps(hooks))
        run = config_from_dict({**raw, "output_dir": str(tmp_path / out), "store": {"path": store.uri},
                                "train": {**raw["train"], **(train or {})}})
        from actors.on_policy import teachers_for_training

        with teachers_for_training(run, prep, store) as on_policy:
            return pipeline.train(run, prep, store, "student", run.train.loss, run.train.alpha, on_policy)

    with teacher_pool.hold():  # one deployment of the teachers serves labeling and both trainings
        store = pipeline.label(cfg, prep)
        ref = train("ref")
        assert ref["history"][0]["steps"] > 5  # the kill lands mid-epoch 0, after two checkpoints
        res = train("killed", kill_at_step=5, kill_rank=1)
        # (checkpoints only every epoch: they do not change the weights, and each costs a gather)
        fsdp = train("fsdp", {"strategy": "fsdp", "checkpoint_every": None})
    assert len(res["resumed_at"]) == 1 and res["resumed_at"][0][0] == 0 and res["resumed_at"][0][1] > 0, res["resumed_at"]
    _check_history(res["history"], seed=0)
    for h_ref, h_res in zip(ref["history"], res["history"], strict=True):
        assert h_res["steps"] == h_ref["steps"] and h_res["on_policy_tokens"] == h_ref["on_policy_tokens"]
        assert h_res["on_policy_fraction"] == h_ref["on_policy_fraction"]
        assert h_res["on_policy_sample_nll"] == pytest.approx(h_ref["on_policy_sample_nll"], rel=1e-4)
        assert h_res["loss"] == pytest.approx(h_ref["loss"], rel=1e-4)
    assert caplog.text.count("train: on-policy sampling under fsdp gathers the full student on each worker") == 1
    # fsdp: sharded (its gathered optimiser state is keyed by name, DDP's by index), same samples, same student
    assert all(isinstance(k, str) for k in fsdp["optimizer"]["state"]) and fsdp["optimizer"]["state"]
    assert all(isinstance(k, int) for k in ref["optimizer"]["state"])
    for h_ref, h_fsdp in zip(ref["history"], fsdp["history"], strict=True):
        assert h_fsdp["on_policy_tokens"] == h_ref["on_policy_tokens"] and h_fsdp["steps"] == h_ref["steps"]
        assert h_fsdp["on_policy_sample_nll"] == pytest.approx(h_ref["on_policy_sample_nll"], rel=1e-4)
    assert fsdp["model"].keys() == ref["model"].keys()
    for name, want in ref["model"].items():  # same math, other reduction order (tests/test_fsdp.py)
        assert torch.allclose(fsdp["model"][name], want, rtol=1e-4, atol=1e-5), name
