"""store_write_vs_pyarrow, store_read_vs_pyarrow: LabelStore shard I/O vs plain pyarrow.parquet.

    python -m benchmarks.bench_store [--quick] [--repeats N]

The table is a real LM shard: 64 windows x 127 positions, two teachers + the ensemble at k=32
over a 32k vocabulary (synthetic top-k as in bench_lm_bytes), built with build_shard (codec +
ensemble + encode_topk). Per repeat, each variant writes (then reads) the same table ``iters``
times to the local disk, ROUNDS times, the variants interleaved in alternating order; the
median round counts:

  store            LabelStore.write_shard / read_shard as they are: Parquet into one pyarrow
                   Buffer, xxh3-128 of it, temp file + rename, JSON sidecar temp + rename; read:
                   the file into one Buffer, checksum compared with the manifest, parse
  pyarrow          pq.write_table(table, path, **the store's Parquet options) / pq.read_table(path):
                   the same encoding, so the ratio is what the store adds on top of pyarrow
  pyarrow_default  pq.write_table(table, path) with pyarrow's defaults (dictionary + snappy), for
                   reference: the store's Parquet options vs the default

and, on the read side, ``checksum`` alone (xxh3-128 over the same file's bytes): its seconds /
read_shard's seconds is store_read_checksum_share. The codec's own costs, outside write_shard /
read_shard, are timed once per repeat: encoding the three top-k column pairs of the shard
(store_codec_encode_ms, part of build_shard) and decoding them (store_codec_decode_ms, what
the train step does with the batches it reads).

Throughput is the table's in-memory Arrow size (MB) per second. A small dense
(classification) shard, 256 rows of 64 features + 3 teachers x 10 logits, is measured the same
way: there, per-file costs (two renames, the sidecar) dominate.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import Samples, emit, log, ratio_samples, run_main, sizes


def lm_shard(windows: int, length: int = 128, k: int = 32, seed: int = 0):
    from benchmarks.bench_lm_bytes import VOCAB, synth_topk
    from orchestrator.soft_labels import build_shard

    rng = np.random.default_rng(seed)
    ids, lps, _ = synth_topk(rng, windows * (length - 1), 2, k)
    tokens = rng.integers(0, VOCAB, (windows, length)).astype(np.int32)
    inputs = pa.table({"sample_id": pa.array([f"w{i}" for i in range(windows)]),
                       "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), length),
                       "row": pa.array(np.arange(windows), pa.int64())})
    names = ["teacher0", "teacher1"]
    manifest = {"label_kind": "topk", "k": k, "lm": {"vocab_size": VOCAB, "max_len": length},
                "teachers": [{"name": n} for n in names],
                "ensemble": {"mode": "mean_prob", "temperature": 1.0, "tau": 1.0, "weights": {n: 1.0 for n in names}}}
    outputs = {n: (ids[m].reshape(windows, length - 1, k), lps[m].reshape(windows, length - 1, k))
               for m, n in enumerate(names)}
    return build_shard(inputs, outputs, manifest)[0]


def dense_shard(rows: int = 256, seed: int = 0):
    from orchestrator.datasets import content_ids, make_table
    from orchestrator.soft_labels import build_shard

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 64)).astype(np.float32)
    inputs = make_table(content_ids(x), x, rng.integers(0, 10, rows))
    inputs = inputs.append_column("row", pa.array(np.arange(rows), pa.int64()))
    names = ["t0", "t1", "t2"]
    manifest = {"label_kind": "dense", "teachers": [{"name": n} for n in names],
                "ensemble": {"mode": "mean_prob", "temperature": 4.0, "tau": 1.0, "weights": {n: 1.0 for n in names}}}
    return build_shard(inputs, {n: rng.normal(size=(rows, 10)) for n in names}, manifest)[0]


def _store(path: Path, rows: int):
    from orchestrator.store import LabelStore

    shutil.rmtree(path, ignore_errors=True)
    store = LabelStore(str(path))
    store.manifest = {"dataset": {"rows": rows}, "shard_size": rows, "shards": {}}
    return store


ROUNDS = 5


def measure(table: pa.Table, work: Path, iters: int, order: int) -> dict:
    """Seconds per write and per read for each variant (``order`` alternates the sequence)."""
    from orchestrator.store import checksum, shard_write_options

    opts = shard_write_options(table)
    store = _store(work / "store", table.num_rows)
    plain, default = work / "plain", work / "default"
    plain.mkdir(parents=True, exist_ok=True)
    default.mkdir(parents=True, exist_ok=True)
    out = {}

    def w_store():
        for i in range(iters):
            info = store.write_shard(i, table)
        store.manifest["shards"] = {str(i): info.__dict__ for i in range(iters)}  # same bytes each time

    def w_plain():  # the same Parquet options as the store: what the store adds on top of pyarrow
        for i in range(iters):
            pq.write_table(table, str(plain / f"shard-{i:05d}.parquet"), **opts)

    def w_default():  # pyarrow's defaults (dictionary + snappy), for reference
        for i in range(iters):
            pq.write_table(table, str(default / f"shard-{i:05d}.parquet"))

    def r_store():
        for i in range(iters):
            store.read_shard(i)

    def r_plain():
        for i in range(iters):
            pq.read_table(str(plain / f"shard-{i:05d}.parquet"))

    def r_default():
        for i in range(iters):
            pq.read_table(str(default / f"shard-{i:05d}.parquet"))

    def r_checksum():  # the store's integrity check alone, on the same file's bytes
        data = pa.py_buffer((plain / "shard-00000.parquet").read_bytes())
        for _ in range(iters):
            checksum(data)

    writes = [("store", w_store), ("pyarrow", w_plain), ("pyarrow_default", w_default)]
    reads = [("store", r_store), ("pyarrow", r_plain), ("pyarrow_default", r_default), ("checksum", r_checksum)]
    for _, fn in writes:  # warm-up, and the files the reads need
        fn()
    # ROUNDS passes per variant, interleaved (A B C, C B A, ...): one pass of 20 reads is ~0.1 s,
    # short enough for a burst of other load on the 2 cores to decide a ratio; the median pass counts.
    for phase, steps in (("write", writes), ("read", reads)):
        times = {name: [] for name, _ in steps}
        for rnd in range(ROUNDS):
            for name, fn in (steps if (order + rnd) % 2 == 0 else steps[::-1]):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) / iters)
        out.update({f"{phase}_{name}": float(np.median(t)) for name, t in times.items()})
    return out


def codec_ms(table: pa.Table) -> tuple[float, float]:
    """Milliseconds to encode and to decode the shard's top-k column pairs (codec alone)."""
    from orchestrator import codec
    from orchestrator.store import stored_topk

    names = [c[: -len(".topk_ids")] for c in table.column_names if c.endswith(".topk_ids")]
    k = 32
    coded = [stored_topk(table, n.removeprefix("teacher."), k) for n in names]
    decoded = [codec.decode(*c) for c in coded]
    t0 = time.perf_counter()
    for ids, lps in decoded:
        codec.encode(ids, lps)
    t1 = time.perf_counter()
    for c in coded:
        codec.decode(*c)
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def main(quick: bool, repeats: int) -> None:
    s = sizes(quick)
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    samples = Samples()
    try:
        lm = lm_shard(s["store_windows"])
        dense = dense_shard()
        mb_lm, mb_dense = lm.nbytes / 1e6, dense.nbytes / 1e6
        notes = {"lm_table_mb": round(mb_lm, 2), "lm_table_rows": lm.num_rows, "dense_table_mb": round(mb_dense, 3),
                 "dense_table_rows": dense.num_rows}
        iters_lm, iters_dense = (5, 20) if quick else (20, 100)
        for r in range(repeats):
            for tag, table, mb, iters in (("lm", lm, mb_lm, iters_lm), ("dense", dense, mb_dense, iters_dense)):
                t = measure(table, work / tag, iters, r)
                for key, sec in t.items():
                    samples.add(f"{tag}_{key}_mb_s", mb / sec)
                log(f"store repeat {r} {tag}: " + ", ".join(f"{k} {mb / v:,.0f} MB/s" for k, v in t.items()))
            enc, dec = codec_ms(lm)
            samples.add("codec_encode_ms", enc)
            samples.add("codec_decode_ms", dec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios, figures = {}, {}
    for tag, suffix in (("lm", ""), ("dense", "_dense")):
        for phase in ("write", "read"):
            ratio_samples(samples, f"{tag}_{phase}_ratio", f"{tag}_{phase}_store_mb_s", f"{tag}_{phase}_pyarrow_mb_s")
            ratio_samples(samples, f"{tag}_{phase}_vs_default", f"{tag}_{phase}_store_mb_s", f"{tag}_{phase}_pyarrow_default_mb_s")
            ratios[f"store_{phase}_vs_pyarrow{suffix}"] = f"{tag}_{phase}_ratio"
            ratios[f"store_{phase}_vs_pyarrow_defaults{suffix}"] = f"{tag}_{phase}_vs_default"
            for v in ("store", "pyarrow", "pyarrow_default"):
                figures[f"store_{phase}_{v}{suffix}_mb_per_s"] = f"{tag}_{phase}_{v}_mb_s"
        for a, b in zip(samples.values[f"{tag}_read_store_mb_s"], samples.values[f"{tag}_read_checksum_mb_s"]):
            samples.add(f"{tag}_checksum_share", a / b)  # seconds of the checksum alone / seconds of read_shard
        figures[f"store_read_checksum_share{suffix}"] = f"{tag}_checksum_share"
    figures["store_codec_encode_ms"] = "codec_encode_ms"
    figures["store_codec_decode_ms"] = "codec_decode_ms"
    emit(ratios=ratios, figures=figures, samples=samples, notes=notes)


if __name__ == "__main__":
    run_main(main)
