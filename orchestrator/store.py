"""The label store: a folder of ``manifest.json`` + Parquet shards, through ``pyarrow.fs``.

Layout (local path or URI such as ``s3://bucket/run/store``)::

    manifest.json            identity (dataset, teachers, kind, k, ensemble) + finished shards
    inputs.parquet           the labelled split, one row group per shard (what labelers read)
    shards/shard-00003.parquet   rows [3*S, 4*S) of the inputs, with teacher + soft columns
    shards/shard-00003.json      sidecar written after the shard: rows, bytes, sha256

Shards are keyed by deterministic row ranges (not Ray block boundaries), written to a
temporary name and moved into place, then their sidecar likewise: a shard counts as finished
only when its sidecar exists and its bytes match the sidecar's checksum. So a crashed run
leaves nothing half-written that could be read, and a re-run labels only missing shards.
Pure pyarrow / numpy: no Ray.

Over 300 lines: the codec, the atomic shard I/O and the manifest's bookkeeping change together
(a new column kind touches all three), so they stay in one file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import DistillError

log = logging.getLogger("distill")

SCHEMA_VERSION = 1
# Manifest keys that define what the store holds; any difference on re-open is refused.
IDENTITY_KEYS = ("schema_version", "dataset", "teachers", "label_kind", "k", "shard_size")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI that pyarrow.fs understands."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


# ---- codec: numpy <-> Arrow columns --------------------------------------------------------


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


# Top-k labels (task lm): per window of L tokens, P = L-1 positions x k entries, flattened
# into one fixed-size list per row. Ids take the narrowest signed type the vocabulary allows
# (signed: the ensemble pads a short union with id -1), log-probs float16.
SOFT_TOPK = "soft"


def topk_columns(name: str) -> tuple[str, str]:
    """Column names of a teacher's (or, with name 'soft', the ensemble's) top-k labels."""
    prefix = SOFT_TOPK if name == SOFT_TOPK else f"teacher.{name}"
    return f"{prefix}.topk_ids", f"{prefix}.topk_logprobs"


def id_type(vocab_size: int) -> pa.DataType:
    return pa.int16() if vocab_size <= np.iinfo(np.int16).max else pa.int32()


def encode_topk(inputs: pa.Table, labels: dict[str, tuple[np.ndarray, np.ndarray]], vocab_size: int) -> pa.Table:
    """Inputs rows + (ids, logprobs) [B, P, k] per teacher and for 'soft' (the ensemble)."""
    table, itype = inputs, id_type(vocab_size)
    for name, (ids, logprobs) in labels.items():
        ic, lc = topk_columns(name)
        b = len(ids)
        table = table.append_column(ic, fixed_list(ids.reshape(b, -1).astype(itype.to_pandas_dtype()), itype))
        table = table.append_column(lc, fixed_list(logprobs.reshape(b, -1).astype(np.float16), pa.float16()))
    return table


def decode_topk(table: pa.Table, name: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, logprobs float32), each [B, P, k]."""
    ic, lc = topk_columns(name)
    ids, lps = to_numpy(table.column(ic)), to_numpy(table.column(lc))
    return ids.astype(np.int64).reshape(len(ids), -1, k), lps.astype(np.float32).reshape(len(lps), -1, k)


def shard_write_options(table: pa.Table) -> dict:
    """Parquet options for a shard: top-k label columns as BYTE_STREAM_SPLIT + zstd.

    Measured (benchmarks/bench_lm_bytes.py, 32k vocabulary, k=32): 129 -> 95 bytes per token
    per teacher, and faster to write and read. Parquet's default dictionary encoding overflows
    on 32k distinct ids and falls back to plain; splitting the int16/float16 bytes into streams
    lets zstd find the structure (high bytes of ids, exponents of log-probs). Readers need no
    change: the encoding is in the file.
    """
    topk = [f"{f.name}.list.element" for f in table.schema if f.name.endswith((".topk_ids", ".topk_logprobs"))]
    if not topk:
        return {}
    return {"compression": "zstd", "use_dictionary": False, "use_byte_stream_split": topk}


# ---- the store ------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    rows: int
    bytes: int
    sha256: str


def _table_bytes(table: pa.Table, **kw) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()  # a Buffer: hashed and written as is (to_pybytes() would copy it)


def column_sizes(meta: pq.FileMetaData) -> dict[str, int]:
    """Compressed bytes per top-level column of a Parquet file (list values count to their column)."""
    sizes: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".list.")[0].split(".element")[0]
            sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return sizes


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-sha256")


class LabelStore:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = resolve(uri)
        self.manifest: dict | None = None
        self.damaged: dict[int, str] = {}

    # paths ---------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def generation(self) -> int:
        """Bumped by each re-ensemble, which writes a whole new set of shard files beside the old."""
        return (self.manifest or {}).get("generation", 0)

    def shard_path(self, i: int, generation: int | None = None) -> str:
        return self._p("shards", f"shard-{i:05d}{_gen(self.generation if generation is None else generation)}.parquet")

    def _sidecar(self, i: int, generation: int | None = None) -> str:
        return self._p("shards", f"shard-{i:05d}{_gen(self.generation if generation is None else generation)}.json")

    @property
    def inputs_path(self) -> str:
        return self._p("inputs.parquet")

    # atomic I/O ------------------------------------------------------------------------------
    def _write_atomic(self, path: str, data: bytes | pa.Buffer) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _read_buffer(self, path: str) -> pa.Buffer:
        with self.fs.open_input_file(path) as f:
            return f.read_buffer()  # one pyarrow Buffer: hashed and parsed in place, no bytes copy

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # manifest --------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self._exists(self._p("manifest.json"))

    def load_manifest(self) -> dict:
        try:
            self.manifest = json.loads(self._read(self._p("manifest.json")))
        except (OSError, json.JSONDecodeError) as e:
            raise DistillError(f"store {self.uri}: manifest.json unreadable ({e}); delete the store to relabel") from None
        return self.manifest

    def save_manifest(self) -> None:
        assert self.manifest is not None
        self.manifest["updated"] = time.time()
        self._write_atomic(self._p("manifest.json"), json.dumps(self.manifest, indent=2, sort_keys=True).encode())

    def check_identity(self, expected: dict) -> None:
        """Refuse a store whose manifest disagrees with the config, saying what differs."""
        have = self.manifest or self.load_manifest()
        # Teachers are matched by name (columns and weights are looked up by name): order is free.
        by_name = lambda m: {**m, "teachers": sorted(m.get("teachers") or [], key=lambda t: t["name"])}  # noqa: E731
        have_n, want_n = by_name(have), by_name(expected)
        diffs = [_describe_diff(k, have_n.get(k), want_n.get(k)) for k in IDENTITY_KEYS if have_n.get(k) != want_n.get(k)]
        if diffs:
            raise DistillError(
                f"store {self.uri} was labeled with a different setup: {'; '.join(diffs)}. "
                "Use another store.path (or run.name), or delete the store to relabel"
            )

    def create(self, identity: dict, inputs: pa.Table) -> None:
        """Start a new store: inputs first (one row group per shard), manifest last."""
        self._write_atomic(self.inputs_path, _table_bytes(inputs, row_group_size=identity["shard_size"]))
        self.manifest = {**identity, "shards": {}, "created": time.time()}
        self.save_manifest()

    # shards ----------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        m = self.manifest
        return -(-m["dataset"]["rows"] // m["shard_size"])

    def read_inputs(self, i: int) -> pa.Table:
        with self.fs.open_input_file(self.inputs_path) as f:
            return pq.ParquetFile(f).read_row_group(i)

    def write_shard(self, i: int, table: pa.Table, generation: int | None = None) -> ShardInfo:
        data = _table_bytes(table, **shard_write_options(table))
        info = ShardInfo(rows=table.num_rows, bytes=data.size, sha256=hashlib.sha256(data).hexdigest())
        self._write_atomic(self.shard_path(i, generation), data)
        self._write_atomic(self._sidecar(i, generation), json.dumps(info.__dict__).encode())
        return info

    def switch_generation(self, generation: int, ensemble: dict) -> None:
        """Make a complete set of shards written at `generation` the store's, in one atomic
        manifest write, then delete every other generation's files. A crash before the
        manifest write leaves the old store whole (the new files are ignored, and overwritten
        by the next try); after it, the new one."""
        old, self.manifest = self.manifest, {**self.manifest, "generation": generation, "ensemble": ensemble}
        done = self.finished_shards()  # the new files, checked against their sidecars
        if len(done) != self.num_shards:
            self.manifest = old
            raise DistillError(f"store {self.uri}: re-ensembled shards failed their checksums; run it again")
        self.manifest["shards"] = {str(i): info.__dict__ for i, info in sorted(done.items())}
        self.save_manifest()
        keep = {self.shard_path(i).rsplit("/", 1)[1] for i in range(self.num_shards)}
        keep |= {self._sidecar(i).rsplit("/", 1)[1] for i in range(self.num_shards)}
        for f in self.fs.get_file_info(pafs.FileSelector(self._p("shards"))):
            if f.base_name not in keep and f.base_name.startswith("shard-"):
                self.fs.delete_file(f.path)

    def ensure_writable(self) -> None:
        """Create the store's folder (nothing else), so an unreachable store.path fails first."""
        try:
            self.fs.create_dir(self.root, recursive=True)
        except (OSError, pa.ArrowException) as e:
            raise DistillError(f"store.path: cannot create {self.uri}: {_first_line(e)}; "
                               "give a writable local path or a reachable URI") from None

    def read_shard(self, i: int) -> pa.Table:
        data = self._read_buffer(self.shard_path(i))
        want = self.manifest["shards"].get(str(i), {}).get("sha256") if self.manifest else None
        if not want:
            return pq.read_table(pa.BufferReader(data))
        # sha256 releases the GIL: hash on a thread while pyarrow parses the same buffer
        # (the hash alone is ~20% of a top-k shard's read, BENCHMARKS.md).
        digest = _HASHER.submit(lambda: hashlib.sha256(data).hexdigest())
        try:
            table, error = pq.read_table(pa.BufferReader(data)), None
        except (pa.ArrowException, OSError) as e:
            table, error = None, e
        if digest.result() != want:
            raise DistillError(f"store {self.uri}: shard {i} does not match its checksum; re-run `distill label`")
        if error is not None:
            raise error
        return table

    def finished_shards(self, verify: bool = True) -> dict[int, ShardInfo]:
        """Shards whose sidecar exists and (with verify) whose bytes match it.

        Shards with a sidecar whose bytes do not match (truncated, altered, deleted) are kept
        in ``self.damaged`` (shard id -> what is wrong): they count as unfinished, never as data.
        """
        found, self.damaged = {}, {}
        for i in range(self.num_shards):
            try:
                info = ShardInfo(**json.loads(self._read(self._sidecar(i))))
            except (OSError, ValueError, TypeError):
                continue  # no sidecar, or a torn one: the shard is not finished
            if verify:
                try:
                    data = self._read_buffer(self.shard_path(i))
                except OSError:
                    self.damaged[i] = "file missing"
                    continue
                if hashlib.sha256(data).hexdigest() != info.sha256:
                    self.damaged[i] = ("truncated" if data.size < info.bytes else "altered") + " (sha256 mismatch)"
                    continue
            found[i] = info
        return found

    def record_finished(self, verify: bool = True) -> list[int]:
        """Sync the manifest's shard list with the sidecars; return the missing shard ids."""
        done = self.finished_shards(verify)
        for i, what in self.damaged.items():
            log.warning("store %s: shard %d (%s) is %s: treated as unfinished, never read",
                        self.uri, i, self.shard_path(i), what)
        self.manifest["shards"] = {str(i): info.__dict__ for i, info in sorted(done.items())}
        self.save_manifest()
        return [i for i in range(self.num_shards) if i not in done]

    def describe_missing(self, missing: list[int]) -> str:
        """'3 of 12 shards missing (first: 4); shard 7 is truncated (sha256 mismatch)' for messages."""
        parts = [f"{len(missing)} of {self.num_shards} shards unfinished (first: {missing[0]})"] if missing else []
        parts += [f"shard {i} ({self.shard_path(i).rsplit('/', 1)[-1]}) is {what}" for i, what in sorted(self.damaged.items())]
        return "; ".join(parts)

    @property
    def complete(self) -> bool:
        return self.manifest is not None and len(self.manifest["shards"]) == self.num_shards

    def shard_paths(self) -> list[str]:
        return [self.shard_path(int(i)) for i in sorted(self.manifest["shards"], key=int)]

    def bytes_per_token(self) -> dict[str, float] | None:
        """Stored label bytes per labeled token position, per teacher and for the ensemble."""
        m = self.manifest or self.load_manifest()
        if m["label_kind"] != "topk" or not m["shards"]:
            return None
        first = int(min(m["shards"], key=int))
        with self.fs.open_input_file(self.shard_path(first)) as f:
            meta = pq.ParquetFile(f).metadata
        sizes = column_sizes(meta)
        positions = meta.num_rows * (m["lm"]["max_len"] - 1)
        out = {}
        for who in [t["name"] for t in m["teachers"]] + [SOFT_TOPK]:
            out[who] = sum(sizes.get(c, 0) for c in topk_columns(who)) / positions
        return out

    @property
    def shard_bytes(self) -> int:
        """Bytes of the finished shards, as the manifest records them."""
        return sum(s["bytes"] for s in self.manifest["shards"].values())

    def summary(self) -> dict:
        m = self.manifest or self.load_manifest()
        shards = m["shards"].values()
        schema = None
        if m["shards"]:
            first = int(min(m["shards"], key=int))
            with self.fs.open_input_file(self.shard_path(first)) as f:
                schema = pq.read_schema(f)
        return {
            "store": self.uri,
            "rows": sum(s["rows"] for s in shards),
            "expected_rows": m["dataset"]["rows"],
            "shards": f"{len(m['shards'])}/{self.num_shards}",
            "bytes": self.shard_bytes,
            "label_kind": m["label_kind"],
            "num_classes": m.get("num_classes"),
            "teachers": m["teachers"],
            "ensemble": m.get("ensemble"),
            "columns": [f"{f.name}: {f.type}" for f in schema] if schema else [],
            "k": m.get("k"),
            "bytes_per_token": self.bytes_per_token(),
        }


def _gen(generation: int) -> str:
    return f".g{generation}" if generation else ""  # generation 0 keeps the original names


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_store(uri: str, field: str = "store.path") -> LabelStore:
    """A LabelStore whose location answers: an unknown scheme, an unresolvable bucket or an
    unreadable folder is one DistillError naming `field`, not a pyarrow traceback."""
    try:
        store = LabelStore(uri)
        store.exists()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DistillError(f"{field}: cannot reach {uri}: {_first_line(e)}; "
                           "give a local path or a reachable pyarrow.fs URI") from None
    return store


def _describe_diff(key: str, have, want) -> str:
    if key == "teachers":
        h = {t["name"]: t["fingerprint"] for t in have or []}
        w = {t["name"]: t["fingerprint"] for t in want or []}
        bits = []
        if set(h) != set(w):
            bits.append(f"store has teachers {sorted(h)}, config has {sorted(w)}")
        bits += [f"teacher '{n}' weights/config changed" for n in sorted(set(h) & set(w)) if h[n] != w[n]]
        return ", ".join(bits)
    if key == "dataset" and isinstance(have, dict) and isinstance(want, dict):
        return ", ".join(f"dataset.{k}: store {have.get(k)!r} vs config {want.get(k)!r}"
                         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
    return f"{key}: store {have!r} vs config {want!r}"
