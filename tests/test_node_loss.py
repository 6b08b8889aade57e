"""A node that hosts a teacher replica is lost during labeling: the run still completes.

Three raylets on this machine (ray.cluster_utils.Cluster): a head and two nodes that may host
teachers. Once labeling is under way, the node running teacher 'a''s replica is removed (its
raylet and every worker on it are killed). Serve starts a new replica on the other node, the
labeler re-sends the lost requests, Ray Data restarts any Labeler actor that lived there.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator import pipeline
from orchestrator.config import config_from_dict
from orchestrator.store import LabelStore
from tests.helpers import tiny_config
from tests.helpers_faults import counting_teachers, teacher_calls

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(pipeline.RAY_ENV)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20})
    for _ in range(2):
        c.add_node(num_cpus=2, resources={"teacher_node": 2}, object_store_memory=150 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def _replica_node(app_part: str) -> str | None:
    import ray._private.state  # the GCS actor table of this cluster

    for a in ray._private.state.actors().values():
        if a["State"] == "ALIVE" and app_part in a["ActorClassName"]:
            return a["Address"]["NodeID"]
    return None


def test_node_hosting_a_teacher_replica_is_lost(cluster, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="distill")
    log = tmp_path / "calls.log"
    raw = tiny_config(tmp_path, {}, store={"shard_size": 100})
    raw["teachers"] = [{**t, "resources": {"teacher_node": 1}}
                       for t in counting_teachers(tmp_path / "weights", log, delay=0.3)]
    cfg = config_from_dict(raw)
    prep = pipeline.prepare(cfg)
    errors: list = []

    def work():
        try:
            pipeline.label(cfg, prep)
        except BaseException as e:  # noqa: BLE001  (handed to the test thread)
            errors.append(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    shards = Path(cfg.store_path) / "shards"
    end = time.monotonic() + 180
    while time.monotonic() < end and len(list(shards.glob("shard-*.json"))) < 2 and not errors:
        time.sleep(0.05)
    assert not errors, errors
    node_id = _replica_node("teacher-a")
    victim = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
    assert victim is not cluster.head_node
    calls_before = len(teacher_calls(log))
    cluster.remove_node(victim)

    thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors
    # label.executor=auto chose Ray Data's labeler actors on a cluster of several nodes.
    assert "label: executor ray_data (label.executor=auto, 3 nodes" in caplog.text
    store = LabelStore(str(cfg.store_path))
    store.load_manifest()
    assert store.complete
    ids = pq.ParquetDataset(store.shard_paths()).read(columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == prep.train.num_rows  # no row lost, none duplicated
    assert set(ids) == set(prep.train.column("sample_id").to_pylist())
    # Teacher 'a' kept answering after its node was gone, from a new replica (a new process).
    calls = teacher_calls(log)
    before = {pid for t, _, pid in calls[:calls_before] if t == "a"}
    after = {pid for t, _, pid in calls[calls_before:] if t == "a"}
    assert after and not (after & before), (before, after)
