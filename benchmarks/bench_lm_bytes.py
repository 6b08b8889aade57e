"""bytes_per_token_k{8,16,32,64}: LM store size per token position per teacher, at a 32k vocabulary,
and the KL error of what the store gives back.

    python -m benchmarks.bench_lm_bytes [--quick] [--repeats N]

Synthetic but realistic next-token distributions: per position, logits over V = 32,000 tokens
are ``s * N(0, 1) - log(rank)`` with s ~ U(3, 6) per position (a frequency-ordered vocabulary,
as BPE vocabularies roughly are; Zipf-like prior). That gives a mean entropy of about 3 nats,
top-1 probability about 0.4 and top-32 mass about 0.85, in the range of real LMs on text. Two
teachers share the base logits plus their own N(0, 1) noise. Their top-k (sorted, T=1 log-probs)
go through the real path: orchestrator.soft_labels.build_shard (codec + ensemble_topk +
encode_topk) and LabelStore.write_shard; bytes per token come from LabelStore.bytes_per_token
(the written file's column chunks / positions). Each repeat draws new data (seed = repeat).

The KL error is KL(exact || decoded) in nats per position over the k listed tokens + the tail
bucket, exact = the teachers' float32 top-k, decoded = decode_topk of the written shard.
Also reported, on the same tables: the version-1 layout (int16 ids in probability order +
float16 log-probs, BYTE_STREAM_SPLIT + zstd), the version-2 layout (int16 plain gaps, 127-level
codes, dictionary-encoded), pyarrow's defaults on the stored columns, the
naive layout (int32 id + float32 log-prob = 8 bytes x k), a worst case with the vocabulary's ids
in random order, and DistillKit's published figures as constants (not measured here).
"""
from __future__ import annotations

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


# DistillKit's offline-logit format, published figures (constants for comparison, not measured).
DISTILLKIT_BYTES_PER_TOKEN_K50 = 114.0
DISTILLKIT_BYTES_PER_ENTRY = 2.3


def kl_error(ids: np.ndarray, lps: np.ndarray, d_ids: np.ndarray, d_lps: np.ndarray) -> float:
    """Mean KL(exact || decoded) in nats over positions: k listed tokens (matched by id) + tail."""
    from orchestrator.ensemble import _soften_topk

    ia, ib = np.argsort(ids, axis=-1), np.argsort(d_ids, axis=-1)
    assert (np.take_along_axis(ids, ia, -1) == np.take_along_axis(d_ids, ib, -1)).all(), "ids changed"
    a = _soften_topk(np.take_along_axis(lps, ia, -1).astype(np.float64)[None], 1.0)[0]
    b = _soften_topk(np.take_along_axis(d_lps, ib, -1).astype(np.float64)[None], 1.0)[0]
    return float(np.where(np.isfinite(a), np.exp(a) * (a - b), 0.0).sum(-1).mean())


def inputs_table(windows: int, length: int, rng: np.random.Generator) -> pa.Table:
    tokens = rng.integers(0, VOCAB, (windows, length)).astype(np.int32)
    return pa.table({"sample_id": pa.array([f"w{i}" for i in range(windows)]),
                     "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), length),
                     "row": pa.array(np.arange(windows), pa.int64())})


def store_shard(work: Path, ids: np.ndarray, lps: np.ndarray, windows: int, length: int, k: int,
                rng: np.random.Generator):
    """Write one shard through the real path; return (LabelStore.bytes_per_token(), the table
    written, the shard as read back)."""
    from orchestrator.soft_labels import build_shard
    from orchestrator.store import SCHEMA_VERSION, LabelStore

    names = [f"teacher{m}" for m in range(ids.shape[0])]
    path = work / f"store-k{k}"
    shutil.rmtree(path, ignore_errors=True)
    inputs = inputs_table(windows, length, rng)
    ensemble = {"mode": "mean_prob", "temperature": 1.0, "tau": 1.0, "weights": {n: 1.0 for n in names}}
    identity = {"schema_version": SCHEMA_VERSION, "dataset": {"source": "synthetic", "rows": windows, "max_len": length},
                "teachers": [{"name": n, "backend": "hf", "fingerprint": n} for n in names],
                "label_kind": "topk", "k": k, "shard_size": windows}
    store = LabelStore(str(path))
    store.create({**identity, "ensemble": ensemble, "num_classes": VOCAB,
                  "lm": {"vocab_size": VOCAB, "max_len": length}}, inputs)
    outputs = {n: (ids[m].reshape(windows, length - 1, k), lps[m].reshape(windows, length - 1, k))
               for m, n in enumerate(names)}
    table, _ = build_shard(inputs, outputs, store.manifest)
    store.write_shard(0, table)
    assert not store.record_finished()
    return store.bytes_per_token(), table, store.read_shard(0)


def column_bytes_per_token(table: pa.Table, columns: list[str], positions: int, **options) -> float:
    """Compressed bytes of ``columns`` per position, ``table`` written with ``options``."""
    from orchestrator.store import column_sizes

    sink = pa.BufferOutputStream()
    pq.write_table(table.select(columns), sink, **options)
    sizes = column_sizes(pq.ParquetFile(pa.BufferReader(sink.getvalue())).metadata)
    return sum(sizes.values()) / positions


def v1_bytes_per_token(ids: np.ndarray, lps: np.ndarray, windows: int) -> float:
    """One teacher's top-k in the version-1 layout: int16 ids in probability order + float16
    log-probs, BYTE_STREAM_SPLIT + zstd, no dictionary."""
    n, k = ids.shape
    t = pa.table({"i": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int16)), n // windows * k),
                  "l": pa.FixedSizeListArray.from_arrays(pa.array(lps.reshape(-1).astype(np.float16), pa.float16()),
                                                         n // windows * k)})
    return column_bytes_per_token(t, ["i", "l"], n, compression="zstd", use_dictionary=False,
                                  use_byte_stream_split=["i.list.element", "l.list.element"])


def v2_bytes_per_token(ids: np.ndarray, lps: np.ndarray, windows: int) -> float:
    """One teacher's top-k in the version-2 layout: plain gaps of the sorted ids (int16,
    BYTE_STREAM_SPLIT) + round(127 sqrt(p)) codes with the tail (uint8, dictionary), zstd."""
    n, k = ids.shape
    order = np.argsort(ids, axis=-1)
    p = np.exp(np.take_along_axis(lps, order, -1).astype(np.float64))
    gaps = np.diff(np.take_along_axis(ids, order, -1), axis=-1, prepend=-1).astype(np.int16)
    codes = np.rint(127 * np.sqrt(np.concatenate([p, np.clip(1 - p.sum(-1, keepdims=True), 0, 1)], -1))).astype(np.uint8)
    t = pa.table({"i": pa.FixedSizeListArray.from_arrays(pa.array(gaps.reshape(-1)), n // windows * k),
                  "l": pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), n // windows * (k + 1))})
    return column_bytes_per_token(t, ["i", "l"], n, compression="zstd", use_dictionary=["l.list.element"],
                                  use_byte_stream_split=["i.list.element"])


def naive_parquet_bytes(ids: np.ndarray, lps: np.ndarray) -> float:
    """One teacher's top-k as int32 ids + float32 log-probs, written by pyarrow defaults; bytes/position."""
    n, k = ids.shape
    t = pa.table({"ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int32)), k),
                  "lps": pa.FixedSizeListArray.from_arrays(pa.array(lps.reshape(-1).astype(np.float32)), k)})
    return column_bytes_per_token(t, ["ids", "lps"], n)


def main(quick: bool, repeats: int) -> None:
    from orchestrator.store import decode_topk, topk_columns

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
                per, table, shard = store_shard(work, ids, lps, windows, length, k, rng)
                teacher_bpt = float(np.mean([v for n, v in per.items() if n != "soft"]))
                samples.add(f"bpt_k{k}", teacher_bpt)
                samples.add(f"bpe_k{k}", teacher_bpt / k)
                samples.add(f"bpt_soft_k{k}", per["soft"])
                kl = [kl_error(ids[m].reshape(-1, k), lps[m].reshape(-1, k),
                               *(x.reshape(-1, k) for x in decode_topk(shard, f"teacher{m}", k))) for m in range(2)]
                samples.add(f"kl_k{k}", float(np.mean(kl)))
                cols = [c for m in range(2) for c in topk_columns(f"teacher{m}")]
                samples.add(f"bpt_defaults_k{k}", column_bytes_per_token(table, cols, positions) / 2)
                samples.add(f"bpt_v1_k{k}", float(np.mean([v1_bytes_per_token(ids[m].reshape(-1, k), lps[m].reshape(-1, k),
                                                                              windows) for m in range(2)])))
                samples.add(f"bpt_v2_k{k}", float(np.mean([v2_bytes_per_token(ids[m].reshape(-1, k), lps[m].reshape(-1, k),
                                                                              windows) for m in range(2)])))
                samples.add(f"naive_raw_k{k}", 8.0 * k)
                samples.add(f"naive_parquet_k{k}", naive_parquet_bytes(ids[0].reshape(-1, k), lps[0].reshape(-1, k)))
                log(f"lm bytes repeat {r}: k={k}: {teacher_bpt:.1f} B/token/teacher ({teacher_bpt / k:.2f} B/entry; "
                    f"v2 {samples.values[f'bpt_v2_k{k}'][-1]:.1f}, v1 {samples.values[f'bpt_v1_k{k}'][-1]:.1f}, "
                    f"naive {8 * k}), KL {samples.values[f'kl_k{k}'][-1]:.2e}")
            # Worst case: ids in random order (no frequency-ordered vocabulary), k = 32 only.
            ids_u, lps_u, _ = synth_topk(rng, positions, 2, 32, shuffle_ids=True)
            per, _, _ = store_shard(work, ids_u, lps_u, windows, length, 32, rng)
            samples.add("bpt_k32_shuffled", float(np.mean([v for n, v in per.items() if n != "soft"])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    samples.add("distillkit_bpt_k50", DISTILLKIT_BYTES_PER_TOKEN_K50)
    samples.add("distillkit_bpe", DISTILLKIT_BYTES_PER_ENTRY)
    figures = {"distillkit_bytes_per_token_k50": "distillkit_bpt_k50",
               "distillkit_bytes_per_entry": "distillkit_bpe"}
    for k in KS:
        figures[f"bytes_per_token_k{k}"] = f"bpt_k{k}"
        figures[f"bytes_per_entry_k{k}"] = f"bpe_k{k}"
        figures[f"codec_mean_kl_nats_k{k}"] = f"kl_k{k}"
        figures[f"bytes_per_token_soft_k{k}"] = f"bpt_soft_k{k}"
        figures[f"bytes_per_token_v1_k{k}"] = f"bpt_v1_k{k}"
        figures[f"bytes_per_token_v2_k{k}"] = f"bpt_v2_k{k}"
        figures[f"bytes_per_token_pyarrow_defaults_k{k}"] = f"bpt_defaults_k{k}"
        figures[f"bytes_per_token_naive_k{k}"] = f"naive_raw_k{k}"
        figures[f"bytes_per_token_naive_parquet_k{k}"] = f"naive_parquet_k{k}"
    figures["bytes_per_token_k32_shuffled_ids"] = "bpt_k32_shuffled"
    figures["synthetic_entropy_nats"] = "entropy_nats"
    figures["synthetic_top1_prob"] = "top1_prob"
    figures["synthetic_top64_mass"] = "topk_mass"
    for k in KS:
        for a, b in zip(samples.values[f"bpt_k{k}"], samples.values[f"bpt_v1_k{k}"]):
            samples.add(f"ratio_vs_v1_k{k}", a / b)
        for a, b in zip(samples.values[f"bpt_k{k}"], samples.values[f"bpt_v2_k{k}"]):
            samples.add(f"ratio_vs_v2_k{k}", a / b)
    ratios = {f"bytes_per_token_k{k}_vs_v{v}": f"ratio_vs_v{v}_k{k}" for k in KS for v in (1, 2)}
    emit(ratios=ratios, figures=figures,
         samples=samples, notes=notes)


if __name__ == "__main__":
    run_main(main)
