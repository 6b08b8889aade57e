"""store_write_vs_pyarrow, store_read_vs_pyarrow: LabelStore shard I/O vs plain pyarrow.parquet.

    python -m benchmarks.bench_store [--quick] [--repeats N]

The table is a real LM shard: 64 windows x 127 positions, two teachers + the ensemble at k=32
over a 32k vocabulary (synthetic top-k as in bench_lm_bytes), built with build_shard /
encode_topk. Per repeat, in alternating order, each variant writes (then reads) the same table
``iters`` times to the local disk:

  store            LabelStore.write_shard / read_shard as they are: Parquet into one pyarrow
                   Buffer, sha256 of it, temp file + rename, JSON sidecar temp + rename; read:
                   the file into one Buffer, sha256 on a helper thread while pyarrow parses the
                   same Buffer, compared with the manifest
  before           the same steps as the store before the no-copy / overlapped-hash change
                   (write: the Buffer copied to bytes first; read: the file read into bytes,
                   hashed, then parsed), inlined here for the before -> after in the same run
  pyarrow          pq.write_table(table, path, **the store's Parquet options) / pq.read_table(path):
                   the same encoding, so the ratio is what the store adds on top of pyarrow
  pyarrow_default  pq.write_table(table, path) with pyarrow's defaults (dictionary + snappy), for
                   reference: the store's codec choice vs the default

and, on the read side, ``sha256`` alone over the same file's bytes: seconds of sha256 /
seconds of read_shard is reported as store_read_sha256_share. The store's read now overlaps
the hash with the parse, so this share is how much hashing there is to hide, not a part of
read_shard's time any more (read_shard takes about max(parse, hash) plus a thread hand-off).

Throughput is the table's in-memory Arrow size (MB) per second. A small dense
(classification) shard, 256 rows of 64 features + 3 teachers x 10 logits, is measured the same
way: there, per-file costs (two renames, the sidecar) dominate.
"""
from __future__ import annotations

import hashlib
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
    manifest = {"label_kind": "dense",
                "ensemble": {"mode": "mean_prob", "temperature": 4.0, "tau": 1.0, "weights": {n: 1.0 for n in names}}}
    return build_shard(inputs, {n: rng.normal(size=(rows, 10)) for n in names}, manifest)[0]


def _store(path: Path, rows: int):
    from orchestrator.store import LabelStore

    shutil.rmtree(path, ignore_errors=True)
    store = LabelStore(str(path))
    store.manifest = {"dataset": {"rows": rows}, "shard_size": rows, "shards": {}}
    return store


def store_write_options(table: pa.Table) -> dict:
    """The Parquet options LabelStore.write_shard uses for this table (none before the store chose any)."""
    import orchestrator.store as st

    return st.shard_write_options(table) if hasattr(st, "shard_write_options") else {}


def write_shard_before(store, i: int, table: pa.Table, opts: dict):
    """LabelStore.write_shard before the no-copy change: the Parquet Buffer copied into bytes."""
    import json

    from orchestrator.store import ShardInfo

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **opts)
    data = sink.getvalue().to_pybytes()
    info = ShardInfo(rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    store._write_atomic(store.shard_path(i), data)
    store._write_atomic(store._sidecar(i), json.dumps(info.__dict__).encode())
    return info


def read_shard_before(store, i: int) -> pa.Table:
    """LabelStore.read_shard before the change: the file read into bytes, hashed, then parsed."""
    with store.fs.open_input_stream(store.shard_path(i)) as f:
        data = f.read()
    want = store.manifest["shards"].get(str(i), {}).get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"shard {i} does not match its checksum")
    return pq.read_table(pa.BufferReader(data))


def measure(table: pa.Table, work: Path, iters: int, order: int) -> dict:
    """Seconds per write and per read for each variant (``order`` alternates the sequence)."""
    opts = store_write_options(table)
    store = _store(work / "store", table.num_rows)
    before = _store(work / "before", table.num_rows)
    plain, default = work / "plain", work / "default"
    plain.mkdir(parents=True, exist_ok=True)
    default.mkdir(parents=True, exist_ok=True)
    out = {}

    def w_store():
        for i in range(iters):
            info = store.write_shard(i, table)
        store.manifest["shards"] = {str(i): info.__dict__ for i in range(iters)}  # same bytes each time

    def w_before():
        for i in range(iters):
            info = write_shard_before(before, i, table, opts)
        before.manifest["shards"] = {str(i): info.__dict__ for i in range(iters)}

    def w_plain():  # the same Parquet options as the store: what the store adds on top of pyarrow
        for i in range(iters):
            pq.write_table(table, str(plain / f"shard-{i:05d}.parquet"), **opts)

    def w_default():  # pyarrow's defaults (dictionary + snappy), for reference
        for i in range(iters):
            pq.write_table(table, str(default / f"shard-{i:05d}.parquet"))

    def r_store():
        for i in range(iters):
            store.read_shard(i)

    def r_before():
        for i in range(iters):
            read_shard_before(before, i)

    def r_plain():
        for i in range(iters):
            pq.read_table(str(plain / f"shard-{i:05d}.parquet"))

    def r_default():
        for i in range(iters):
            pq.read_table(str(default / f"shard-{i:05d}.parquet"))

    def r_sha256():  # the store's integrity check alone, on the same file's bytes
        data = (plain / "shard-00000.parquet").read_bytes()
        for _ in range(iters):
            hashlib.sha256(data).hexdigest()

    writes = [("store", w_store), ("pyarrow", w_plain), ("before", w_before), ("pyarrow_default", w_default)]
    reads = [("store", r_store), ("pyarrow", r_plain), ("before", r_before), ("pyarrow_default", r_default),
             ("sha256", r_sha256)]
    for _, fn in writes:  # warm-up, and the files the reads need
        fn()
    for phase, steps in (("write", writes), ("read", reads)):
        for name, fn in (steps if order % 2 == 0 else steps[::-1]):
            t0 = time.perf_counter()
            fn()
            out[f"{phase}_{name}"] = (time.perf_counter() - t0) / iters
    return out


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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios, figures = {}, {}
    for tag, suffix in (("lm", ""), ("dense", "_dense")):
        for phase in ("write", "read"):
            ratio_samples(samples, f"{tag}_{phase}_ratio", f"{tag}_{phase}_store_mb_s", f"{tag}_{phase}_pyarrow_mb_s")
            ratio_samples(samples, f"{tag}_{phase}_before_ratio", f"{tag}_{phase}_before_mb_s", f"{tag}_{phase}_pyarrow_mb_s")
            ratio_samples(samples, f"{tag}_{phase}_vs_before", f"{tag}_{phase}_store_mb_s", f"{tag}_{phase}_before_mb_s")
            ratio_samples(samples, f"{tag}_{phase}_vs_default", f"{tag}_{phase}_store_mb_s", f"{tag}_{phase}_pyarrow_default_mb_s")
            ratios[f"store_{phase}_vs_pyarrow{suffix}"] = f"{tag}_{phase}_ratio"
            ratios[f"store_{phase}_before_vs_pyarrow{suffix}"] = f"{tag}_{phase}_before_ratio"
            ratios[f"store_{phase}_vs_before{suffix}"] = f"{tag}_{phase}_vs_before"
            ratios[f"store_{phase}_vs_pyarrow_defaults{suffix}"] = f"{tag}_{phase}_vs_default"
            for v in ("store", "pyarrow", "before", "pyarrow_default"):
                figures[f"store_{phase}_{v}{suffix}_mb_per_s"] = f"{tag}_{phase}_{v}_mb_s"
        for a, b in zip(samples.values[f"{tag}_read_store_mb_s"], samples.values[f"{tag}_read_sha256_mb_s"]):
            samples.add(f"{tag}_sha256_share", a / b)  # seconds of sha256 alone / seconds of read_shard
        figures[f"store_read_sha256_share{suffix}"] = f"{tag}_sha256_share"
    emit(ratios=ratios, figures=figures, samples=samples, notes=notes)


if __name__ == "__main__":
    run_main(main)
