"""Several nodes and a real job submission, all on this machine (loopback only)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import pipeline
from orchestrator.config import config_from_dict
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def three_nodes():
    """A head plus a 'teacher' node (2 logical GPUs) and a 'student' node, each its own raylet."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(pipeline.RAY_ENV)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20})
    teacher_node = cluster.add_node(num_cpus=2, num_gpus=2, resources={"teacher_node": 4}, object_store_memory=150 * 2**20)
    student_node = cluster.add_node(num_cpus=2, resources={"student_node": 4}, object_store_memory=150 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield teacher_node.node_id, student_node.node_id
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_replicas_and_workers_land_where_the_config_says(three_nodes, tmp_path, teachers):
    from ray.util.state import list_actors

    from actors import teacher as serve_teachers

    teacher_node, student_node = three_nodes
    pinned = {"resources": {"teacher_node": 1}, "num_gpus": 0.5, "replicas": 2}
    cfg = config_from_dict(tiny_config(tmp_path, teachers, train={"epochs": 1, "worker_resources": {"student_node": 1}}))
    for t in cfg.teachers:
        for k, v in pinned.items():
            setattr(t, k, v)
    apps = serve_teachers.deploy("placement", [t.model_dump() for t in cfg.teachers])
    try:
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.startswith("ServeReplica:distill-placement")]
        assert len(replicas) == 4  # 2 teachers x 2 replicas
        assert {a.node_id for a in replicas} == {teacher_node}
    finally:
        serve_teachers.shutdown(apps)
    prep = pipeline.prepare(cfg)
    pipeline.label(cfg, prep)  # the same pinning through the whole labeling path
    state = pipeline.train_students(cfg, prep)["student"]
    assert state["worker_nodes"] == [student_node, student_node]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_quickstart(tmp_path):
    """`ray start --head` on loopback, `ray job submit` the quickstart, wait for SUCCEEDED."""
    from jobs.train_teachers import ensure_teachers

    out = REPO / "artifacts" / "teachers" / "digits"  # cached across runs: trained once per machine
    ensure_teachers(out)
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray 2.60 heads require token auth
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, text=True, timeout=180)
    try:
        overrides = [f"teachers.0.path={out}/mlp.pt", f"teachers.1.path={out}/cnn.pt", f"teachers.2.path={out}/bert",
                     f"output_dir={tmp_path}/runs", "train.epochs=3", "eval.baseline=false"]
        # The head's job agent can come up after `ray start` returns (seen on a loaded machine:
        # "No available agent to submit job, please try again later"): Ray's advice, taken.
        for attempt in range(10):
            job = subprocess.run(
                [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                 "--runtime-env", "jobs/runtime_env.yaml", "--",
                 "python", "-m", "jobs.distill", "examples/quickstart.yaml", *overrides],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
            )
            if "No available agent to submit job" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        assert "| student |" in job.stdout  # the job's output (report table) streams back
        report = json.loads((tmp_path / "runs" / "quickstart" / "report.json").read_text())
        assert report["models"]["student"]["accuracy"] > 0.5 and report["task"] == "classification"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
