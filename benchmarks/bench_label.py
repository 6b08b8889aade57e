"""label_vs_direct (label.executor driver vs ray_data) and teacher-replica scaling.

    python -m benchmarks.bench_label [--quick] [--repeats N]

Setup: three TorchScript MLP teachers (64 -> hidden x layers -> 10, random weights) on sklearn
digits repeated to ~20k rows, shard_size 256 = max_batch_size 256, label.concurrency 2.

Phase 1 (teachers deployed once, deploy time reported apart): per repeat, side by side and
in alternating order, the labeling phase alone (labeling.label_shards into a fresh store):

  pipe_driver   1 replica per teacher, label.executor "driver" (the default on one node:
                one Labeler in the driver, label.concurrency shards in flight on threads)
  pipe_ray_data 1 replica per teacher, label.executor "ray_data" (the path before the fix:
                a Ray Data ActorPoolStrategy map_batches of label.concurrency Labeler actors)
  pipe2         2 replicas per teacher, label.executor left at its default ("auto")
  direct1       the direct loop (benchmarks.direct: the same teachers in this process, torch
                pinned to 1 thread like each Serve replica)
  direct2t      the direct loop with 2 torch threads

label_replicas_2_vs_1 compares pipe2 with the 1-replica run of the executor "auto" resolves to
here (noted as default_executor). Phase 2 (with startup): pipeline.label() end to end, default
config, into a fresh store (deploy + probe + create + label + verify + shutdown; Ray itself
already running) vs the direct loop including load_teacher.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import (Samples, classification_config, dataset_rows_for, emit, log, make_dataset, run_main,
                               make_mlp_teachers, ratio_samples, ray_running, sizes)
from benchmarks.direct import label_direct, load_teachers


def _fresh_store(cfg, prep, num_classes: int, path: Path):
    from orchestrator.store import LabelStore

    if path.exists():
        shutil.rmtree(path)
    store = LabelStore(str(path))
    store.create({**prep.identity, "ensemble": prep.ensemble, "num_classes": num_classes}, prep.train)
    return store


def _pipeline_label_phase(cfg, prep, apps, path: Path) -> dict:
    from orchestrator import labeling

    store = _fresh_store(cfg, prep, 10, path)
    shards = list(range(store.num_shards))
    t0 = time.perf_counter()
    labeling.label_shards(cfg, store, apps, shards)
    t1 = time.perf_counter()
    missing = store.record_finished()  # what pipeline.label does next: verify every shard
    t2 = time.perf_counter()
    assert not missing, missing
    rows = prep.train.num_rows
    return {"label_s": t1 - t0, "verify_s": t2 - t1, "rows_per_s": rows / (t1 - t0)}


def main(quick: bool, repeats: int) -> None:
    from actors import teacher as serve_teachers
    from orchestrator import labeling, pipeline
    from orchestrator.config import config_from_dict
    from orchestrator.datasets import features_of

    s = sizes(quick)
    work = Path(tempfile.mkdtemp(prefix="bench-label-"))
    samples = Samples()
    notes = {}
    try:
        teachers = make_mlp_teachers(work / "teachers", s["teachers"], s["hidden"], s["layers"])
        data = make_dataset(work / "data.parquet", dataset_rows_for(s["rows"]))
        with ray_running():
            def config(name: str, replicas: int, executor: str | None = None):
                return config_from_dict(classification_config(work, teachers, data, s, name=name, replicas=replicas,
                                                              executor=executor))

            # The same deployment ("r1") serves both 1-replica executors; "r2" has 2 replicas per teacher.
            cfg_driver, cfg_ray_data = config("r1", 1, "driver"), config("r1", 1, "ray_data")
            cfg2 = config("r2", 2)  # label.executor: the default ("auto")
            default_executor = labeling.label_executor(cfg2)
            notes["default_executor"] = default_executor
            prep = pipeline.prepare(cfg_driver)
            rows = prep.train.num_rows
            notes["rows"] = rows
            notes["shards"] = -(-rows // s["shard_size"])
            notes["teachers"] = f"{s['teachers']} TorchScript MLPs 64->{s['hidden']}x{s['layers']}->10"
            log(f"label: {rows} rows, {notes['shards']} shards, teachers {notes['teachers']}; "
                f"label.executor auto -> {default_executor} here")

            apps = {}
            for cfg in (cfg_driver, cfg2):
                t0 = time.perf_counter()
                tdicts = [t.model_dump() for t in cfg.teachers]
                apps[cfg.run.name] = serve_teachers.deploy(cfg.run.name, tdicts)
                serve_teachers.probe(apps[cfg.run.name], features_of(prep.train.slice(0, 1)))
                samples.add(f"deploy_s_{cfg.run.name}", time.perf_counter() - t0)
                log(f"label: deployed {cfg.run.name} in {time.perf_counter() - t0:.1f}s")
            direct_teachers = load_teachers(cfg_driver)

            def pipe(cfg, tag):
                return _pipeline_label_phase(cfg, prep, apps[cfg.run.name], work / f"store-{tag}")

            def direct(threads):
                out = work / "direct"
                shutil.rmtree(out, ignore_errors=True)
                return label_direct(cfg_driver, prep.train, out, direct_teachers, threads=threads,
                                    ensemble=prep.ensemble)

            # Warm-up (untimed): Ray worker processes, Serve routers, torch kernels. Not with --quick
            # (a smoke run: its numbers include those first-time costs; the ray_data one was ~8 s).
            if not quick:
                pipe(cfg_driver, "warmd"), pipe(cfg_ray_data, "warmr"), pipe(cfg2, "warm2"), direct(1)
            for r in range(repeats):
                steps = [("pipe_driver", lambda: pipe(cfg_driver, "d")), ("direct1", lambda: direct(1)),
                         ("pipe_ray_data", lambda: pipe(cfg_ray_data, "rd")), ("pipe2", lambda: pipe(cfg2, "r2")),
                         ("direct2t", lambda: direct(2))]
                for name, fn in (steps if r % 2 == 0 else steps[::-1]):
                    out = fn()
                    samples.add(f"{name}_rows_per_s", out["rows_per_s"])
                    if name.startswith("pipe"):
                        samples.add(f"{name}_verify_s", out["verify_s"])
                    if name == "direct1":
                        for k in ("compute_s", "ensemble_encode_s", "write_s"):
                            samples.add(f"direct1_{k}", out[k])
                    log(f"label repeat {r}: {name} {out['rows_per_s']:,.0f} rows/s")
            for app in apps.values():
                serve_teachers.shutdown(app)

            # Phase 2: with startup (deploy, probe, create, verify, shutdown all included), default config.
            def pipe_full(r):
                c = config(f"full{r}", 1)
                shutil.rmtree(Path(c.store_path), ignore_errors=True)
                t0 = time.perf_counter()
                pipeline.label(c, prep)
                return rows / (time.perf_counter() - t0)

            def direct_full():
                out = work / "direct"
                shutil.rmtree(out, ignore_errors=True)
                return label_direct(cfg_driver, prep.train, out, None, threads=1,
                                    ensemble=prep.ensemble)["rows_per_s_with_load"]

            for r in range(repeats):
                steps = [("pipefull", lambda: pipe_full(r)), ("directfull", direct_full)]
                for name, fn in (steps if r % 2 == 0 else steps[::-1]):
                    v = fn()
                    samples.add(f"{name}_rows_per_s", v)
                    log(f"label (with startup) repeat {r}: {name} {v:,.0f} rows/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    default_pipe = "pipe_driver" if notes.get("default_executor") == "driver" else "pipe_ray_data"
    ratio_samples(samples, "label_vs_direct", "pipe_driver_rows_per_s", "direct1_rows_per_s")
    ratio_samples(samples, "label_vs_direct_ray_data", "pipe_ray_data_rows_per_s", "direct1_rows_per_s")
    ratio_samples(samples, "label_driver_vs_ray_data", "pipe_driver_rows_per_s", "pipe_ray_data_rows_per_s")
    ratio_samples(samples, "label_vs_direct_2threads", "pipe_driver_rows_per_s", "direct2t_rows_per_s")
    ratio_samples(samples, "label_vs_direct_with_startup", "pipefull_rows_per_s", "directfull_rows_per_s")
    ratio_samples(samples, "label_replicas_2_vs_1", "pipe2_rows_per_s", f"{default_pipe}_rows_per_s")
    emit(
        ratios={"label_vs_direct": "label_vs_direct",
                "label_vs_direct_ray_data": "label_vs_direct_ray_data",
                "label_driver_vs_ray_data": "label_driver_vs_ray_data",
                "label_vs_direct_2threads": "label_vs_direct_2threads",
                "label_vs_direct_with_startup": "label_vs_direct_with_startup",
                "label_replicas_2_vs_1": "label_replicas_2_vs_1"},
        figures={"label_pipeline_rows_per_s": "pipe_driver_rows_per_s",
                 "label_pipeline_ray_data_rows_per_s": "pipe_ray_data_rows_per_s",
                 "label_pipeline_2replicas_rows_per_s": "pipe2_rows_per_s",
                 "label_direct_rows_per_s": "direct1_rows_per_s",
                 "label_direct_2threads_rows_per_s": "direct2t_rows_per_s",
                 "label_pipeline_with_startup_rows_per_s": "pipefull_rows_per_s",
                 "label_direct_with_load_rows_per_s": "directfull_rows_per_s",
                 "label_verify_s": "pipe_driver_verify_s",
                 "label_deploy_s": "deploy_s_r1",
                 "label_deploy_2replicas_s": "deploy_s_r2",
                 "label_direct_compute_s": "direct1_compute_s",
                 "label_direct_ensemble_encode_s": "direct1_ensemble_encode_s",
                 "label_direct_write_s": "direct1_write_s"},
        samples=samples, notes=notes)


if __name__ == "__main__":
    run_main(main)
