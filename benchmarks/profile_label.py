"""Where the labeling time goes: a breakdown of labeling.label_shards per label.executor, plus cProfile.

    python -m benchmarks.profile_label [--quick] [--repeats N] [--out DIR]

Same setup as bench_label (three TorchScript MLP teachers, 1 replica each, label.concurrency 2).
Steps 1 and 2 run for both label executors, alternating in each repeat: "driver" (the default on
one node: one Labeler in the driver, shards in flight on threads; figures label_*) and
"ray_data" (the path before: a Ray Data actor pool of Labelers; figures label_ray_data_*), so the
report shows where the overhead of the old path went.

(--quick skips the untimed warm-up pass: a smoke run, its startup figures include first-time costs.)

1. Wall clock of _label_shards split into startup (call -> first finished shard: for ray_data
   the Ray Data plan + the Labeler actor pool: new worker processes, imports, Serve handles;
   for driver one Labeler built in the driver) and the steady per-shard interval after that.
2. CPU seconds per process role during _label_shards (psutil, sampled every 50 ms over the
   driver's process tree, i.e. only this benchmark's Ray): teacher replicas, labeler actors,
   the driver (Ray Data's executor, or the labeler threads; the sampler's own CPU is taken
   out), Serve controller/proxy, Ray system processes. CPU seconds do not depend on what else
   the machine runs, unlike wall time. The teachers' useful work is the same forward passes
   timed in-process (1 thread).
3. One Labeler driven in this process, shard after shard, with each stage timed (read inputs,
   ask the teachers through Serve, check, build_shard = ensemble + encode, write_shard), and
   a Serve round trip of an empty-cost request (a 64->10 linear teacher) for the per-request
   overhead; cProfile over the same loop goes to DIR/profile_label.txt.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import (Samples, classification_config, dataset_rows_for, emit, log, make_dataset,
                               make_mlp_teachers, ray_running, sizes)

ROLES = ("teacher replicas", "labeler actors", "driver", "serve controller+proxy",
         "ray system (raylet, gcs, ...)", "other ray workers")
EXECUTORS = ("driver", "ray_data")  # label.executor values profiled
# Sample/figure name prefix per executor: the default on one node keeps the plain names.
PREFIX = {"driver": "", "ray_data": "ray_data_"}
# Figure names (results.json) of the roles and of the in-driver stages.
ROLE_SLUG = {"teacher replicas": "teacher_replicas", "labeler actors": "labeler_actors",
             "driver": "driver", "serve controller+proxy": "serve_controller_proxy",
             "ray system (raylet, gcs, ...)": "ray_system", "other ray workers": "other_workers"}
STAGES = ("read_inputs", "ask_teachers_serve", "check", "build_shard", "write_shard")


def role_of(p) -> str:
    try:
        if p.pid == os.getpid():
            return "driver"
        title = " ".join(p.cmdline()) or p.name()
    except Exception:
        return "other ray workers"
    if "ServeReplica" in title:
        return "teacher replicas"
    if "MapWorker" in title or "Labeler" in title:
        return "labeler actors"
    if "ServeController" in title or "ProxyActor" in title:
        return "serve controller+proxy"
    if any(s in title for s in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env")):
        return "ray system (raylet, gcs, ...)"
    return "other ray workers"


class CpuSampler:
    """CPU seconds per role used by the driver's process tree between start() and stop()."""

    def __init__(self, period: float = 0.05):
        import psutil

        self.psutil, self.period = psutil, period
        self.base: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.titles: dict[int, str] = {}
        self.stop_event = threading.Event()

    def _procs(self):
        me = self.psutil.Process()
        return [me, *me.children(recursive=True)]

    def _cpu(self, p) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _sample(self, into_base: bool = False):
        for p in self._procs():
            try:
                c = self._cpu(p)
                if into_base:
                    self.base[p.pid] = c
                else:
                    self.last[p.pid] = (role_of(p), c)  # a worker's role can change (idle -> actor)
                    if p.pid not in self.titles:
                        self.titles[p.pid] = " ".join(p.cmdline())[:100]
            except Exception:
                continue

    def start(self):
        self._sample(into_base=True)
        self.stop_event.clear()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        t0 = time.thread_time()
        while not self.stop_event.is_set():
            self._sample()
            time.sleep(self.period)
        self.own_cpu = time.thread_time() - t0  # the sampler's CPU, counted in the driver's

    def stop(self) -> dict[str, float]:
        self.stop_event.set()
        self.thread.join()
        self._sample()
        out = {r: 0.0 for r in ROLES}
        self.per_process = {}
        for pid, (role, c) in self.last.items():
            out[role] += max(0.0, c - self.base.get(pid, 0.0))
            self.per_process[f"{pid} {self.titles.get(pid, '')}"] = max(0.0, c - self.base.get(pid, 0.0))
        out["driver"] = max(0.0, out["driver"] - self.own_cpu)
        return out


def settle(timeout_s: float = 15.0) -> None:
    """Wait until no labeler actor process of an earlier Ray Data run is left (their teardown
    would otherwise be counted in the next measured run), then a moment for Ray to go idle."""
    import psutil

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if not any(role_of(p) == "labeler actors" for p in psutil.Process().children(recursive=True)):
            break
        time.sleep(0.2)
    time.sleep(0.5)


def _stages(labeler, shards: int) -> dict[str, float]:
    """ms per shard of each stage of Labeler.label_shard, driven in this process."""
    from orchestrator.datasets import features_of
    from orchestrator.soft_labels import build_shard

    t = dict.fromkeys(STAGES, 0.0)
    for i in range(shards):
        a = time.perf_counter()
        inputs = labeler.store.read_inputs(i)
        x = features_of(inputs)
        b = time.perf_counter()
        out = labeler._ask_all(x)
        c = time.perf_counter()
        labeler._check(out, inputs, x, i)
        d = time.perf_counter()
        table, _ = build_shard(inputs, {n: out[n] for n in labeler.handles}, labeler.store.manifest)
        e = time.perf_counter()
        labeler.store.write_shard(i, table)
        f = time.perf_counter()
        for k, v in zip(t, (b - a, c - b, d - c, e - d, f - e)):
            t[k] += v
    return {k: v / shards * 1000 for k, v in t.items()}


def main(quick: bool, repeats: int, out_dir: Path) -> None:
    import torch

    from actors import teacher as serve_teachers
    from actors.labeler import Labeler
    from benchmarks.bench_label import _fresh_store
    from benchmarks.direct import load_teachers
    from orchestrator import labeling, pipeline
    from orchestrator.config import config_from_dict
    from orchestrator.datasets import features_of

    s = sizes(quick)
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    samples, notes = Samples(), {}
    stamps: list[float] = []

    class Stamp(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("label: shard"):
                stamps.append(time.perf_counter())

    handler = Stamp()
    dlog = logging.getLogger("distill")
    dlog.addHandler(handler)
    dlog.setLevel(logging.INFO)
    dlog.propagate = False
    try:
        teachers = make_mlp_teachers(work / "teachers", s["teachers"], s["hidden"], s["layers"])
        tiny = make_mlp_teachers(work / "tiny", 1, 0, 0)  # 64 -> 10 linear: a request that costs nothing
        data = make_dataset(work / "data.parquet", dataset_rows_for(s["rows"]))
        with ray_running():
            cfgs = {e: config_from_dict(classification_config(work, teachers, data, s, name="prof", executor=e))
                    for e in EXECUTORS}
            cfg = cfgs["driver"]
            prep = pipeline.prepare(cfg)
            rows, shards = prep.train.num_rows, -(-prep.train.num_rows // s["shard_size"])
            apps = serve_teachers.deploy("prof", [t.model_dump() for t in cfg.teachers])
            tiny_cfg = config_from_dict(classification_config(work, tiny, data, s, name="tiny"))
            tiny_app = serve_teachers.deploy("tiny", [t.model_dump() for t in tiny_cfg.teachers])
            x0 = features_of(prep.train.slice(0, s["shard_size"]))
            serve_teachers.probe(apps, x0[:1]), serve_teachers.probe(tiny_app, x0[:1])

            # Useful work: the teachers' forward passes, in this process, 1 thread.
            direct = load_teachers(cfg)
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            for start in range(0, rows, s["shard_size"]):
                x = features_of(prep.train.slice(start, s["shard_size"]))
                for m in direct.values():
                    m(x)
            compute_s = time.perf_counter() - t0

            def profiled(executor: str, r: int) -> None:
                store = _fresh_store(cfg, prep, 10, work / f"store-{executor}-{r}")
                settle()
                stamps.clear()
                sampler = CpuSampler()
                sampler.start()
                t0 = time.perf_counter()
                labeling.label_shards(cfgs[executor], store, apps, list(range(shards)))
                wall = time.perf_counter() - t0
                cpu = sampler.stop()
                if os.environ.get("BENCH_DEBUG"):  # the top processes by CPU, to see what a role holds
                    for k, v in sorted(sampler.per_process.items(), key=lambda kv: -kv[1])[:15]:
                        log(f"  {v:6.2f}s  {k}")
                first = stamps[0] - t0
                steady = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
                pre = PREFIX[executor]
                samples.add(f"{pre}wall_s", wall)
                samples.add(f"{pre}startup_s", first)
                samples.add(f"{pre}steady_ms_per_shard", steady * 1000)
                samples.add(f"{pre}steady_rows_per_s", s["shard_size"] / steady)
                for role, c in cpu.items():
                    samples.add(f"{pre}cpu_s_{ROLE_SLUG[role]}", c)
                samples.add(f"{pre}cpu_s_total", sum(cpu.values()))
                samples.add(f"{pre}sampler_cpu_s", sampler.own_cpu)
                log(f"profile repeat {r} ({executor}): wall {wall:.2f}s (startup {first:.2f}s, then "
                    f"{steady * 1000:.1f} ms/shard); CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                    + f"; useful compute {compute_s:.2f}")

            for e in EXECUTORS if not quick else ():  # warm-up (untimed): worker processes, Serve routers
                labeling.label_shards(cfgs[e], _fresh_store(cfg, prep, 10, work / f"warm-{e}"), apps,
                                       list(range(shards)))
            for r in range(repeats):
                samples.add("compute_cpu_s", compute_s)
                for e in (EXECUTORS if r % 2 == 0 else EXECUTORS[::-1]):
                    profiled(e, r)

            # One labeler in this process: stage timings, then cProfile over the same loop.
            store = _fresh_store(cfg, prep, 10, work / "driver")
            labeler = Labeler(store.uri, apps, {t.name: t.max_batch_size for t in cfg.teachers})
            from ray import serve

            tiny_handle = serve.get_app_handle(next(iter(tiny_app.values())))
            for r in range(repeats):
                for k, v in _stages(labeler, shards).items():
                    samples.add(f"stage_ms_{k}", v)
                t0 = time.perf_counter()
                n = 50
                for _ in range(n):
                    tiny_handle.predict.remote(x0).result()
                samples.add("serve_roundtrip_ms", (time.perf_counter() - t0) / n * 1000)
                samples.add("stage_ms_teacher_compute", compute_s / shards * 1000)
            prof = cProfile.Profile()
            prof.enable()
            _stages(labeler, shards)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
            buf.write("\n\n---- by own time ----\n")
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "profile_label.txt").write_text(
                f"cProfile of {shards} shards labeled by one Labeler in the driver process "
                f"({rows} rows, teachers {s['teachers']} x MLP 64->{s['hidden']}x{s['layers']}->10)\n"
                "Waiting on Serve shows as time in .result() / threading waits.\n\n" + buf.getvalue())
            notes.update(rows=rows, shards=shards, executors=list(EXECUTORS), profile=str(out_dir / "profile_label.txt"))
    finally:
        dlog.removeHandler(handler)
        shutil.rmtree(work, ignore_errors=True)

    figures = {"label_useful_compute_cpu_s": "compute_cpu_s", "serve_roundtrip_ms": "serve_roundtrip_ms"}
    for pre in PREFIX.values():
        figures.update({f"label_{pre}startup_s": f"{pre}startup_s",
                        f"label_{pre}steady_ms_per_shard": f"{pre}steady_ms_per_shard",
                        f"label_{pre}steady_rows_per_s": f"{pre}steady_rows_per_s", f"label_{pre}wall_s": f"{pre}wall_s",
                        f"label_{pre}cpu_s_total": f"{pre}cpu_s_total",
                        f"label_{pre}profiler_sampler_cpu_s": f"{pre}sampler_cpu_s"})
    for name in samples.values:
        if name.startswith(("cpu_s_", "ray_data_cpu_s_", "stage_ms_")) and not name.endswith("cpu_s_total"):
            figures[f"label_{name}"] = name
    emit(ratios={}, figures=figures, samples=samples, notes=notes)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    a = p.parse_args()
    main(a.quick, a.repeats, a.out)
