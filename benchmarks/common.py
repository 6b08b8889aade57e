"""Shared pieces of the benchmarks: machine facts, repeat statistics, a Ray session, and the
synthetic classification setup (slow-enough TorchScript MLP teachers on digits repeated).

Each benchmark module is run in its own process by ``benchmarks.run`` and prints one JSON
object (``{"ratios": {...}, "figures": {...}, "samples": {...}, "notes": {...}}``) as the last
line of its stdout. ``samples`` keeps every repeat's raw value so the driver can report the
median and the min-max.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---- sizes -------------------------------------------------------------------------------------


def sizes(quick: bool) -> dict:
    """Problem sizes of the full run and of the --quick smoke run."""
    if quick:
        return {"rows": 2_000, "hidden": 256, "layers": 3, "teachers": 3, "shard_size": 256, "max_batch_size": 256,
                "train_rows": 2_000, "train_epochs": 2, "store_windows": 64, "lm_windows": 16, "lm_len": 128}
    return {"rows": 20_000, "hidden": 1024, "layers": 3, "teachers": 3, "shard_size": 256, "max_batch_size": 256,
            "train_rows": 20_000, "train_epochs": 4, "store_windows": 64, "lm_windows": 64, "lm_len": 128}


# ---- statistics --------------------------------------------------------------------------------


class Samples:
    """Raw values per metric name, one per repeat."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(float(value))

    def median(self, name: str) -> float:
        return float(statistics.median(self.values[name]))


def ratio_samples(samples: Samples, name: str, num: str, den: str) -> None:
    """Per-repeat ratios num/den (each repeat's A and B were measured side by side)."""
    for a, b in zip(samples.values[num], samples.values[den]):
        samples.add(name, a / b)


def emit(ratios: dict[str, str], figures: dict[str, str], samples: Samples, notes: dict | None = None) -> None:
    """Print the benchmark's result line: ratios/figures name -> the sample series they summarise."""
    out = {"ratios": {}, "figures": {}, "samples": samples.values, "notes": notes or {}}
    for kind, table in (("ratios", ratios), ("figures", figures)):
        for name, series in table.items():
            if not samples.values.get(series) or samples.median(series) <= 0:
                out["notes"].setdefault("skipped (no positive value)", []).append(name)
                continue
            out[kind][name] = {"series": series, "median": samples.median(series),
                               "min": min(samples.values[series]), "max": max(samples.values[series])}
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


# ---- machine -----------------------------------------------------------------------------------


@contextmanager
def activations_kept(model, out: dict):
    """Within the block: autograd's saved tensors; after it, ``out["bytes"]``: the bytes of those still
    alive (the activations the backward will read), each storage once, the model's parameters not
    counted. Saves of graphs made and freed inside the forward (the fused head's per-chunk logits)
    are not counted: they are gone by then."""
    import weakref

    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    alive = {}
    for ref in saved:
        if (t := ref()) is not None and t.untyped_storage().data_ptr() not in params:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    out["bytes"] = sum(alive.values())


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import pyarrow
    import ray
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "gpu": _gpu()}


def _gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


# ---- Ray ---------------------------------------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_running(num_cpus: int = 2):
    """One local Ray per benchmark process, with the pipeline's environment (RAY_ENV)."""
    import logging

    import ray

    from orchestrator import pipeline, session

    os.environ.update(pipeline.RAY_ENV)
    # Ray Train's PlacementGroupCleaner asks the state API whether the Train controller is
    # alive. With include_dashboard=False this Ray has no API server, and the state client
    # falls back to /tmp/ray/ray_current_cluster: the most recently started Ray on the machine,
    # which may be another process's. That cluster does not know our controller, the cleaner
    # takes it for dead and removes the run's placement group (seen here: "Destroying worker
    # since its placement group was removed" while another Ray ran beside this one). An API
    # address where nothing listens makes the cleaner treat the state API as unavailable and
    # keep monitoring; ray.shutdown() still cleans everything up.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{_closed_port()}"
    # Workers inherit the driver's environment: they import benchmarks.* and tests-free modules.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    session.quiet_ray_loggers()
    # address="local": always a new embedded Ray, even while another `ray start` head runs here.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


# ---- the classification setup ------------------------------------------------------------------


def make_mlp_teachers(root: Path, n: int, hidden: int, layers: int, in_dim: int = 64, classes: int = 10) -> list[Path]:
    """n TorchScript MLP teachers (in_dim -> hidden x layers -> classes), random weights, seeds 0..n-1.

    Weights are random on purpose: only their cost matters here, and training them would
    add a minute for nothing the throughput depends on.
    """
    import torch
    from torch import nn

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        dims = [in_dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*mods, nn.Linear(dims[-1], classes)).eval()
        p = root / f"mlp{i}.pt"
        torch.jit.save(torch.jit.script(model), str(p))
        paths.append(p)
    return paths


def make_dataset(path: Path, rows: int, seed: int = 0) -> Path:
    """sklearn digits repeated (with small noise so every row is distinct) to ``rows`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = np.arange(rows) % len(d.data)
    x = (d.data[idx] + rng.normal(0, 0.05, (rows, d.data.shape[1]))).astype(np.float32)
    y = d.target[idx].astype(np.int64)
    feats = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"features": feats, "label": pa.array(y)}), path)
    return path


def classification_config(work: Path, teachers: list[Path], data: Path, s: dict, *, name: str = "bench",
                          replicas: int = 1, teacher_cpus: float = 0.2, label_cpus: float = 0.1,
                          concurrency: int = 2, executor: str | None = None, **sections) -> dict:
    """Like examples/quickstart.yaml, with the benchmark's teachers and data.

    ``executor``: label.executor ("driver", "ray_data" or "auto"); None keeps the config's
    default ("auto": the driver on a one-node cluster such as the benchmarks' local Ray).

    Teacher/labeler num_cpus are logical only (each replica runs torch with 1 thread:
    actors/teacher.py sets max(1, int(num_cpus))); they are kept small so that several
    deployments fit the 2 logical CPUs of the benchmark's Ray at once.
    """
    # test_fraction: the smallest held-out split prepare() accepts; ~rows/(1-f) input rows.
    cfg = {
        "run": {"name": name},
        "output_dir": str(work / "runs"),
        "dataset": {"source": str(data), "test_fraction": 0.02, "seed": 0},
        "teachers": [{"name": f"t{i}", "backend": "torch", "path": str(p), "num_cpus": teacher_cpus,
                      "replicas": replicas, "max_batch_size": s["max_batch_size"]} for i, p in enumerate(teachers)],
        "ensemble": {"mode": "mean_prob", "temperature": 4.0},
        "store": {"shard_size": s["shard_size"]},
        "label": {"concurrency": concurrency, "num_cpus": label_cpus, **({"executor": executor} if executor else {})},
        "student": {"hidden": [32]},
        "train": {"workers": 2, "cpus_per_worker": 0.5, "epochs": s["train_epochs"], "batch_size": 64, "lr": 0.003,
                  "loss": "kd", "alpha": 0.1},
        "eval": {"baseline": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def dataset_rows_for(train_rows: int) -> int:
    """Input rows so that the train split (test_fraction 0.02) has about ``train_rows`` rows."""
    return int(round(train_rows / 0.98))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_main(main) -> None:
    """The `python -m benchmarks.bench_*` entry: --quick (smoke sizes), --repeats N."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    main(a.quick, a.repeats)
