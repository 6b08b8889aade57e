"""bytes_per_token_k{8,16,32,64}: LM store size per token position per teacher, at a 32k vocabulary.

    python -m benchmarks.bench_lm_bytes [--quick] [--repeats N]

Synthetic but realistic next-token distributions: per position, logits over V = 32,000 tokens
are ``s * N(0, 1) - log(rank)`` with s ~ U(3, 6) per position (a frequency-ordered vocabulary,
as BPE vocabularies roughly are; Zipf-like prior). That gives a mean entropy of about 3 nats,
top-1 probability about 0.4 and top-32 mass about 0.85, in the range of real LMs on text. Two
teachers share the base logits plus their own N(0, 1) noise. Their top-k (sorted, T=1 log-probs)
go through the real path: orchestrator.soft_labels.build_shard (ensemble_topk + encode_topk) and
LabelStore.write_shard; bytes per token come from LabelStore.bytes_per_token (the written file's
column chunks / positions). Each repeat draws new data (seed = repeat).

Also reported: the same table written with pyarrow's defaults (dictionary + snappy: the store's
codec before commit 9bb8576 adopted BYTE_STREAM_SPLIT + zstd, orchestrator/store.py
shard_write_options; the store's options go to the notes as ``store_codec``), the naive layout
(int32 id + float32 log-prob = 8 bytes x k, and the same written as Parquet), the mean KL error that float16 storage of the log-probs introduces
(KL(p32 || p16) over the k listed tokens + the tail bucket, in nats), and a worst case with the
vocabulary's ids in random order (no frequency ordering: ids are incompressible).
"""
from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import Samples, emit, log, run_main, sizes

VOCAB = 32_000
KS = (8, 16, 32, 64)


def synth_topk(rng: np.random.Generator, positions: int, teachers: int, k: int, shuffle_ids: bool = False,
               chunk: int = 512) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-k (ids int32, logprobs float32) [M, N, k] sorted descending, and distribution stats."""
    prior = -np.log(np.arange(1, VOCAB + 1, dtype=np.float32))  # float32, as the teachers' log_softmax
    perm = rng.permutation(VOCAB) if shuffle_ids else None
    ids = np.empty((teachers, positions, k), np.int32)
    lps = np.empty((teachers, positions, k), np.float32)
    ent = top1 = mass = 0.0
    for a in range(0, positions, chunk):
        n = min(chunk, positions - a)
        scale = rng.uniform(3.0, 6.0, (n, 1)).astype(np.float32)
        base = rng.standard_normal((n, VOCAB), dtype=np.float32) * scale + prior
        for m in range(teachers):
            z = base + rng.standard_normal((n, VOCAB), dtype=np.float32)
            z -= z.max(axis=1, keepdims=True)
            lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            part = np.argpartition(-lp, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(lp, part, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(part, order, axis=1)
            ids[m, a: a + n] = perm[top] if perm is not None else top
            lps[m, a: a + n] = np.take_along_axis(lp, top, axis=1)
            if m == 0:
                p = np.exp(lp)
                ent += float(-(p * lp).sum())
                top1 += float(np.exp(lps[m, a: a + n, 0]).sum())
                mass += float(np.exp(lps[m, a: a + n]).sum())
    return ids, lps, {"entropy_nats": ent / positions, "top1_prob": top1 / positions, "topk_mass": mass / positions}


def fp16_kl(lps: np.ndarray) -> float:
    """Mean KL(p32 || p16) in nats over positions: top-k + tail from float32 vs float16 log-probs."""
    from orchestrator.ensemble import _soften_topk

    lp32 = lps.astype(np.float64)
    lp16 = lps.astype(np.float16).astype(np.float64)
    a = _soften_topk(lp32, 1.0)  # [.., k+1] log-probs, tail last (renormalised if mass > 1)
    b = _soften_topk(lp16, 1.0)
    kl = np.where(np.isfinite(a), np.exp(a) * (a - np.where(np.isfinite(b), b, -745.0)), 0.0).sum(axis=-1)
    return float(kl.mean())


def store_bytes_per_token(work: Path, ids: np.ndarray, lps: np.ndarray, windows: int, length: int, k: int,
                          rng: np.random.Generator) -> tuple[dict, int, dict, dict]:
    """Write one shard through the real codec; return LabelStore.bytes_per_token(), the file's
    bytes, the bytes per token of the same table written with pyarrow's default options, and
    the store's Parquet options for it."""
    from orchestrator.soft_labels import build_shard
    from orchestrator.store import LabelStore, shard_write_options, topk_columns

    names = [f"teacher{m}" for m in range(ids.shape[0])]
    path = work / f"store-k{k}"
    shutil.rmtree(path, ignore_errors=True)
    tokens = rng.integers(0, VOCAB, (windows, length)).astype(np.int32)
    inputs = pa.table({"sample_id": pa.array([f"w{i}" for i in range(windows)]),
                       "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), length),
                       "row": pa.array(np.arange(windows), pa.int64())})
    ensemble = {"mode": "mean_prob", "temperature": 1.0, "tau": 1.0, "weights": {n: 1.0 for n in names}}
    identity = {"schema_version": 1, "dataset": {"source": "synthetic", "rows": windows, "max_len": length},
                "teachers": [{"name": n, "backend": "hf", "fingerprint": n} for n in names],
                "label_kind": "topk", "k": k, "shard_size": windows}
    store = LabelStore(str(path))
    store.create({**identity, "ensemble": ensemble, "num_classes": VOCAB,
                  "lm": {"vocab_size": VOCAB, "max_len": length}}, inputs)
    outputs = {n: (ids[m].reshape(windows, length - 1, k), lps[m].reshape(windows, length - 1, k))
               for m, n in enumerate(names)}
    table, _ = build_shard(inputs, outputs, store.manifest)
    info = store.write_shard(0, table)
    assert not store.record_finished()
    # pyarrow's defaults (the store's codec before 9bb8576) on the very same table.
    positions = windows * (length - 1)

    def per_token(sizes: dict) -> dict:
        return {n: sum(sizes.get(c, 0) for c in topk_columns(n)) / positions for n in [*names, "soft"]}

    defaults = per_token(column_bytes(table_buffer(table)))
    return store.bytes_per_token(), info.bytes, defaults, shard_write_options(table)


def table_buffer(table: pa.Table, **kw) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()


def column_bytes(data: bytes | pa.Buffer) -> dict[str, int]:
    """Compressed bytes per top-level column of a Parquet file (as LabelStore.bytes_per_token sums them)."""
    from orchestrator.store import column_sizes

    return column_sizes(pq.ParquetFile(pa.BufferReader(data)).metadata)


def codec_text(opts: dict) -> str:
    """The store's Parquet options for the top-k columns, in words (e.g. "BYTE_STREAM_SPLIT + zstd, no dictionary")."""
    if not opts:
        return "pyarrow's defaults"
    codec = ("BYTE_STREAM_SPLIT + " if opts.get("use_byte_stream_split") else "") + opts.get("compression", "snappy")
    return codec + (", no dictionary" if opts.get("use_dictionary") is False else "")


def naive_parquet_bytes(ids: np.ndarray, lps: np.ndarray) -> float:
    """One teacher's top-k as int32 ids + float32 log-probs, written by pyarrow defaults; bytes/position."""
    n, k = ids.shape
    t = pa.table({"ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int32)), k),
                  "lps": pa.FixedSizeListArray.from_arrays(pa.array(lps.reshape(-1).astype(np.float32)), k)})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    cols = sum(meta.row_group(r).column(c).total_compressed_size for r in range(meta.num_row_groups)
               for c in range(meta.num_columns))
    return cols / n


def main(quick: bool, repeats: int) -> None:
    s = sizes(quick)
    windows, length = s["lm_windows"], s["lm_len"]
    positions = windows * (length - 1)
    work = Path(tempfile.mkdtemp(prefix="bench-lmbytes-"))
    samples, notes = Samples(), {"vocab": VOCAB, "windows": windows, "max_len": length, "positions": positions,
                                 "teachers": 2}
    try:
        for r in range(repeats):
            rng = np.random.default_rng(r)
            ids64, lps64, stats = synth_topk(rng, positions, 2, max(KS))
            for key, v in stats.items():
                samples.add(key, v)
            for k in KS:
                ids, lps = ids64[..., :k], lps64[..., :k]
                per, file_bytes, defaults, opts = store_bytes_per_token(work, ids, lps, windows, length, k, rng)
                notes["store_codec"] = codec_text(opts)
                teacher_bpt = float(np.mean([v for n, v in per.items() if n != "soft"]))
                samples.add(f"bpt_k{k}", teacher_bpt)
                samples.add(f"bpt_defaults_k{k}", float(np.mean([v for n, v in defaults.items() if n != "soft"])))
                samples.add(f"bpt_soft_k{k}", per["soft"])
                samples.add(f"naive_raw_k{k}", 8.0 * k)
                samples.add(f"naive_parquet_k{k}", naive_parquet_bytes(ids[0].reshape(-1, k), lps[0].reshape(-1, k)))
                samples.add(f"kl_fp16_k{k}", fp16_kl(lps))
                samples.add(f"ratio_vs_naive_k{k}", teacher_bpt / (8.0 * k))
                log(f"lm bytes repeat {r}: k={k}: {teacher_bpt:.1f} B/token/teacher (naive {8 * k}, "
                    f"pyarrow defaults {samples.values[f'bpt_defaults_k{k}'][-1]:.1f}), "
                    f"fp16 KL {samples.values[f'kl_fp16_k{k}'][-1]:.2e}")
            # Worst case: ids in random order (no frequency-ordered vocabulary), k = 32 only.
            ids_u, lps_u, _ = synth_topk(rng, positions, 2, 32, shuffle_ids=True)
            per, _, defaults, _ = store_bytes_per_token(work, ids_u, lps_u, windows, length, 32, rng)
            samples.add("bpt_k32_shuffled", float(np.mean([v for n, v in per.items() if n != "soft"])))
            samples.add("bpt_defaults_k32_shuffled", float(np.mean([v for n, v in defaults.items() if n != "soft"])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {}
    for k in KS:
        figures[f"bytes_per_token_k{k}"] = f"bpt_k{k}"
        figures[f"bytes_per_token_soft_k{k}"] = f"bpt_soft_k{k}"
        figures[f"bytes_per_token_pyarrow_defaults_k{k}"] = f"bpt_defaults_k{k}"
        figures[f"bytes_per_token_naive_k{k}"] = f"naive_raw_k{k}"
        figures[f"bytes_per_token_naive_parquet_k{k}"] = f"naive_parquet_k{k}"
        figures[f"fp16_mean_kl_nats_k{k}"] = f"kl_fp16_k{k}"
    figures["bytes_per_token_k32_shuffled_ids"] = "bpt_k32_shuffled"
    figures["bytes_per_token_pyarrow_defaults_k32_shuffled_ids"] = "bpt_defaults_k32_shuffled"
    figures["synthetic_entropy_nats"] = "entropy_nats"
    figures["synthetic_top1_prob"] = "top1_prob"
    figures["synthetic_top64_mass"] = "topk_mass"
    emit(ratios={f"bytes_per_token_k{k}_vs_naive": f"ratio_vs_naive_k{k}" for k in KS}, figures=figures,
         samples=samples, notes=notes)


if __name__ == "__main__":
    run_main(main)
