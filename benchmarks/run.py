"""Run every benchmark and write BENCHMARKS.md + benchmarks/results.json.

    python -m benchmarks.run                  # full sizes, 3 repeats (about 15 minutes on 2 cores)
    python -m benchmarks.run --quick --repeats 1 --out /tmp/b   # smoke size, files under /tmp/b

Each benchmark runs in its own process (one Ray per process, see benchmarks/common.py) and
measures its comparisons side by side, alternating the order of A and B in each repeat.
results.json holds the medians: {"ratios": {NAME: float}, "figures": {NAME: float}};
results_detail.json beside it keeps every repeat's value, min-max, the machine and the load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import ROOT, load_average, machine

BENCHMARKS = ("store", "lm_bytes", "label", "profile_label", "train")
MODULES = {"store": "benchmarks.bench_store", "lm_bytes": "benchmarks.bench_lm_bytes",
           "label": "benchmarks.bench_label", "profile_label": "benchmarks.profile_label",
           "train": "benchmarks.bench_train"}
LOAD_LIMIT = 2.5  # 1-minute load average above which the machine counts as busy


def wait_for_quiet(max_wait_s: float) -> list[float]:
    """Wait (up to max_wait_s) until the 1-minute load average drops below LOAD_LIMIT."""
    t0 = time.time()
    while True:
        load = list(load_average())
        if load[0] <= LOAD_LIMIT or time.time() - t0 >= max_wait_s:
            return load
        print(f"benchmarks: load average {load[0]:.1f} > {LOAD_LIMIT}: waiting for a quieter machine", flush=True)
        time.sleep(20)


def run_one(name: str, quick: bool, repeats: int, out: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", MODULES[name], "--repeats", str(repeats)] + (["--quick"] if quick else [])
    if name == "profile_label":
        cmd += ["--out", str(out)]
    load_before = load_average()[0]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result, tail = None, []
    try:
        for line in proc.stdout:
            if line.startswith("BENCH_RESULT "):
                result = json.loads(line[len("BENCH_RESULT "):])
                continue
            tail = (tail + [line.rstrip()])[-40:]
            if line.startswith("[") and "] " in line[:12]:  # our own progress lines
                print(f"  {name}: {line.rstrip()}", flush=True)
        proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or result is None:
        return {"error": f"exit status {proc.returncode}", "log_tail": tail, "elapsed_s": elapsed,
                "load_before": load_before, "load_after": load_average()[0]}
    return {**result, "elapsed_s": elapsed, "load_before": load_before, "load_after": load_average()[0]}


# ---- BENCHMARKS.md -------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2e}"


def _range(d: dict) -> str:
    return f"{_fmt(d['min'])} – {_fmt(d['max'])}"


class Results:
    def __init__(self, runs: dict[str, dict]):
        self.runs = runs
        self.all: dict[str, dict] = {}
        for r in runs.values():
            for kind in ("ratios", "figures"):
                for name, d in (r.get(kind) or {}).items():
                    self.all[name] = {**d, "kind": kind}

    def get(self, name: str, default=float("nan")) -> float:
        return self.all[name]["median"] if name in self.all else default

    def has(self, *names: str) -> bool:
        return all(n in self.all for n in names)

    def row(self, name: str, goal: str, line: str) -> str:
        if name not in self.all:
            return f"| `{name}` | n/a | | {goal} | not measured (see errors below) |"
        d = self.all[name]
        return f"| `{name}` | **{_fmt(d['median'])}** | {_range(d)} | {goal} | {line} |"


def _verdict(ok: bool) -> str:
    return "meets" if ok else "misses"


def _default_read(notes: dict) -> str:
    """How the default config reads bench_train's store (its notes), in words; "" if not recorded."""
    if "default_read" not in notes:
        return ""
    how = ("read by the driver with pyarrow and handed to Ray Data whole (`ray.data.from_arrow`)"
           if notes["default_read"] == "driver" else "streamed with `ray.data.read_parquet`")
    cmp = "≤" if notes["default_read"] == "driver" else ">"
    return (f"the {notes.get('store_mb', '?')} MB store is {cmp} `train.read_in_driver_mb` "
            f"({notes.get('read_in_driver_mb_default', '?')}), so it is {how}")


def interpretations(R: Results) -> list[str]:
    g = R.get
    rows = []
    label_notes = R.runs.get("label", {}).get("notes", {})
    default_executor = label_notes.get("default_executor", "driver")
    if R.has("label_vs_direct"):
        r = g("label_vs_direct")
        startup = (f"; {_fmt(g('label_startup_s'))} s of its {_fmt(g('label_wall_s'))} s pass before the first shard "
                   "is done (profile, driver executor)") if R.has("label_startup_s", "label_wall_s") else ""
        rows.append(R.row("label_vs_direct", "≥ 0.90",
                          f"labeling phase with `label.executor: driver` (what `auto` picks on one node) "
                          f"{_fmt(g('label_pipeline_rows_per_s'))} rows/s vs direct loop "
                          f"{_fmt(g('label_direct_rows_per_s'))} rows/s (both 1 torch thread per teacher): "
                          f"{_verdict(r >= 0.9)} the goal{startup}."))
    if R.has("label_vs_direct_ray_data"):
        r = g("label_vs_direct_ray_data")
        rows.append(R.row("label_vs_direct_ray_data", "(≥ 0.90)",
                          f"the same with `label.executor: ray_data` (the path before the fix: a Ray Data actor pool of "
                          f"labelers), {_fmt(g('label_pipeline_ray_data_rows_per_s'))} rows/s in the same alternation: "
                          f"would {'meet' if r >= 0.9 else 'miss'} the goal."))
    if R.has("label_driver_vs_ray_data"):
        rows.append(R.row("label_driver_vs_ray_data", "", "speedup of the labeling phase, `driver` over `ray_data` "
                          "(per repeat, side by side)."))
    if R.has("label_vs_direct_2threads"):
        rows.append(R.row("label_vs_direct_2threads", "", f"the driver-executor pipeline vs the direct loop given "
                          f"both cores' torch threads ({_fmt(g('label_direct_2threads_rows_per_s'))} rows/s) instead of 1."))
    if R.has("label_vs_direct_with_startup"):
        rows.append(R.row("label_vs_direct_with_startup", "", f"whole pipeline.label() with the default config "
                          f"(`label.executor: auto` -> {default_executor}; Serve deploy ≈ {_fmt(g('label_deploy_s'))} s, "
                          "probe, store, label, verify, shutdown) vs direct incl. loading the teachers: deployment "
                          "dominates at this size."))
    if R.has("kd_vs_hard_train"):
        read = _default_read(R.runs.get("train", {}).get("notes", {}))
        rows.append(R.row("kd_vs_hard_train", "", f"KD (alpha 0.1, reads soft.probs) {_fmt(g('train_kd_samples_per_s'))} "
                          f"vs a true hard-label-only loop (features + label only, plain CE) "
                          f"{_fmt(g('train_hard_only_samples_per_s'))} samples/s over all epochs, 2 workers, both with "
                          f"the default store read{f' ({read})' if read else ''}. "
                          f"First epoch ratio {_fmt(g('kd_vs_hard_train_first_epoch'))} "
                          f"({_fmt(g('train_kd_first_epoch_samples_per_s'))} samples/s); the later epochs replay "
                          f"from the workers' memory, where KD's own cost shows: ratio "
                          f"{_fmt(g('kd_vs_hard_train_cached_epochs'))}."))
    if R.has("kd_vs_kd_alpha1_train"):
        rows.append(R.row("kd_vs_kd_alpha1_train", "", "vs the pipeline's own `student_hard` baseline (kd, alpha 1.0: "
                          "still reads the soft column)."))
    if R.has("kd_vs_hard_train_wall"):
        rows.append(R.row("kd_vs_hard_train_wall", "", f"wall time of pipeline.train, hard-only / kd: each run takes "
                          f"≈ {_fmt(g('train_kd_wall_s'))} s, of which only "
                          f"{_fmt(g('train_kd_wall_s') - g('train_kd_outside_epochs_s'))} s are epochs "
                          "(Ray Train start, checkpoints: fixed costs dominate at this size)."))
    if R.has("train_read_driver_vs_streamed_first_epoch"):
        rows.append(R.row("train_read_driver_vs_streamed_first_epoch", "", f"first epoch of kd, default "
                          f"`train.read_in_driver_mb` (driver read) {_fmt(g('train_kd_first_epoch_samples_per_s'))} vs "
                          f"`train.read_in_driver_mb: 0` (streamed with read_parquet, the path before) "
                          f"{_fmt(g('train_kd_streamed_first_epoch_samples_per_s'))} samples/s."))
    if R.has("train_read_driver_vs_streamed"):
        rows.append(R.row("train_read_driver_vs_streamed", "", "the same over all epochs (the later epochs replay from "
                          "memory either way)."))
    if R.has("train_read_driver_vs_streamed_wall"):
        rows.append(R.row("train_read_driver_vs_streamed_wall", "", f"wall time of pipeline.train, streamed / driver "
                          f"read: {_fmt(g('train_kd_streamed_wall_s'))} -> {_fmt(g('train_kd_wall_s'))} s."))
    mb = R.runs.get("store", {}).get("notes", {}).get("lm_table_mb", "?")
    for phase in ("write", "read"):
        name = f"store_{phase}_vs_pyarrow"
        if R.has(name):
            r = g(name)
            extra = ""
            if phase == "read" and R.has("store_read_sha256_share"):
                extra = (f" The sha256 check alone takes {_fmt(100 * g('store_read_sha256_share'))}% of read_shard's "
                         "time; it now runs on a helper thread while pyarrow parses, so it overlaps the parse "
                         "instead of adding to it.")
            rows.append(R.row(name, "≥ 0.90", f"LabelStore.{phase}_shard {_fmt(g(f'store_{phase}_store_mb_per_s'))} "
                              f"MB/s vs pq.{phase}_table {_fmt(g(f'store_{phase}_pyarrow_mb_per_s'))} MB/s with the same "
                              f"Parquet options ({mb} MB top-k LM shard, in-memory size): {_verdict(r >= 0.9)} the "
                              f"goal.{extra}"))
        name = f"store_{phase}_vs_before"
        if R.has(name):
            rows.append(R.row(name, "", "the store now vs its code before the no-copy"
                              + (" + overlapped-sha256" if phase == "read" else "") + " change "
                              f"({_fmt(g(f'store_{phase}_before_mb_per_s'))} MB/s, "
                              f"{_fmt(g(f'store_{phase}_before_vs_pyarrow'))} of pyarrow), same run."))
        name = f"store_{phase}_vs_pyarrow_defaults"
        if R.has(name):
            rows.append(R.row(name, "", f"the store vs pq.{phase}_table with pyarrow's defaults (dictionary + "
                              f"snappy, {_fmt(g(f'store_{phase}_pyarrow_default_mb_per_s'))} MB/s): the store's "
                              "top-k codec against the default."))
        name = f"store_{phase}_vs_pyarrow_dense"
        if R.has(name):
            rows.append(R.row(name, "", "the same on a small dense shard (256 rows, 0.1 MB): per-file costs "
                              "(rename, sidecar) weigh more."))
    codec = R.runs.get("lm_bytes", {}).get("notes", {}).get("store_codec", "the store's Parquet options")
    for k in (8, 16, 32, 64):
        name = f"bytes_per_token_k{k}"
        if R.has(name):
            v, kl = g(name), g(f"fp16_mean_kl_nats_k{k}")
            goal = "≤ 100 B, KL ≤ 1e-3" if k == 32 else ""
            verdict = (" Goal " + ("met" if v <= 100 and kl <= 1e-3 else "not met") + ".") if k == 32 else ""
            rows.append(R.row(name, goal, f"bytes/token/teacher in the store (int16 ids + float16 log-probs, "
                              f"{codec}) vs naive int32+float32 {8 * k} B (as Parquet "
                              f"{_fmt(g(f'bytes_per_token_naive_parquet_k{k}'))} B); pyarrow's default codec on the "
                              f"same columns {_fmt(g(f'bytes_per_token_pyarrow_defaults_k{k}'))} B; "
                              f"float16 KL error {_fmt(kl)} nats.{verdict}"))
    if R.has("label_replicas_2_vs_1"):
        r = g("label_replicas_2_vs_1")
        one = "label_pipeline_rows_per_s" if default_executor == "driver" else "label_pipeline_ray_data_rows_per_s"
        rows.append(R.row("label_replicas_2_vs_1", "", f"2 vs 1 replica per teacher (default executor, here "
                          f"{default_executor}): {_fmt(g('label_pipeline_2replicas_rows_per_s'))} vs {_fmt(g(one))} "
                          "rows/s" + (": 3 teachers already keep both cores busy, so extra replicas add little "
                                      "(CPU-bound on 2 cores)." if r < 1.2 else
                                      ": a second replica overlaps one teacher's requests with another's, though "
                                      "the 2 cores stay the limit.")))
    if R.has("train_workers_2_vs_1"):
        rows.append(R.row("train_workers_2_vs_1", "", f"2 vs 1 train worker (DDP on gloo, 0.5 CPU each, 2 cores): "
                          f"{_fmt(g('train_kd_samples_per_s'))} vs {_fmt(g('train_kd_1worker_samples_per_s'))} samples/s "
                          f"over all epochs; in the epochs replayed from memory "
                          f"{_fmt(g('train_workers_2_vs_1_cached_epochs'))}"
                          + (": for a 2.4k-parameter student the per-step gloo allreduce eats what the second core "
                             "gives (CPU-bound on 2 cores)." if not g('train_workers_2_vs_1_cached_epochs') >= 1.3 else
                             ": the second worker helps.")))
    return rows


ROLE_LABELS = {"teacher_replicas": "teacher replicas (Serve)", "labeler_actors": "labeler actors (Ray Data)",
               "driver": "driver (ray_data: Ray Data's executor + iter_rows; driver: the labeler threads)",
               "serve_controller_proxy": "Serve controller + proxy",
               "ray_system": "Ray system (raylet, gcs, agents)", "other_workers": "other Ray workers"}
STAGE_LABELS = {"read_inputs": "read inputs (row group of inputs.parquet)",
                "ask_teachers_serve": "ask the 3 teachers through Serve (concurrently)",
                "check": "check outputs", "build_shard": "build_shard (ensemble + Arrow encode)",
                "write_shard": "write_shard (Parquet, sha256, temp + rename, sidecar)",
                "teacher_compute": "for reference: the 3 forward passes in-process, 1 thread"}
# The executors profiled (benchmarks/profile_label.py) and their figure-name prefixes.
PROFILED = (("driver", "label_", "driver (now, default on one node)"),
            ("ray_data", "label_ray_data_", "ray_data (before)"))
WORK = "labelers' per-shard work (read, check, build_shard, write_shard)"


def _overheads(R: Results, executor: str, pre: str, work: float, compute: float) -> dict[str, float]:
    """CPU seconds of each overhead of one profiled executor (the per-shard work as a reference row)."""
    g = R.get
    actors, driver = g(f"{pre}cpu_s_labeler_actors", 0.0), g(f"{pre}cpu_s_driver", 0.0)
    return {
        "labeler actor processes beyond the per-shard work (start: new processes, imports of ray.data, "
        "ray.serve with fastapi/pandas; Serve handles)": actors - work if executor == "ray_data" else actors,
        "driver process beyond the per-shard work (ray_data: Ray Data's executor; driver: the labeler threads' "
        "Serve calls)":
            driver if executor == "ray_data" else driver - work,
        "Serve replicas beyond the forward passes": g(f"{pre}cpu_s_teacher_replicas", 0.0) - compute,
        "Ray system + Serve controller + other workers": sum(g(f"{pre}cpu_s_{k}", 0.0) for k in
                                                             ("ray_system", "serve_controller_proxy", "other_workers")),
        WORK: work,
    }


def profile_section(R: Results, runs: dict) -> list[str]:
    g = R.get
    profiled = [(e, pre, label) for e, pre, label in PROFILED if R.has(f"{pre}wall_s")]
    if not profiled:
        return ["Profile not available (see errors)."]
    notes = runs.get("profile_label", {}).get("notes", {})
    shards = notes.get("shards", float("nan"))
    work_ms = sum(g(f"label_stage_ms_{k}", 0.0) for k in ("read_inputs", "check", "build_shard", "write_shard"))
    work = shards * work_ms / 1000
    compute = g("label_useful_compute_cpu_s")
    overheads = {e: _overheads(R, e, pre, work, compute) for e, pre, _ in profiled}
    lines = [
        f"`python -m benchmarks.profile_label`: {notes.get('rows', '?')} rows, {shards} shards of 256, 3 teachers "
        "x 1 replica, label.concurrency 2, `_label_shards` with each `label.executor` in turn (alternating; medians "
        "over the repeats). cProfile of one Labeler driven in the driver: `benchmarks/profile_label.txt`.",
        "",
    ]
    for e, pre, label in profiled:
        lines.append(f"- `label.executor: {e}`: wall time of `_label_shards` **{_fmt(g(f'{pre}wall_s'))} s** = "
                     f"**{_fmt(g(f'{pre}startup_s'))} s until the first shard is written** + "
                     f"{_fmt(g(f'{pre}steady_ms_per_shard'))} ms per shard after that "
                     f"({_fmt(g(f'{pre}steady_rows_per_s'))} rows/s steady); CPU seconds during it "
                     f"{_fmt(g(f'{pre}cpu_s_total'))} s.")
    lines += [
        f"- CPU seconds by process (psutil over this Ray's process tree, so not inflated by other load; the "
        f"sampler's own CPU taken out of the driver's); the teachers' forward passes are {_fmt(compute)} s.",
        "",
        "| process role | " + " | ".join(f"{label} CPU s" for _, _, label in profiled) + " |",
        "|---|" + "---:|" * len(profiled),
    ]
    for k, role in ROLE_LABELS.items():
        lines.append(f"| {role} | " + " | ".join(_fmt(g(f"{pre}cpu_s_{k}", 0.0)) for _, pre, _ in profiled) + " |")
    lines += ["", "- One Labeler driven in the driver, shard after shard (ms per shard):", "",
              "| stage | ms/shard |", "|---|---:|"]
    lines += [f"| {label} | {_fmt(g(f'label_stage_ms_{k}'))} |" for k, label in STAGE_LABELS.items()
              if R.has(f"label_stage_ms_{k}")]
    lines += [f"| a Serve round trip of a request that costs nothing (64->10 linear teacher) | "
              f"{_fmt(g('serve_roundtrip_ms'))} |", "",
              "Overheads over the run (CPU s; the per-shard work for reference):", "",
              "| overhead | " + " | ".join(label for _, _, label in profiled) + " |",
              "|---|" + "---:|" * len(profiled)]
    first = profiled[-1][0]  # rows in the order of the old path's overheads, largest first
    for k in sorted(overheads[first], key=lambda k: -overheads[first][k]):
        lines.append(f"| {k} | " + " | ".join(_fmt(overheads[e][k]) for e, _, _ in profiled) + " |")
    lines.append("")
    verdicts = []
    for e, pre, label in profiled:
        real = {k: v for k, v in overheads[e].items() if k != WORK}
        largest = max(real, key=real.get)
        verdicts.append(f"with `{e}`: {largest}, {_fmt(real[largest])} CPU s "
                        f"({_fmt(g(f'{pre}startup_s'))} s of wall before the first shard)")
    lines.append("**Largest overhead** " + "; ".join(verdicts) + ". "
                 + (f"The fix moved the labeling phase from {_fmt(g('label_ray_data_cpu_s_total'))} to "
                    f"{_fmt(g('label_cpu_s_total'))} CPU s and from {_fmt(g('label_ray_data_wall_s'))} to "
                    f"{_fmt(g('label_wall_s'))} s of wall. " if len(profiled) == 2 else "")
                 + f"Ensembling (build_shard {_fmt(g('label_stage_ms_build_shard'))} ms/shard), the Arrow "
                 "conversion in it and pickling through Serve are small next to it.")
    return lines


def train_section(R: Results, runs: dict) -> list[str]:
    g = R.get
    if not R.has("train_kd_wall_s", "train_kd_first_epoch_samples_per_s", "train_kd_cached_epochs_samples_per_s"):
        return []
    notes = runs.get("train", {}).get("notes", {})
    rows, epochs = notes.get("rows", float("nan")), notes.get("epochs", float("nan"))
    first = rows / g("train_kd_first_epoch_samples_per_s")
    later = rows / g("train_kd_cached_epochs_samples_per_s")
    read = _default_read(notes)
    lines = [
        "## Where the training time goes",
        "",
        f"One `pipeline.train` (kd, {rows} rows, {epochs} epochs, 2 workers, default config"
        f"{': ' + read if read else ''}) takes **{_fmt(g('train_kd_wall_s'))} s**: "
        f"≈ {_fmt(g('train_kd_outside_epochs_s'))} s outside the epochs (Ray Train's controller and worker group, "
        f"gloo, one checkpoint per epoch, shutdown), ≈ **{_fmt(first)} s for the first epoch** "
        f"({_fmt(g('train_kd_first_epoch_samples_per_s'))} samples/s), and ≈ {_fmt(later)} s for each later epoch, "
        f"replayed from the workers' memory ({_fmt(g('train_kd_cached_epochs_samples_per_s'))} samples/s)."
        + (f" With `train.read_in_driver_mb: 0` (the store streamed through `ray.data.read_parquet`, the path "
           f"before) the same run takes {_fmt(g('train_kd_streamed_wall_s'))} s, its first epoch "
           f"≈ {_fmt(rows / g('train_kd_streamed_first_epoch_samples_per_s'))} s."
           if R.has("train_kd_streamed_wall_s", "train_kd_streamed_first_epoch_samples_per_s") else "")
        + (f" One pass over the store in the driver (`pipeline._train_dataset`, batches of 64, no Train): "
           f"**{_fmt(g('train_store_pass_read_parquet_s'))} s streamed through `ray.data.read_parquet`** over the "
           f"{notes.get('shards', '?')} shard files vs {_fmt(g('train_store_pass_pyarrow_s'))} s read by the driver "
           "(pyarrow, then `from_arrow`): Ray Data's read planning and read tasks, not the bytes, made the first "
           "epoch slow." if R.has("train_store_pass_read_parquet_s", "train_store_pass_pyarrow_s") else ""),
        "",
    ]
    return lines


def fix_section(R: Results, runs: dict) -> list[str]:
    g = R.get
    out = ["### Fixes applied, measured before -> after in the same run", ""]
    if R.has("label_driver_vs_ray_data", "label_pipeline_ray_data_rows_per_s", "label_pipeline_rows_per_s"):
        r_before, r_after = g("label_vs_direct_ray_data"), g("label_vs_direct")
        profile = (f" Profile: CPU {_fmt(g('label_ray_data_cpu_s_total'))} -> {_fmt(g('label_cpu_s_total'))} s, "
                   f"{_fmt(g('label_ray_data_startup_s'))} -> {_fmt(g('label_startup_s'))} s before the first shard."
                   if R.has("label_ray_data_cpu_s_total", "label_cpu_s_total", "label_ray_data_startup_s",
                            "label_startup_s") else "")
        out += [
            f"{len(out) // 2}. **Labeling in the driver: `label.executor`** "
            "(`orchestrator/pipeline.py: _label_shards`; `auto`, the default, is `driver` on a one-node cluster "
            "and `ray_data` on more nodes). Before: `ray_data`, a Ray Data `ActorPoolStrategy` `map_batches` of "
            "Labeler actors; after: `driver`, one Labeler in the driver with label.concurrency shards in flight on "
            "threads (no labeler processes to start). Teachers still run on Serve replicas; lost replicas are still "
            "retried inside the Labeler. Measured side by side "
            f"(`bench_label`): **{_fmt(g('label_pipeline_ray_data_rows_per_s'))} -> "
            f"{_fmt(g('label_pipeline_rows_per_s'))} rows/s ({_fmt(g('label_driver_vs_ray_data'))}x)**; vs the "
            f"direct loop {_fmt(r_before)} -> {_fmt(r_after)} (goal ≥ 0.90: {'met' if r_after >= 0.9 else 'not met'})."
            + profile + " Trade-off: with `driver` the labelers' CPU work (ensembling, encoding, writing) runs on the "
            "driver's node only, which is why `auto` keeps `ray_data` on a multi-node cluster.",
            ""]
    if R.has("train_read_driver_vs_streamed", "train_kd_streamed_first_epoch_samples_per_s"):
        notes = runs.get("train", {}).get("notes", {})
        out += [
            f"{len(out) // 2}. **Small stores are read by the driver: `train.read_in_driver_mb`** "
            f"(`orchestrator/pipeline.py: _train_dataset`; default {notes.get('read_in_driver_mb_default', 256)} "
            "MB). A store up to that size is read with pyarrow in the driver and handed to Ray Data whole "
            "(`ray.data.from_arrow`, store order, so the seeded split stays deterministic); a bigger one streams "
            "with `ray.data.read_parquet` as before. "
            "Before (`train.read_in_driver_mb: 0`) -> after (default), kd runs side by side (`bench_train`): first "
            f"epoch **{_fmt(g('train_kd_streamed_first_epoch_samples_per_s'))} -> "
            f"{_fmt(g('train_kd_first_epoch_samples_per_s'))} samples/s "
            f"({_fmt(g('train_read_driver_vs_streamed_first_epoch'))}x)**, all epochs "
            f"{_fmt(g('train_read_driver_vs_streamed'))}x, wall time of `pipeline.train` "
            f"{_fmt(g('train_kd_streamed_wall_s'))} -> {_fmt(g('train_kd_wall_s'))} s "
            f"({_fmt(g('train_read_driver_vs_streamed_wall'))}x; Ray Train's own fixed cost stays)"
            + (f"; one pass over the store in the driver {_fmt(g('train_store_pass_read_parquet_s'))} -> "
               f"{_fmt(g('train_store_pass_pyarrow_s'))} s"
               if R.has("train_store_pass_read_parquet_s", "train_store_pass_pyarrow_s") else "") + ".",
            ""]
    if R.has("store_write_vs_before", "store_read_vs_before", "store_write_vs_pyarrow", "store_read_vs_pyarrow"):
        w, rd = g("store_write_vs_pyarrow"), g("store_read_vs_pyarrow")
        out += [
            f"{len(out) // 2}. **Store shard I/O without bytes copies, sha256 overlapped with the parse** "
            "(`orchestrator/store.py: LabelStore.write_shard / read_shard`; no option, always on). The Parquet "
            "bytes stay one pyarrow Buffer (no `to_pybytes()` on write, `read_buffer()` on read), and read_shard "
            "hashes on a helper thread while pyarrow parses the same Buffer. Before (the previous code, inlined in "
            "`bench_store` as `before`) -> "
            f"after, same run, {R.runs.get('store', {}).get('notes', {}).get('lm_table_mb', '?')} MB top-k shard: "
            f"write **{_fmt(g('store_write_before_mb_per_s'))} -> {_fmt(g('store_write_store_mb_per_s'))} MB/s** "
            f"({_fmt(g('store_write_before_vs_pyarrow'))} -> {_fmt(w)} of pyarrow), read "
            f"**{_fmt(g('store_read_before_mb_per_s'))} -> {_fmt(g('store_read_store_mb_per_s'))} MB/s** "
            f"({_fmt(g('store_read_before_vs_pyarrow'))} -> {_fmt(rd)} of pyarrow). Goal ≥ 0.90 of pyarrow: write "
            f"{'met' if w >= 0.9 else 'not met'}, read {'met' if rd >= 0.9 else 'not met'}."
            + (f" sha256 alone takes {_fmt(100 * g('store_read_sha256_share'))}% of read_shard's time; it is kept "
               "on purpose (integrity of every shard read), now beside the parse rather than before it."
               if R.has("store_read_sha256_share") else ""),
            ""]
    if R.has("bytes_per_token_k32", "bytes_per_token_pyarrow_defaults_k32"):
        codec = runs.get("lm_bytes", {}).get("notes", {}).get("store_codec", "BYTE_STREAM_SPLIT + zstd, no dictionary")
        before = {k: g(f"bytes_per_token_pyarrow_defaults_k{k}") for k in (8, 32, 64)}
        after = {k: g(f"bytes_per_token_k{k}") for k in (8, 32, 64)}
        out += [
            f"{len(out) // 2}. **Top-k columns as {codec}** (applied earlier, commit 9bb8576, `orchestrator/store.py: "
            "shard_write_options`). Before (pyarrow defaults, dictionary + snappy) -> now, the same tables in the "
            f"same run, bytes/token/teacher: **k=32: {_fmt(before[32])} -> {_fmt(after[32])}** (k=8: "
            f"{_fmt(before[8])} -> {_fmt(after[8])}, k=64: {_fmt(before[64])} -> {_fmt(after[64])}); shard write "
            f"{_fmt(g('store_write_vs_pyarrow_defaults'))}x and read {_fmt(g('store_read_vs_pyarrow_defaults'))}x "
            "the speed of pyarrow's defaults. Parquet's dictionary encoding overflows on 32k distinct ids and falls "
            "back to plain, which left the old codec above the raw int16+float16 bytes at small k.",
            ""]
    return out


def all_numbers(R: Results) -> list[str]:
    lines = ["| name | kind | median | min – max |", "|---|---|---:|---|"]
    for name in sorted(R.all):
        d = R.all[name]
        lines.append(f"| `{name}` | {d['kind'][:-1]} | {_fmt(d['median'])} | {_range(d)} |")
    return lines


def write_markdown(path: Path, runs: dict, mach: dict, args, started: str, minutes: float, load_start) -> None:
    R = Results(runs)
    loads = [(n, r.get("load_before"), r.get("load_after")) for n, r in runs.items()]
    busy = [f"{n} ({_fmt(a)} -> {_fmt(b)})" for n, a, b in loads if (a or 0) > LOAD_LIMIT or (b or 0) > LOAD_LIMIT]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m benchmarks.run{' --quick' if args.quick else ''} --repeats {args.repeats}` on "
        f"{started} ({minutes:.1f} min). Every comparison is measured side by side in the same run, A and B "
        "alternating in each repeat; **median** and min – max over the repeats. Re-run the command to regenerate "
        "this file; numbers are medians in `benchmarks/results.json`, every repeat's value in "
        "`benchmarks/results_detail.json`.",
        "",
        "## Machine",
        "",
        "| CPU | cores | RAM | Python | torch | ray | pyarrow | numpy |",
        "|---|---:|---:|---|---|---|---|---|",
        f"| {mach['cpu']} | {mach['cores']} | {mach['ram_gib']} GiB | {mach['python']} | {mach['torch']} | "
        f"{mach['ray']} | {mach['pyarrow']} | {mach['numpy']} |",
        "",
        f"Load average (1 min) at the start: {_fmt(load_start[0])}. "
        + (f"Busy (> {LOAD_LIMIT}) around: {', '.join(busy)}: other processes shared the 2 cores then, so those "
           "numbers are noisier." if busy else "The machine was otherwise quiet (load ≤ 2.5) throughout."),
        "",
        *gpu_section(),
        "",
        "## Results",
        "",
        "| benchmark | median | min – max | goal | interpretation |",
        "|---|---:|---|---|---|",
        *interpretations(R),
        "",
        "Torch threads: each Serve replica runs torch with 1 thread (`actors/teacher.py`: max(1, int(num_cpus))); "
        "the direct loop is pinned to 1 thread too (`torch.set_num_threads(1)`), so the comparison is like for "
        "like per teacher. The pipeline can still run its 3 teacher replicas on both cores at once; "
        "`label_vs_direct_2threads` gives the direct loop both cores instead.",
        "",
        "## Where the labeling time goes",
        "",
        *profile_section(R, runs),
        "",
        *train_section(R, runs),
        *fix_section(R, runs),
        "## How each benchmark measures",
        "",
        "- `label_*` (`benchmarks/bench_label.py`): 3 TorchScript MLP teachers (64 -> 1024 x 3 -> 10, random "
        "weights) on sklearn digits repeated (with noise) to ~20k rows; shard_size = max_batch_size = 256, "
        "label.concurrency 2, mean_prob at T=4. Labeling phase = `pipeline._label_shards` into a fresh store with "
        "the teachers already deployed (deployment timed apart), once with `label.executor: driver` and once with "
        "`ray_data` in the same alternation; direct = `benchmarks/direct.py` (load_teacher, "
        "chunks of max_batch_size, `build_shard`, `pq.write_table` per shard). With startup = `pipeline.label()` "
        "end to end (default config) vs direct including load_teacher. Ray: `ray.init(num_cpus=2)` with "
        "`pipeline.RAY_ENV`.",
        "- `kd_vs_hard_train*`, `train_*` (`benchmarks/bench_train.py`): `pipeline.train` on a complete 20k-row "
        "store, 2 workers x 0.5 CPU, batch 64/worker, 4 epochs, student 64-32-10; samples/s from the run "
        "history (rank 0 rows / epoch time x world size). The true hard-only baseline patches, for that run "
        "only, the dataset columns (no `soft.probs`) and the loop's step (plain cross-entropy). All runs use the "
        "default `train.read_in_driver_mb` except `kd_streamed` (`train.read_in_driver_mb: 0`: the store streamed "
        "with `ray.data.read_parquet`, the path before); `train_store_pass_*` time one pass over "
        "`pipeline._train_dataset` in the driver with each setting.",
        "- `store_*` (`benchmarks/bench_store.py`): a real top-k shard (64 windows x 127 positions, 2 teachers + "
        "ensemble, k=32, vocab 32k) written/read 20 times per variant per repeat; MB = in-memory Arrow bytes. "
        "Variants: the store as it is, `before` (the store's code before the no-copy / overlapped-sha256 change, "
        "inlined in the benchmark), pyarrow with the store's Parquet options, pyarrow's defaults; `sha256` alone "
        "over the same file's bytes.",
        "- `bytes_per_token_*` (`benchmarks/bench_lm_bytes.py`): synthetic next-token distributions over 32k "
        "tokens (logits s·N(0,1) - log(rank), s ~ U(3,6): entropy ≈ 3 nats, top-1 ≈ 0.4, see "
        "`synthetic_*` figures), 2 teachers, one 64 x 128 shard through `build_shard` + `LabelStore.write_shard`, "
        "bytes from `LabelStore.bytes_per_token`; KL(p32 || p16) over top-k + tail at T=1. "
        "`bytes_per_token_k32_shuffled_ids` is the worst case of a vocabulary in random order.",
        "- `label_cpu_s_*`, `label_stage_ms_*`, `label_startup_s`, `label_wall_s` (`label.executor: driver`), "
        "`label_ray_data_*` (`label.executor: ray_data`), `serve_roundtrip_ms` (`benchmarks/profile_label.py`): "
        "see above.",
        "- Every Ray benchmark sets `RAY_API_SERVER_ADDRESS` to a closed local port before `ray.init`: with "
        "`include_dashboard=False` Ray Train's PlacementGroupCleaner otherwise asks the state API of the most "
        "recently started Ray on the machine (`/tmp/ray/ray_current_cluster`), which during development was another "
        "process's cluster; it did not know our Train controller, took it for dead and removed the run's placement "
        "group mid-training (`benchmarks/common.py: ray_running`). The benchmarks start their Ray with "
        "`address=\"local\"` beside whatever else runs; the pipeline's `ray.init()` without an address attaches "
        "to a `ray start` cluster named in that file instead of starting a second one, so it asks its own cluster "
        "(a config with `ray.address: local` beside another `ray start` head would be exposed).",
        "",
    ]
    errors = {n: r for n, r in runs.items() if "error" in r}
    if errors:
        lines += ["## Errors", ""]
        for n, r in errors.items():
            lines += [f"- `{n}` failed ({r['error']}); last lines:", "", "```", *r.get("log_tail", [])[-15:], "```", ""]
    lines += ["## Every number", "", *all_numbers(R), ""]
    path.write_text("\n".join(lines))


def write_results(data_dir: Path, runs: dict) -> None:
    R = Results(runs)
    results = {"ratios": {n: d["median"] for n, d in R.all.items() if d["kind"] == "ratios"},
               "figures": {n: d["median"] for n, d in R.all.items() if d["kind"] == "figures"}}
    (data_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


GPU_RESULTS = Path(__file__).with_name("results_gpu.json")


def gpu_section() -> list[str]:
    """From benchmarks/results_gpu.json, written by `python -m benchmarks.bench_gpu_topk` on a GPU
    machine (this suite's machine has none): the LM teacher's top-k labeling vs plain prefill."""
    if not GPU_RESULTS.exists():
        return ["**GPU: not run.** No `benchmarks/results_gpu.json`: run `python -m benchmarks.bench_gpu_topk` "
                "on a machine with a CUDA GPU."]
    g = json.loads(GPU_RESULTS.read_text())
    ratio = g["teacher_vs_prefill"]
    return [
        "### GPU: LM teacher top-k labeling vs plain prefill",
        "",
        f"`python -m benchmarks.bench_gpu_topk` on {g['gpu']} (torch {g['torch']}), run apart from this suite "
        f"(the machine above has no GPU; results in `benchmarks/results_gpu.json`). {g['model']}, "
        f"{g['params'] / 1e9:.2f}B parameters, batch {g['batch']} x {g['length']} tokens, k={g['k']}, medians of "
        f"{g['repeats']} alternating repeats, through the project's `hf` teacher (`CausalLMTeacher`, num_gpus 1).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| plain prefill (forward, logits left on the GPU) | {_fmt(g['prefill_tokens_per_s'])} tokens/s |",
        f"| teacher: forward + log_softmax + top-k on the GPU + ids/log-probs to the host | "
        f"{_fmt(g['teacher_tokens_per_s'])} tokens/s |",
        f"| `gpu_topk_vs_prefill` | **{_fmt(ratio)}** |",
        f"| bf16 matrix-product rate measured in the same run | {_fmt(g['bf16_matmul_tflops'])} TFLOP/s |",
        f"| model FLOP utilisation (2·N FLOPs/token, N = {g['non_embedding_params'] / 1e6:.0f}M non-embedding) "
        f"prefill / teacher | {_fmt(g['prefill_mfu'])} / {_fmt(g['teacher_mfu'])} |",
        "",
        "The top-k step costs the difference: a log_softmax in float32 over the whole vocabulary and torch's topk "
        "(a one-off probe on the same H100, not part of the script: 5.4 ms per 8k-token batch after a 44.6 ms "
        "forward, 2.6 ms of it topk; top-k over the bf16 logits with a float32 logsumexp gives the same values and "
        "ids, in about the same time). "
        "vLLM's `prompt_logprobs` path (backend `vllm`) is not measured: the GPU machines here have no vLLM and no "
        "package registry, and its wheels are far over what can be carried there.",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke sizes (a few minutes)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per benchmark (default 3)")
    p.add_argument("--out", type=Path, default=None,
                   help="write BENCHMARKS.md, results.json and the profile here instead of the repo "
                        "(BENCHMARKS.md at the root, the rest under benchmarks/)")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS), help="a subset")
    p.add_argument("--render", type=Path, default=None, metavar="DETAIL_JSON",
                   help="only rewrite BENCHMARKS.md (and results.json) from a results_detail.json of an earlier run")
    p.add_argument("--max-wait", type=float, default=None,
                   help=f"seconds to wait for load average <= {LOAD_LIMIT} first (default 600, 0 with --quick)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    md_path = (args.out / "BENCHMARKS.md") if args.out else ROOT / "BENCHMARKS.md"
    data_dir = args.out if args.out else ROOT / "benchmarks"
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.render:
        d = json.loads(args.render.read_text())
        args.quick, args.repeats = d["quick"], d["repeats"]
        write_results(data_dir, d["runs"])
        write_markdown(md_path, d["runs"], d["machine"], args, d["started"], d["minutes"], d["load_average_at_start"])
        print(f"benchmarks: rewrote {md_path} from {args.render}")
        return 0
    load_start = wait_for_quiet(args.max_wait if args.max_wait is not None else (0 if args.quick else 600))
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    runs = {}
    for name in args.only:
        print(f"benchmarks: {name} ...", flush=True)
        runs[name] = run_one(name, args.quick, args.repeats, data_dir, timeout_s=1800)
        status = runs[name].get("error", "ok")
        print(f"benchmarks: {name} {status} in {runs[name]['elapsed_s']:.0f}s", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    mach = machine()
    write_results(data_dir, runs)
    detail = {"machine": mach, "started": started, "minutes": minutes, "quick": args.quick, "repeats": args.repeats,
              "load_average_at_start": load_start, "runs": runs}
    (data_dir / "results_detail.json").write_text(json.dumps(detail, indent=2, sort_keys=True, default=str) + "\n")
    write_markdown(md_path, runs, mach, args, started, minutes, load_start)
    print(f"benchmarks: wrote {md_path} and {data_dir / 'results.json'} ({minutes:.1f} min)", flush=True)
    return 1 if any("error" in r for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
