"""A real Prometheus scrapes a real run; every dashboard metric and panel query has data.

Prometheus (Debian's `prometheus`, installed by .ci/run) runs on loopback with the project's
cluster/prometheus/prometheus.yml, changed only where a test must: a 1 s scrape interval and
a free port for the driver's endpoint. Ray runs here with its metrics agent; the service-
discovery file it writes is the one the config names. Then a classification run and an LM run
go through the CLI with `metrics.port` set, and Prometheus's HTTP API is asked about every
metric family and every panel expression in cluster/grafana/distill-dashboard.json.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from tests.helpers import tiny_config, write_yaml
from tests.helpers_faults import counting_teachers
from tests.helpers_lm import lm_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = json.loads((ROOT / "cluster" / "grafana" / "distill-dashboard.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p["targets"]]


@pytest.fixture(scope="module")
def ray_with_metrics():
    import ray

    from orchestrator.pipeline import RAY_ENV

    os.environ.update(RAY_ENV)
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # actors report every second (default 10 s)
    os.environ["PYTHONPATH"] = str(ROOT)
    ray.init(num_cpus=2, log_to_driver=False)  # with the dashboard agent: it exports the metrics
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    os.environ.pop("RAY_metrics_report_interval_ms")


@pytest.fixture(scope="module")
def prometheus(ray_with_metrics, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the `prometheus` binary is missing: apt-get install prometheus (.ci/run does)")
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((ROOT / "cluster" / "prometheus" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    driver_port = _free_port()
    driver = next(j for j in cfg["scrape_configs"] if j["job_name"] == "distill-driver")
    driver["static_configs"] = [{"targets": [f"127.0.0.1:{driver_port}"]}]
    sd_file = Path(next(j for j in cfg["scrape_configs"] if j["job_name"] == "ray")["file_sd_configs"][0]["files"][0])
    assert sd_file.exists(), f"Ray wrote no service-discovery file at {sd_file}"
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = _free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2)
            break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("prometheus did not become ready")
    yield base, driver_port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def scraped(prometheus, teachers, gen_setup, tmp_path_factory):
    """A classification run, an on-policy LM run and a `distill generate`, all watched by
    Prometheus; returns the time window."""
    base, driver_port = prometheus
    tmp = tmp_path_factory.mktemp("runs")
    start = time.time()
    watch = [f"metrics.port={driver_port}", "metrics.linger_s=3"]
    cls = tiny_config(tmp, teachers, run={"name": "metrics_cls"}, train={"epochs": 8})
    # Teachers slowed to 0.2 s per call (~5 s of labeling): a real labeling run lasts far longer
    # than two scrapes, but these tiny teachers would label all 1257 rows within one scrape
    # interval and be shut down before any rate() over their latency histogram had two points.
    cls["teachers"] = [{**t, "name": name} for t, name in
                       zip(counting_teachers(tmp / "weights", tmp / "calls.log", delay=0.2), ("linear", "mlp"))]
    assert main(["run", str(write_yaml(tmp / "cls.yaml", cls)), *watch]) == 0
    # An LM run with train.on_policy (the LM and the on-policy panels: its store is labeled, its
    # student trained and scored like any LM run's): instruction data, every batch on-policy. No
    # hard-label baseline: a second student adds no metric family or panel (~45 s of Ray Train).
    gen = gen_setup  # tests/conftest.py: the instruction teachers, trained once per session
    onpol = lm_config(tmp, gen, run={"name": "metrics_onpol"}, lm={"max_len": 64, "k": 4}, eval={"baseline": False},
                      dataset={"source": str(gen["train"]), "test_source": str(gen["test"]), "format": "prompt_response"})
    onpol["train"].update(epochs=6, batch_size=2, on_policy={"fraction": 1.0, "max_new_tokens": 8})
    assert main(["run", str(write_yaml(tmp / "onpol.yaml", onpol)), *watch]) == 0
    # distill generate (the generation throughput panel: the driver's distill_generate_tokens_per_second)
    gen_cfg = lm_config(tmp, gen, run={"name": "metrics_gen"}, lm={"max_len": 64, "k": 4},
                        dataset={"source": str(gen["train"]), "format": "prompt_response"},
                        generate={"n": 1, "max_new_tokens": 8, "block_size": 8})
    assert main(["generate", str(write_yaml(tmp / "gen.yaml", gen_cfg)), *watch]) == 0
    time.sleep(3)  # the last actor reports and scrapes
    return base, start, time.time(), tmp


def test_ray_and_driver_targets_are_up(scraped):
    base, *_ = scraped
    targets = _get(base, "/api/v1/targets")["data"]["activeTargets"]
    jobs = {t["labels"]["job"] for t in targets}
    assert {"ray", "distill-driver"} <= jobs, targets


def test_every_metric_family_the_dashboard_uses_has_samples(scraped):
    base, start, end, _ = scraped
    families = sorted({re.sub(r"_(bucket|total)$", r"_\1", m)
                       for _, e in _panel_exprs() for m in re.findall(r"distill_[a-z_]+", e)})
    assert len(families) >= 15, families
    missing = []
    for family in families:
        found = _get(base, "/api/v1/series", **{"match[]": family, "start": start, "end": end})["data"]
        if not found:
            missing.append(family)
    assert not missing, f"no samples in Prometheus for: {missing}"


def test_every_panel_expression_evaluates_and_returns_data(scraped):
    base, start, end, _ = scraped
    empty = []
    for title, expr in _panel_exprs():
        q = expr.replace("$run", ".*")
        out = _get(base, "/api/v1/query_range", query=q, start=start, end=end, step="1s")
        assert out["status"] == "success", (title, q, out)
        values = [float(v) for series in out["data"]["result"] for _, v in series["values"]]
        if not any(v == v and abs(v) != float("inf") for v in values):  # a finite value somewhere
            empty.append(f"{title}: {q}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_metrics_carry_run_teacher_and_values_that_match_the_run(scraped):
    base, start, end, tmp = scraped
    rows = _get(base, "/api/v1/query", query='sum by (run, teacher) (max_over_time(distill_teacher_rows_total[10m]))',
                time=end)["data"]["result"]
    by = {(r["metric"]["run"], r["metric"]["teacher"]): float(r["value"][1]) for r in rows}
    # Every train row of the classification run went through both teachers (+ one-row probes
    # and health checks, hence >=).
    assert by[("metrics_cls", "linear")] >= 1257 and by[("metrics_cls", "mlp")] >= 1257, by
    acc = _get(base, "/api/v1/query", query='max_over_time(distill_eval_accuracy{run="metrics_cls",model="ensemble"}[10m])',
               time=end)["data"]["result"]
    report = json.loads((tmp / "runs" / "metrics_cls" / "report.json").read_text())
    assert acc and float(acc[0]["value"][1]) == pytest.approx(report["models"]["ensemble"]["accuracy"])
