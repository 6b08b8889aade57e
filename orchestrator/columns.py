"""A shard's Arrow columns: numpy <-> fixed-size-list columns, dense and top-k. No Ray.

Dense (classification) shards: one float32 logits column per teacher (``teacher.NAME.logits``)
and the ensembled distribution (``soft.probs``). Top-k (LM) shards: per teacher and for the
ensemble (``soft``) an ids column and a log-prob column, each one fixed-size list per row (a
window's P positions flattened), encoded by ``orchestrator/codec.py`` (schema version 3;
version-2 shards hold its earlier codes) or, in version-1 shards, ids in probability order and
float16 log-probs. When the ensemble is one teacher's output the soft columns are left out and
the shard's metadata names the teacher (``SOFT_REF_KEY``); ``resolve_soft`` and
``physical_columns`` give readers the soft.* names back.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import codec


def fixed_list(x: np.ndarray, dtype=pa.float32()) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), dtype), x.shape[1])


def to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column as a [rows, width] array (zero-copy when possible)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), width)


def teacher_column(name: str) -> str:
    return f"teacher.{name}.logits"


SOFT_COLUMN = "soft.probs"


def encode_dense(inputs: pa.Table, teacher_logits: dict[str, np.ndarray], soft: np.ndarray) -> pa.Table:
    """Inputs rows + one logits column per teacher + the ensembled distribution."""
    table = inputs
    for name, logits in teacher_logits.items():
        table = table.append_column(teacher_column(name), fixed_list(logits.astype(np.float32)))
    return table.append_column(SOFT_COLUMN, fixed_list(soft.astype(np.float32)))


def decode_teachers(table: pa.Table, names: list[str]) -> np.ndarray:
    """Per-teacher logits [M, B, C] from a dense shard."""
    return np.stack([to_numpy(table.column(teacher_column(n))) for n in names])


# Top-k labels (task lm): per window of L tokens, P = L-1 positions, flattened into one
# fixed-size list per row: ids (gap-coded, k per position, the narrowest unsigned type the
# vocabulary allows) and probability codes (uint8, k + 1 per position); see orchestrator/codec.py.
# Version 2 kept plain gaps in int16/int32; version 1 ids in probability order and float16 log-probs.
SOFT_TOPK = "soft"
SOFT_REF_KEY = b"distill.soft_same_as"  # shard metadata: soft.* columns are this teacher's


def topk_columns(name: str) -> tuple[str, str]:
    """Column names of a teacher's (or, with name 'soft', the ensemble's) top-k labels."""
    prefix = SOFT_TOPK if name == SOFT_TOPK else f"teacher.{name}"
    return f"{prefix}.topk_ids", f"{prefix}.topk_logprobs"


def id_type(vocab_size: int) -> pa.DataType:
    # unsigned: codec.is_current tells version 3 from version 2 (signed) by it; a gap is <= vocab_size
    return pa.uint16() if vocab_size <= np.iinfo(np.uint16).max else pa.uint32()


def encode_topk(inputs: pa.Table, labels: dict[str, tuple[np.ndarray, np.ndarray]], vocab_size: int,
                soft_same_as: str | None = None, counts: np.ndarray | None = None) -> pa.Table:
    """Inputs rows + the stored top-k columns per teacher and for 'soft' (the ensemble).

    ``labels``: per name, (ids [B, P, k], logprobs [B, P, k]) to encode, or an already coded
    pair (gaps [B, P*k] or [B, P, k], uint8 codes) as ``stored_topk`` returns it, kept as is.
    ``counts``: packed instruction rows: positions per row (labels are then [N = sum, k], the
    labeled positions in row order) and the columns are variable-length lists.
    ``soft_same_as``: a teacher whose columns stand for the soft ones (none are written).
    """
    table, itype = inputs, id_type(vocab_size)
    for name, (ids, lps) in labels.items():
        if name == SOFT_TOPK and soft_same_as:
            continue
        b = len(ids)
        if not codec.is_coded(lps):
            k = ids.shape[-1]
            ids, lps = codec.encode(np.asarray(ids).reshape(-1, k), np.asarray(lps).reshape(-1, k))
        elif not codec.is_current(ids, lps):  # a version-2 shard's codes: re-encoded as version 3
            per_row = np.asarray(ids).reshape(b, -1).shape[1]
            k = per_row // (np.asarray(lps).reshape(b, -1).shape[1] - per_row)  # P*(k+1) - P*k = P
            ids, lps = codec.encode(*codec.decode(np.asarray(ids).reshape(-1, k), np.asarray(lps).reshape(-1, k + 1)))
        ic, lc = topk_columns(name)
        ids = np.asarray(ids).astype(itype.to_pandas_dtype())
        if counts is None:
            table = table.append_column(ic, fixed_list(ids.reshape(b, -1), itype))
            table = table.append_column(lc, fixed_list(lps.reshape(b, -1), pa.uint8()))
        else:
            table = table.append_column(ic, ragged_list(ids, counts, itype))
            table = table.append_column(lc, ragged_list(lps, counts, pa.uint8()))
    if soft_same_as:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), SOFT_REF_KEY: soft_same_as.encode()})
    return table


def ragged_list(per_position: np.ndarray, counts: np.ndarray, dtype) -> pa.ListArray:
    """[N, w] values, ``counts`` positions per row -> one list of counts[i] * w values per row."""
    width = per_position.reshape(len(per_position), -1).shape[1] if len(per_position) else 0
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32) * width
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(np.ascontiguousarray(per_position).reshape(-1), dtype))


def list_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """All values of a (fixed-size or variable) list column, rows concatenated."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.flatten().to_numpy(zero_copy_only=False)


def stored_topk(table: pa.Table, name: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A top-k column pair as stored, one row per position: versions 2 and 3 (gaps [N, k], codes
    [N, k + 1] uint8), version 1 (ids [N, k], float16 log-probs [N, k])."""
    ic, lc = topk_columns(name)
    ids, lps = list_values(table.column(ic)), list_values(table.column(lc))
    return ids.reshape(-1, k), lps.reshape(-1, k + 1 if codec.is_coded(lps) else k)


def positions_per_row(table: pa.Table, k: int) -> np.ndarray | None:
    """Labeled positions in each row of a packed (ragged) top-k shard, or None for windows."""
    col = table.column(topk_columns(SOFT_TOPK)[0] if topk_columns(SOFT_TOPK)[0] in table.column_names else
                       next(c for c in table.column_names if c.endswith(".topk_ids")))
    if pa.types.is_fixed_size_list(col.type):
        return None
    arr = col.combine_chunks()
    return np.diff(arr.offsets.to_numpy()) // k


def decode_topk(table: pa.Table, name: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, logprobs float32): [B, P, k] for windows; [N, k] (the labeled positions in
    row order) for packed instruction rows. Version 2: ids ascending per position."""
    b = table.num_rows
    ids, lps = codec.decode(*stored_topk(table, name, k))
    if positions_per_row(table, k) is not None:
        return ids, lps
    return ids.reshape(b, -1, k), lps.reshape(b, -1, k)


def shard_write_options(table: pa.Table) -> dict:
    """Parquet options for a shard: top-k ids and probability codes as BYTE_STREAM_SPLIT, no
    dictionary, all zstd.

    Measured (benchmarks/bench_lm_bytes.py, 32k vocabulary, k=32): Parquet stores both as INT32;
    split into byte streams, the all-zero upper bytes vanish and zstd's Huffman coder spends about
    each byte's entropy (codes: 21.3 bytes per position at 127 levels, where the dictionary's
    fixed 7-bit packing + zstd left 25.5; plain INT32 + zstd 33.6). Readers need no change: the
    encoding is in the file.
    """
    ids = [f"{f.name}.list.element" for f in table.schema if f.name.endswith(".topk_ids")]
    codes = [f"{f.name}.list.element" for f in table.schema if f.name.endswith(".topk_logprobs")]
    if not ids and not codes:
        return {}
    # task lm teachers[].features (float16): split too, 8% smaller than plain zstd on a trained
    # teacher's hidden states (247 vs 268 bytes per token at hidden 160); none: options as before
    feats = [f"{f.name}.list.element" for f in table.schema if f.name.startswith("feat__")]
    return {"compression": "zstd", "use_dictionary": False, "use_byte_stream_split": ids + codes + feats}


def soft_same_as(table_or_schema) -> str | None:
    """The teacher whose columns stand for this shard's soft ones, or None."""
    meta = table_or_schema.schema.metadata if hasattr(table_or_schema, "schema") else table_or_schema.metadata
    ref = (meta or {}).get(SOFT_REF_KEY)
    return ref.decode() if ref else None


def resolve_soft(table: pa.Table, ref: str | None = None) -> pa.Table:
    """Add the soft.* columns a by-reference shard leaves out (views of the teacher's; no copy)."""
    ref = ref or soft_same_as(table)
    if not ref:
        return table
    for soft, col in zip(topk_columns(SOFT_TOPK), topk_columns(ref)):
        if soft not in table.column_names and col in table.column_names:
            table = table.append_column(soft, table.column(col))
    return table


def physical_columns(columns: list[str], ref: str | None) -> list[str]:
    """The stored column behind each of ``columns`` (soft.* -> the teacher's when by reference)."""
    if not ref:
        return list(columns)
    alias = dict(zip(topk_columns(SOFT_TOPK), topk_columns(ref)))
    return [alias.get(c, c) for c in columns]


def column_sizes(meta: pq.FileMetaData) -> dict[str, int]:
    """Compressed bytes per top-level column of a Parquet file (list values count to their column)."""
    sizes: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".list.")[0].split(".element")[0]
            sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return sizes
