"""Prototypes of the fixes the benchmarks measure against the library code (not used by it).

Each mirrors one library function with one change, so the benchmarks can time both side by
side; BENCHMARKS.md says how to apply them.

* ``label_shards_in_driver``: orchestrator/pipeline.py ``_label_shards`` without Ray Data: one
  Labeler in the driver, label.concurrency shards in flight on threads (bench_label).
* ``read_store_with_pyarrow``: the ``ray.data.read_parquet`` of ``pipeline.train`` replaced by a
  pyarrow read in the driver + ``ray.data.from_arrow`` (bench_train, ``kd_fast``).
* ``write_options_for``: Parquet options for top-k label columns: BYTE_STREAM_SPLIT encoding, no
  dictionary, zstd (bench_lm_bytes). Adopted by the store since (orchestrator/store.py
  ``shard_write_options``, commit 9bb8576).
* ``write_shard_nocopy`` / ``read_shard_nocopy``: LabelStore.write_shard / read_shard without the
  bytes copies (``to_pybytes()`` on write, ``open_input_stream().read()`` on read): one pyarrow
  Buffer, hashed and written or parsed in place (bench_store).
"""
from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import DistillError
from orchestrator.store import LabelStore, ShardInfo


def table_buffer(table: pa.Table, **kw) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()


def write_shard_nocopy(store: LabelStore, i: int, table: pa.Table, **write_kw) -> ShardInfo:
    """LabelStore.write_shard with the bytes kept in one pyarrow Buffer (no to_pybytes copy)."""
    buf = table_buffer(table, **write_kw)
    info = ShardInfo(rows=table.num_rows, bytes=buf.size, sha256=hashlib.sha256(buf).hexdigest())
    store._write_atomic(store.shard_path(i), buf)  # OutputStream.write takes any buffer
    store._write_atomic(store._sidecar(i), json.dumps(info.__dict__).encode())
    return info


def read_shard_nocopy(store: LabelStore, i: int) -> pa.Table:
    """LabelStore.read_shard reading into a pyarrow Buffer (hashed and parsed in place)."""
    with store.fs.open_input_file(store.shard_path(i)) as f:
        buf = f.read_buffer()
    want = store.manifest["shards"].get(str(i), {}).get("sha256") if store.manifest else None
    if want and hashlib.sha256(buf).hexdigest() != want:
        raise DistillError(f"store {store.uri}: shard {i} does not match its checksum; re-run `distill label`")
    return pq.read_table(pa.BufferReader(buf))


TOPK_WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": False}


def write_options_for(table: pa.Table) -> dict:
    """Parquet options for a shard: BYTE_STREAM_SPLIT + zstd on the top-k label columns."""
    # Parquet names a list column's values NAME.list.element (what bytes_per_token splits on too).
    topk = [f"{f.name}.list.element" for f in table.schema if f.name.endswith((".topk_ids", ".topk_logprobs"))]
    if not topk:
        return {}
    return {**TOPK_WRITE_OPTIONS, "use_byte_stream_split": topk}


def column_bytes(data: bytes | pa.Buffer) -> dict[str, int]:
    """Compressed bytes per top-level column of a Parquet file (as LabelStore.bytes_per_token sums them)."""
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
    sizes: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".list.")[0].split(".element")[0]
            sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return sizes


def label_shards_in_driver(cfg, store: LabelStore, apps: dict[str, str], shards: list[int], inflight: int = 2) -> int:
    """pipeline._label_shards without Ray Data: one Labeler in the calling process, ``inflight``
    shards at a time on threads (they wait on Serve, numpy and pyarrow release the GIL).

    No labeler actor processes to start (each costs ~2 CPU-seconds of process start and
    imports: ray.data, ray.serve with fastapi/pandas) and no Ray Data executor per shard. What it
    gives up: labeler CPU work (ensembling, encoding, writing) runs on the driver's node only.
    Returns the number of rows labeled.
    """
    from concurrent.futures import ThreadPoolExecutor

    from actors.labeler import Labeler

    labeler = Labeler(store.uri, apps, {t.name: t.max_batch_size for t in cfg.teachers})
    with ThreadPoolExecutor(max_workers=inflight) as pool:
        return sum(out["rows"] for out in pool.map(labeler.label_shard, shards))


def read_store_with_pyarrow(paths, *, filesystem=None, **_):
    """Stand-in for ``ray.data.read_parquet`` in ``pipeline.train``: the driver reads the shards
    with pyarrow (20k rows: ~0.05 s) and hands Ray Data the table (``ray.data.from_arrow``).

    ``ray.data.read_parquet`` over a store's many small shard files spends seconds planning and
    launching read tasks before the first batch (6-10 s for 79 files of 256 rows here), which
    is most of a small run's first epoch. Rows keep the store's order, so the split that
    ``DataConfig(preserve_order=True)`` makes stays deterministic. For stores that fit in the
    driver's memory only; a big store keeps read_parquet.
    """
    import ray.data

    return ray.data.from_arrow(pq.ParquetDataset(list(paths), filesystem=filesystem).read())
