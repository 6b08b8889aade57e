"""Cost of LM teacher features (teachers[].features, task lm, pool none) at ~100M parameters:
labeling time and peak RSS with and without one captured layer, and the stored bytes per token of
the feature column beside the top-k's. Random weights from a config (vocab 49,152, hidden 768,
12 layers, tied embeddings: ~108M), one process per measurement (peak RSS only grows within a
process), alternating plain / features runs so both see the same machine. No Ray: the teacher's
own labeling call (orchestrator/models.py CausalLMTeacher), the shard build and the store write.

    python -m benchmarks.lm_features_bench [--windows 16] [--len 512] [--layer 6] [--repeats 2]

Writes benchmarks/results_lm_features.json and prints `BENCH_RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 4  # windows per teacher call (a Serve batch of this size)


def build(root: Path, vocab: int, length: int) -> tuple[Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=768, intermediate_size=1536, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=length,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(root / "teacher"))
    return root / "teacher", sum(p.numel() for p in model.parameters())


def one_run(path: str, windows: int, length: int, layer: int | None, out: str) -> None:
    """Label `windows` random windows with the teacher (plain, or capturing `layer`), build and
    write the shard; print a JSON line with seconds, peak RSS and bytes per token."""
    import pyarrow.parquet as pq
    import torch

    from orchestrator.datasets import token_table
    from orchestrator.lm_features import feature_bytes_per_token
    from orchestrator.models import CausalLMTeacher
    from orchestrator.soft_labels import build_shard
    from orchestrator.store import LabelStore, column_sizes, topk_columns

    torch.set_num_threads(2)
    k, vocab = 32, 49152
    cfg = {"name": "t", "path": path, **({"features": [layer], "pool": "none"} if layer is not None else {})}
    teacher = CausalLMTeacher(cfg, k)
    rows = np.random.default_rng(0).integers(3, vocab, size=(windows, length))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    call = teacher.forward_features if layer is not None else teacher
    parts = [call(rows[i:i + CHUNK]) for i in range(0, windows, CHUNK)]
    label_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    answer = tuple(np.concatenate([p[j] for p in parts]) for j in range(2))
    if layer is not None:
        answer = (*answer, {str(layer): np.concatenate([p[2][str(layer)] for p in parts])})
    inputs = token_table(rows.astype(np.int32))
    teachers = [{"name": "t", "backend": "hf", "fingerprint": "x",
                 **({"features": [layer], "pool": "none"} if layer is not None else {})}]
    manifest = {"label_kind": "topk", "k": k, "teachers": teachers, "lm": {"vocab_size": vocab, "max_len": length},
                "ensemble": {"mode": "mean_prob", "temperature": 1.0, "tau": 1.0, "weights": {"t": 1.0}}}
    table, _ = build_shard(inputs, {"t": answer}, manifest)
    store = LabelStore(tempfile.mkdtemp(prefix="lmfeat-store-"))
    info = store.write_shard(0, table)
    pf = pq.ParquetFile(store.shard_path(0))
    positions = windows * (length - 1)
    topk = sum(column_sizes(pf.metadata)[c] for c in topk_columns("t")) / positions
    feat = feature_bytes_per_token(pf, length) or {}
    res = {"label_s": label_s, "tokens_per_s": rows.size / label_s, "peak_rss_gib": peak, "rss_after_load_gib": rss0,
           "shard_bytes": info.bytes, "topk_bytes_per_token": topk,
           "feature_bytes_per_token": next(iter(feat.values()), None)}
    Path(out).write_text(json.dumps(res))


def interleaved(path: str, length: int, layer: int, n: int) -> dict:
    """Seconds per teacher call on one chunk (CHUNK windows), plain and with features alternating
    in one process, n of each: min and median, robust to other jobs on a shared machine."""
    import torch

    from orchestrator.models import CausalLMTeacher

    torch.set_num_threads(2)
    teacher = CausalLMTeacher({"name": "t", "path": path, "features": [layer], "pool": "none"}, 32)
    rows = np.random.default_rng(1).integers(3, 49152, size=(CHUNK, length))
    teacher(rows)  # warm-up (the plain-head check, allocator)
    times = {"plain": [], "features": []}
    for _ in range(n):
        for mode, call in (("plain", teacher), ("features", teacher.forward_features)):
            t0 = time.perf_counter()
            call(rows)
            times[mode].append(time.perf_counter() - t0)
    return {m: {"min_s": min(v), "median_s": float(np.median(v)), "all_s": v} for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--interleave", type=int, default=5, help="alternating calls per mode in one process (0: off)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # path windows len layer|none out
    args = ap.parse_args()
    if args.child:
        path, w, n, layer, out = args.child
        one_run(path, int(w), int(n), None if layer == "none" else int(layer), out)
        return
    root = Path(tempfile.mkdtemp(prefix="lmfeat-bench-"))
    path, params = build(root, 49152, args.len)
    runs = {"plain": [], "features": []}
    for r in range(args.repeats):
        for mode in ("plain", "features"):
            out = root / f"{mode}-{r}.json"
            layer = str(args.layer) if mode == "features" else "none"
            subprocess.run([sys.executable, "-m", "benchmarks.lm_features_bench", "--child", str(path),
                            str(args.windows), str(args.len), layer, str(out)], check=True)
            runs[mode].append(json.loads(out.read_text()))
            print(f"[lm-features] {mode} run {r}: {runs[mode][-1]}", flush=True)
    calls = interleaved(str(path), args.len, args.layer, args.interleave) if args.interleave else None
    print(f"[lm-features] interleaved calls: {calls}", flush=True)
    result = {"interleaved_calls": calls, "setup": {"params_m": params / 1e6, "windows": args.windows, "len": args.len, "layer": args.layer,
                        "hidden": 768, "k": 32, "threads": 2, "chunk": CHUNK}, "runs": runs,
              "median": {m: {key: float(np.median([r[key] for r in rs])) for key in ("label_s", "peak_rss_gib")}
                         for m, rs in runs.items()}}
    Path("benchmarks/results_lm_features.json").write_text(json.dumps(result, indent=2))
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
