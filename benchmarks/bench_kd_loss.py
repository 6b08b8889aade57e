"""kd_loss_*: peak memory and tokens/s of one forward + backward of an LM loss, per vocabulary size.

    python -m benchmarks.bench_kd_loss [--quick] [--repeats N]

Cases, on [4, 1024] tokens (N = 4096 positions), float32, k = 32 (quick: [1, 256], V 8k / 16k):

  ce         plain cross-entropy on the logits (hard labels): the floor every LM step pays
  unchunked  TopKKDLoss(alpha 0.5, T 1) over all positions at once (chunk_size=None: the loss
             before chunking)
  chunk1024  the same loss in chunks of 1024 positions
  chunk256   the same loss in chunks of 256 positions

at V = 49,152 and V = 151,936. The logits come from a linear head (hidden 256 -> V, weights
and the [N, 256] hidden states require grad), so the [B, L, V] logits and the head's backward
exist as in a real model; they are part of what is measured, in every case alike.

Peak memory: torch on CPU allocates outside Python's allocator (tracemalloc sees none of it),
so each case runs in a fresh subprocess and reads the kernel's resident-set high-water mark:
after the inputs exist and one warm-up step ran, ``/proc/self/clear_refs`` (5) resets VmHWM to
the current RSS; the figure is VmHWM after one more forward + backward minus that RSS (MiB).
The child runs with MALLOC_MMAP_THRESHOLD_=65536: glibc then mmaps every block of 64 KiB or
more and returns it to the kernel when freed, so RSS follows the live tensors.
tokens/s: positions / median seconds of the timed forward + backward steps.

Per repeat the cases run one after another in alternating order. A case whose estimated peak
does not fit the machine's available memory is skipped and named in the notes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.common import ROOT, Samples, emit, log, ratio_samples, run_main

CASES = ("ce", "unchunked", "chunk1024", "chunk256")
HIDDEN, K = 256, 32


def plan(quick: bool) -> dict:
    if quick:
        return {"batch": 1, "length": 256, "vocabs": (8192, 16384), "steps": 1}
    return {"batch": 4, "length": 1024, "vocabs": (49152, 151936), "steps": 2}


def vocab_tag(v: int) -> str:
    return f"v{round(v / 1000)}k"


# ---- one case, in its own process --------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def chunk_of(case: str) -> int | None:
    """Positions per chunk of a case's loss (None: unchunked; ce has no top-k loss)."""
    return int(case[len("chunk"):]) if case.startswith("chunk") else None


def run_case(case: str, batch: int, length: int, vocab: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from orchestrator.losses import TopKKDLoss

    torch.manual_seed(0)
    n = batch * length
    hidden = torch.randn(batch, length, HIDDEN, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, vocab, bias=False)
    labels = torch.randint(0, vocab, (batch, length))
    ids = torch.randint(0, vocab, (batch, length, K))
    lps = torch.log_softmax(torch.randn(batch, length, K + 1), dim=-1)[..., :K].contiguous()
    mask = torch.ones(batch, length, dtype=torch.bool)
    loss_fn = TopKKDLoss(alpha=0.5, temperature=1.0, chunk_size=chunk_of(case))

    def step():
        logits = head(hidden)  # [B, L, V]
        if case == "ce":
            loss = F.cross_entropy(logits.view(n, vocab), labels.view(n))
        else:
            loss = loss_fn(logits, ids, lps, labels, mask)
        loss.backward()
        hidden.grad = None
        head.weight.grad = None
        return loss.item()

    step()  # warm-up: thread pools, allocator arenas
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    t0 = time.perf_counter()
    step()
    seconds = [time.perf_counter() - t0]
    peak = _status("VmHWM") - base
    for _ in range(steps - 1):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    seconds.sort()
    return {"peak_mib": peak / 2**20, "tokens_per_s": n / seconds[len(seconds) // 2], "torch_threads": torch.get_num_threads()}


def estimated_bytes(case: str, n: int, vocab: int) -> int:
    """A bound of a case's peak ([N, V] float32 copies alive at once), to skip what cannot fit:
    measured at V = 49,152 on [4, 1024] (2026-12-01), ce 3.8 copies, unchunked 4.8, chunked <= 3.1."""
    copies = {"ce": 4, "unchunked": 5}.get(case, 3)
    return copies * n * vocab * 4


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def spawn(case: str, p: dict, vocab: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_kd_loss", "--case", case, "--batch", str(p["batch"]),
           "--length", str(p["length"]), "--vocab", str(vocab), "--steps", str(p["steps"])]
    # Every block of 64 KiB or more mmap'ed, and unmapped when freed: without this, glibc raises
    # its mmap threshold after the warm-up step (up to 32 MiB) and serves the measured step from
    # memory it kept, which RSS does not show.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the benchmark ---------------------------------------------------------------------------


def main(quick: bool, repeats: int) -> None:
    p = plan(quick)
    n = p["batch"] * p["length"]
    s, notes = Samples(), {"tokens": [p["batch"], p["length"]], "hidden": HIDDEN, "k": K,
                           "memory": "RSS high-water mark delta of one forward+backward, fresh process per case"}
    for r in range(repeats):
        for vocab in p["vocabs"]:
            for case in (CASES if r % 2 == 0 else CASES[::-1]):
                tag = f"{case}_{vocab_tag(vocab)}"
                if estimated_bytes(case, n, vocab) > available_bytes():
                    notes.setdefault("skipped (memory)", []).append(tag)
                    continue
                res = spawn(case, p, vocab)
                log(f"repeat {r}: {tag}: peak {res['peak_mib']:.0f} MiB, {res['tokens_per_s']:.0f} tokens/s")
                s.add(f"peak_mib_{tag}", res["peak_mib"])
                s.add(f"tokens_per_s_{tag}", res["tokens_per_s"])
    ratios, figures = {}, {}
    for vocab in p["vocabs"]:
        v = vocab_tag(vocab)
        for what in ("peak_mib", "tokens_per_s"):
            for a, b in (("chunk1024", "ce"), ("chunk256", "ce"), ("chunk1024", "unchunked"), ("chunk256", "unchunked"),
                         ("chunk256", "chunk1024"), ("unchunked", "ce")):
                num, den = f"{what}_{a}_{v}", f"{what}_{b}_{v}"
                if num in s.values and den in s.values:
                    name = f"kd_loss_{what}_{a}_vs_{b}_{v}"
                    ratio_samples(s, name, num, den)
                    ratios[name] = name
            for case in CASES:
                figures[f"kd_loss_{what}_{case}_{v}"] = f"{what}_{case}_{v}"
    emit(ratios, figures, s, notes)


if __name__ == "__main__":
    if "--case" in sys.argv:
        import argparse

        a = argparse.ArgumentParser()
        a.add_argument("--case", choices=CASES)
        for name in ("batch", "length", "vocab", "steps"):
            a.add_argument(f"--{name}", type=int)
        args = a.parse_args()
        print(json.dumps(run_case(args.case, args.batch, args.length, args.vocab, args.steps)))
    else:
        run_main(main)
