"""The label store: a folder of ``manifest.json`` + Parquet shards, through ``pyarrow.fs``.

Layout (local path or URI such as ``s3://bucket/run/store``)::

    manifest.json            identity (dataset, teachers, kind, k, ensemble) + finished shards
    inputs.parquet           the labelled split, one row group per shard (what labelers read)
    shards/shard-00003.parquet   rows [3*S, 4*S) of the inputs, with teacher + soft columns
    shards/shard-00003.json      sidecar written after the shard: rows, bytes, checksum

Shards are keyed by deterministic row ranges (not Ray block boundaries), written to a
temporary name and moved into place, then their sidecar likewise: a shard counts as finished
only when its sidecar exists and its bytes match the sidecar's checksum. So a crashed run
leaves nothing half-written that could be read, and a re-run labels only missing shards.
Checksums are xxh3-128 (``xxhash``: ~30x sha256's speed, so checking every read costs about
2% of it; BENCHMARKS.md); version-1 sidecars with sha256 still verify.

Schema version 3 stores top-k labels through ``orchestrator.codec`` (about 2 bytes per kept
entry at k=32 instead of version 2's 2.2 and version 1's 3); version-2 shards (the codec's
earlier codes) and version-1 shards (float16 log-probs) still decode. When the
ensemble is one teacher's output unchanged (one teacher at T=1), the shard keeps no soft
columns: its metadata names the teacher (``distill.soft_same_as``) and every read here
(``read_shard``, ``read_table``, ``parquet_columns``) resolves ``soft.*`` to that teacher's.
Pure pyarrow / numpy: no Ray.

Over 300 lines: the atomic shard I/O, the checksums and the manifest's bookkeeping (shards,
generations) change together, so they stay in one file; the column codec is columns.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import xxhash

from .columns import (  # noqa: F401  (re-exported: the store's column layout, imported from here)
    SOFT_COLUMN,
    SOFT_REF_KEY,
    SOFT_TOPK,
    column_sizes,
    decode_teachers,
    decode_topk,
    encode_dense,
    encode_topk,
    fixed_list,
    id_type,
    physical_columns,
    resolve_soft,
    shard_write_options,
    soft_same_as,
    stored_topk,
    teacher_column,
    to_numpy,
    topk_columns,
)
from .errors import DistillError
from .features import feature_bytes_per_sample, feature_write_options

log = logging.getLogger("distill")

SCHEMA_VERSION = 3  # 2: top-k through orchestrator.codec, xxh3 checksums, soft columns by reference; 3: codec v3 (~1.9 B per entry)
# Manifest keys that define what the store holds; any difference on re-open is refused.
IDENTITY_KEYS = ("schema_version", "dataset", "teachers", "label_kind", "k", "shard_size")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI that pyarrow.fs understands."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


# ---- the store ------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    rows: int
    bytes: int
    checksum: str  # "xxh3_128:<hex>" (version 1: "sha256:<hex>")

    @classmethod
    def from_dict(cls, d: dict) -> "ShardInfo":
        if "sha256" in d:  # a version-1 sidecar / manifest entry
            return cls(rows=d["rows"], bytes=d["bytes"], checksum=f"sha256:{d['sha256']}")
        return cls(rows=d["rows"], bytes=d["bytes"], checksum=d["checksum"])


def checksum(data, algo: str = "xxh3_128") -> str:
    if algo == "sha256":
        return f"sha256:{hashlib.sha256(data).hexdigest()}"
    return f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}"


def checksum_ok(data, want: str) -> bool:
    return checksum(data, want.split(":", 1)[0]) == want


def _table_bytes(table: pa.Table, **kw) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()  # a Buffer: hashed and written as is (to_pybytes() would copy it)


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
        # LM shards: the top-k options (zstd, no dictionary, byte-stream split) cover feature columns too
        data = _table_bytes(table, **(shard_write_options(table) or feature_write_options(table)))
        info = ShardInfo(rows=table.num_rows, bytes=data.size, checksum=checksum(data))
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

    def _recorded(self, i: int) -> ShardInfo | None:
        entry = self.manifest["shards"].get(str(i)) if self.manifest else None
        return ShardInfo.from_dict(entry) if entry else None

    def read_shard(self, i: int) -> pa.Table:
        """Shard i, checked against its recorded checksum, with soft.* resolved."""
        data = self._read_buffer(self.shard_path(i))
        info = self._recorded(i)
        if info and not checksum_ok(data, info.checksum):
            raise DistillError(f"store {self.uri}: shard {i} does not match its checksum; re-run `distill label`")
        return resolve_soft(pq.ParquetFile(pa.BufferReader(data)).read())

    def read_table(self, columns: list[str]) -> pa.Table:
        """The finished shards' ``columns``, in store order, soft.* resolved (the train read;
        the shards were verified when the store was opened)."""
        parts = []
        for path in self.shard_paths():
            with self.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                ref = soft_same_as(pf.schema_arrow)
                phys = physical_columns(columns, ref)
                t = pf.read(columns=list(dict.fromkeys(phys)))
            parts.append(pa.table({c: t.column(p) for c, p in zip(columns, phys)}))
        return pa.concat_tables(parts)

    def parquet_columns(self, columns: list[str]) -> tuple[list[str], dict[str, str]]:
        """For a reader of the shard files themselves (ray.data.read_parquet): the columns to
        select and {stored name: name} renames that give ``columns`` (soft.* by reference)."""
        ref = None
        if self.manifest and self.manifest["shards"]:
            with self.fs.open_input_file(self.shard_paths()[0]) as f:
                ref = soft_same_as(pq.read_schema(f))
        phys = physical_columns(columns, ref)
        return phys, {p: c for c, p in zip(columns, phys) if p != c}

    def finished_shards(self, verify: bool = True) -> dict[int, ShardInfo]:
        """Shards whose sidecar exists and (with verify) whose bytes match it.

        Shards with a sidecar whose bytes do not match (truncated, altered, deleted) are kept
        in ``self.damaged`` (shard id -> what is wrong): they count as unfinished, never as data.
        """
        found, self.damaged = {}, {}
        for i in range(self.num_shards):
            try:
                info = ShardInfo.from_dict(json.loads(self._read(self._sidecar(i))))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # no sidecar, or a torn one: the shard is not finished
            if verify:
                try:
                    data = self._read_buffer(self.shard_path(i))
                except OSError:
                    self.damaged[i] = "file missing"
                    continue
                if not checksum_ok(data, info.checksum):
                    self.damaged[i] = ("truncated" if data.size < info.bytes else "altered") + " (checksum mismatch)"
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
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            # Packed instruction rows keep only the positions that carry loss: count those.
            mask = pf.read(["loss_mask"]).column(0) if "loss_mask" in pf.schema_arrow.names else None
        sizes = column_sizes(meta)
        positions = int(to_numpy(mask)[:, 1:].sum()) if mask is not None else meta.num_rows * (m["lm"]["max_len"] - 1)
        out = {}
        for who in [t["name"] for t in m["teachers"]] + [SOFT_TOPK]:
            out[who] = sum(sizes.get(c, 0) for c in topk_columns(who)) / positions
        if ref := soft_same_as(meta.schema.to_arrow_schema()):
            out[SOFT_TOPK] = out[ref]  # what reading soft.* costs; stored once, under the teacher
        return out

    @property
    def shard_bytes(self) -> int:
        """Bytes of the finished shards, as the manifest records them."""
        return sum(s["bytes"] for s in self.manifest["shards"].values())

    def summary(self) -> dict:
        m = self.manifest or self.load_manifest()
        shards = m["shards"].values()
        schema = feature_bytes = token_bytes = None
        if m["shards"]:
            first = int(min(m["shards"], key=int))
            with self.fs.open_input_file(self.shard_path(first)) as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                feature_bytes = feature_bytes_per_sample(pf.metadata)  # teachers[].features (first shard)
                if m["label_kind"] == "topk" and feature_bytes:  # task lm: per labeled token too
                    from .lm_features import feature_bytes_per_token

                    token_bytes = feature_bytes_per_token(pf, m["lm"]["max_len"])
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
            "soft_same_as": soft_same_as(schema) if schema is not None else None,
            **({"feature_bytes_per_sample": feature_bytes} if feature_bytes else {}),
            **({"feature_bytes_per_token": token_bytes} if token_bytes else {}),
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
        feats = lambda ts, n: next((t.get("features"), t.get("pool")) for t in ts if t["name"] == n)  # noqa: E731
        for n in sorted(set(h) & set(w)):
            if h[n] != w[n] and feats(have, n) != feats(want, n):  # teachers[].features / pool
                bits.append(f"teacher '{n}' features changed (store {feats(have, n)}, config {feats(want, n)})")
            elif h[n] != w[n]:
                bits.append(f"teacher '{n}' weights/config changed")
        return ", ".join(bits)
    if key == "dataset" and isinstance(have, dict) and isinstance(want, dict):
        return ", ".join(f"dataset.{k}: store {have.get(k)!r} vs config {want.get(k)!r}"
                         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
    return f"{key}: store {have!r} vs config {want!r}"
