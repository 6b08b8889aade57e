"""Teacher replicas under long forward passes, on real Ray Serve.

Serve health-checks every replica (teachers[].health_check_period_s) and restarts one whose
check does not answer within teachers[].health_check_timeout_s. Here both are small (1 s, 2 s)
and the teacher's forward pass sleeps 6 s: a busy replica must still answer and keep running,
while a replica whose model returns NaN on the probe row must still be replaced.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from orchestrator.datasets import features_of, load_dataset
from tests.helpers import NaNTeacher, save_script
from tests.helpers_faults import counting_teachers, teacher_calls

pytestmark = pytest.mark.slow
FAST_CHECKS = {"health_check_period_s": 1, "health_check_timeout_s": 2}


def _replicas(deployment: str) -> set[tuple[str, int]]:
    """(actor id, pid) of the live replica actors of one deployment, from the GCS actor table."""
    import ray._private.state

    return {(a["ActorID"], a["Pid"]) for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"].endswith(f":{deployment}")}


def _rows(n: int) -> np.ndarray:
    return features_of(load_dataset("sklearn:digits", limit=n))


def test_busy_replica_answers_its_health_check_and_is_not_restarted(ray_local, tmp_path):
    from ray import serve

    from actors.teacher import build_app

    log = tmp_path / "calls.log"
    slow = counting_teachers(tmp_path / "weights", log, delay=6.0)[0]  # teacher 'a': 6 s per forward pass
    serve.run(build_app({**slow, **FAST_CHECKS}), name="slow", route_prefix=None)
    try:
        handle = serve.get_app_handle("slow")
        before = _replicas("teacher-a")
        assert len(before) == 1, before
        x = _rows(8)
        t0 = time.monotonic()
        info = handle.info.remote(x[:1]).result(timeout_s=120)  # one 6 s pass; sets the health probe row
        first = handle.predict.remote(x[:4]).result(timeout_s=120)
        second = handle.predict.remote(x[4:]).result(timeout_s=120)
        busy_s = time.monotonic() - t0
        assert info["num_classes"] == 10 and first.shape == second.shape == (4, 10)
        # Three passes of 6 s: some twelve health checks came due while the model was busy, each
        # with 2 s to answer. Still the one replica that started, which did every forward pass.
        assert busy_s >= 18, busy_s
        assert _replicas("teacher-a") == before
        (pid,) = {p for _, p in before}
        assert {p for _, _, p in teacher_calls(log)} == {pid}, teacher_calls(log)
        status = serve.status().applications["slow"].deployments["teacher-a"]
        assert status.status == "HEALTHY" and status.replica_states == {"RUNNING": 1}, status
    finally:
        serve.delete("slow")


def test_replica_whose_probe_gives_nan_is_replaced(ray_local, tmp_path):
    from ray import serve

    from actors.teacher import build_app

    path = save_script(NaNTeacher(), tmp_path / "nan.pt")
    cfg = {"name": "nan", "backend": "torch", "path": str(path), "num_cpus": 0.25, **FAST_CHECKS}
    handle = serve.run(build_app(cfg), name="nan", route_prefix=None)
    try:
        before = _replicas("teacher-nan")
        assert len(before) == 1, before
        x = _rows(200)
        bad = x[x[:, 5] > 12][:1]  # NaNTeacher returns NaN on this row
        assert len(bad) == 1
        assert handle.info.remote(bad).result(timeout_s=60)["num_classes"] == 10  # sets the probe row
        deadline, after = time.monotonic() + 90, before
        while time.monotonic() < deadline and not (after and not after & before):  # a new one up, the old one gone
            time.sleep(0.5)
            after = _replicas("teacher-nan")
        assert after and not (after & before), f"the replica whose probe gives NaN was not replaced: {before} -> {after}"
    finally:
        serve.delete("nan")
