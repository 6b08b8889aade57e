"""Run every benchmark and write its numbers: results.json, results_detail.json, results.md.

    python -m benchmarks.run                  # full sizes, 3 repeats (about 15 minutes on 2 cores)
    python -m benchmarks.run --quick --repeats 1 --out /tmp/b   # smoke size, files under /tmp/b
    python -m benchmarks.run --only kd_loss --merge   # re-run one; keep the others' numbers

Each benchmark runs in its own process (one Ray per process, see benchmarks/common.py) and
measures its comparisons side by side, alternating the order of A and B in each repeat.
results.json holds the medians: {"ratios": {NAME: float}, "figures": {NAME: float}};
results_detail.json keeps every repeat's value, min-max, the machine and the load; results.md
is the same numbers as one table (with the goals below). What the numbers mean is written by
hand in BENCHMARKS.md, not generated here.
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

# name -> (module, extra arguments; "{out}" is replaced by the output folder). To add a
# benchmark, add a line: its module prints one BENCH_RESULT line (benchmarks/common.py: emit).
BENCHMARKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "store": ("benchmarks.bench_store", ()),
    "lm_bytes": ("benchmarks.bench_lm_bytes", ()),
    "label": ("benchmarks.bench_label", ()),
    "profile_label": ("benchmarks.profile_label", ("--out", "{out}")),
    "train": ("benchmarks.bench_train", ()),
    "kd_loss": ("benchmarks.bench_kd_loss", ()),
}
# Goals (ISSUES / DESIGN): name -> (">=" or "<=", threshold). Shown in results.md beside the value.
GOALS = {
    "label_vs_direct": (">=", 0.90),
    "store_write_vs_pyarrow": (">=", 0.90),
    "store_read_vs_pyarrow": (">=", 0.90),
    "bytes_per_token_k32": ("<=", 64.0),
    **{f"codec_mean_kl_nats_k{k}": ("<=", 1e-3) for k in (8, 16, 32, 64)},
}
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
    module, extra = BENCHMARKS[name]
    cmd = [sys.executable, "-m", module, "--repeats", str(repeats), *(a.format(out=out) for a in extra)]
    cmd += ["--quick"] if quick else []
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


def fmt(v: float | None) -> str:
    """Three significant digits (thousands separated), or n/a."""
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


def collect(runs: dict) -> dict[str, dict]:
    """name -> {kind, median, min, max, benchmark} over every benchmark's ratios and figures."""
    out = {}
    for bench, r in runs.items():
        for kind in ("ratios", "figures"):
            for name, d in (r.get(kind) or {}).items():
                out[name] = {**d, "kind": kind[:-1], "benchmark": bench}
    return out


def numbers_table(runs: dict, mach: dict, header: str) -> str:
    """results.md: the machine, then every number (median, min - max, goal) as plain tables."""
    rows = collect(runs)
    lines = [f"# Benchmark numbers\n\n{header}\n",
             "| CPU | cores | RAM GiB | Python | torch | ray | pyarrow | numpy |", "|---|---:|---:|---|---|---|---|---|",
             f"| {mach['cpu']} | {mach['cores']} | {mach['ram_gib']} | {mach['python']} | {mach['torch']} | "
             f"{mach['ray']} | {mach['pyarrow']} | {mach['numpy']} |", "",
             "| benchmark | started | seconds | load before | load after | status |", "|---|---|---:|---:|---:|---|"]
    for bench, r in runs.items():
        lines.append(f"| {bench} | {r.get('started', '')} | {r['elapsed_s']:.0f} | {fmt(r.get('load_before'))} | "
                     f"{fmt(r.get('load_after'))} | {r.get('error', 'ok')} |")
    lines += ["", "| name | kind | median | min – max | goal | met |", "|---|---|---:|---|---|---|"]
    for name in sorted(rows):
        d = rows[name]
        goal, met = "", ""
        if name in GOALS:
            op, x = GOALS[name]
            goal, met = f"{op} {fmt(x)}", ("yes" if (d["median"] >= x if op == ">=" else d["median"] <= x) else "no")
        lines.append(f"| `{name}` | {d['kind']} | {fmt(d['median'])} | {fmt(d['min'])} – {fmt(d['max'])} | {goal} | {met} |")
    for bench, r in runs.items():
        if "error" in r:
            lines += ["", f"`{bench}` failed ({r['error']}); last lines:", "", "```", *r.get("log_tail", [])[-15:], "```"]
    return "\n".join(lines) + "\n"


def write_outputs(data_dir: Path, detail: dict) -> None:
    runs = detail["runs"]
    rows = collect(runs)
    results = {kind: {n: d["median"] for n, d in rows.items() if d["kind"] == kind[:-1]} for kind in ("ratios", "figures")}
    (data_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (data_dir / "results_detail.json").write_text(json.dumps(detail, indent=2, sort_keys=True, default=str) + "\n")
    header = (f"`python -m benchmarks.run{' --quick' if detail['quick'] else ''} --repeats {detail['repeats']}`, "
              f"{detail['started']}, {detail['minutes']:.1f} min; median and min – max over the repeats; "
              f"1-minute load average at the start {fmt(detail['load_average_at_start'][0])}.")
    if merged := detail.get("merged_into"):
        header += (f" Merged (`--merge`) into the runs of {merged['started']} (--repeats {merged['repeats']}): "
                   "each benchmark's start is in the table below.")
    (data_dir / "results.md").write_text(numbers_table(runs, detail["machine"], header))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke sizes (a few minutes)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per benchmark (default 3)")
    p.add_argument("--out", type=Path, default=None, help="write the files here instead of benchmarks/")
    p.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS), help="a subset")
    p.add_argument("--merge", action="store_true",
                   help="keep the other benchmarks' runs from the output folder's results_detail.json")
    p.add_argument("--render", type=Path, default=None, metavar="DETAIL_JSON",
                   help="only rewrite results.json and results.md from a results_detail.json of an earlier run")
    p.add_argument("--max-wait", type=float, default=None,
                   help=f"seconds to wait for load average <= {LOAD_LIMIT} first (default 600, 0 with --quick)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    data_dir = args.out if args.out else ROOT / "benchmarks"
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.render:
        write_outputs(data_dir, json.loads(args.render.read_text()))
        print(f"benchmarks: rewrote {data_dir / 'results.md'} from {args.render}")
        return 0
    load_start = wait_for_quiet(args.max_wait if args.max_wait is not None else (0 if args.quick else 600))
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    runs = {}
    for name in args.only:
        print(f"benchmarks: {name} ...", flush=True)
        at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        runs[name] = {**run_one(name, args.quick, args.repeats, data_dir, timeout_s=1800), "started": at}
        print(f"benchmarks: {name} {runs[name].get('error', 'ok')} in {runs[name]['elapsed_s']:.0f}s", flush=True)
    detail = {"machine": machine(), "started": started, "minutes": (time.perf_counter() - t0) / 60,
              "quick": args.quick, "repeats": args.repeats, "load_average_at_start": load_start, "runs": runs}
    old = data_dir / "results_detail.json"
    if args.merge and old.exists():  # the others' runs as they were (each row of results.md says when it ran)
        before = json.loads(old.read_text())
        kept = {n: {"started": before["started"], **r} for n, r in before["runs"].items() if n not in runs}
        detail["runs"] = {**kept, **runs}
        detail["merged_into"] = {k: before[k] for k in ("started", "minutes", "repeats", "load_average_at_start")}
    write_outputs(data_dir, detail)
    print((data_dir / "results.md").read_text())
    print(f"benchmarks: wrote {data_dir / 'results.json'} and {data_dir / 'results.md'} ({detail['minutes']:.1f} min)",
          flush=True)
    return 1 if any("error" in r for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
