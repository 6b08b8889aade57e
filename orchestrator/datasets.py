"""Load a labelled feature dataset into one canonical Arrow table, and split it.

Canonical columns: ``sample_id`` (string), ``features`` (fixed_size_list<float32>[D]),
``label`` (int64). Sources: ``sklearn:NAME`` (datasets bundled with scikit-learn, no
download) or a local ``.parquet`` / ``.csv`` file. Pure pyarrow / numpy: no Ray.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DistillError

SKLEARN_BUNDLED = ("digits", "iris", "wine", "breast_cancer")


def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in SKLEARN_BUNDLED:
        raise DistillError(
            f"dataset.source: unknown bundled dataset 'sklearn:{name}'; "
            f"use one of {', '.join('sklearn:' + n for n in SKLEARN_BUNDLED)} or a .parquet/.csv path"
        )
    import sklearn.datasets as skd

    bunch = getattr(skd, f"load_{name}")()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def _read_file(path: Path) -> pa.Table:
    if not path.exists():
        raise DistillError(f"dataset.source: file not found: {path}")
    if path.suffix not in (".parquet", ".csv"):
        raise DistillError(f"dataset.source: unsupported file type '{path.suffix}' for {path}; use .parquet or .csv")
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path)
    except (pa.ArrowException, OSError) as e:  # truncated, empty or mislabeled file: say which
        raise DistillError(f"dataset.source: cannot read {path} as {path.suffix[1:]}: {str(e).splitlines()[0]}") from None


def _column(table: pa.Table, name: str, field: str, source: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DistillError(
            f"dataset.{field}: column '{name}' not found in {source}; "
            f"available columns: {', '.join(table.column_names)}"
        )
    return table.column(name)


def _features_from_table(table: pa.Table, features: str | list[str], source: str) -> np.ndarray:
    names = [features] if isinstance(features, str) else list(features)
    cols = [_column(table, n, "features", source) for n in names]
    try:
        if len(cols) == 1 and (pa.types.is_list(cols[0].type) or pa.types.is_fixed_size_list(cols[0].type)):
            x = np.asarray(cols[0].to_pylist(), dtype=np.float32)
        else:
            x = np.stack([c.to_numpy(zero_copy_only=False).astype(np.float32) for c in cols], axis=1)
    except (ValueError, TypeError, pa.ArrowInvalid) as e:
        raise DistillError(
            f"dataset.features: columns {names} in {source} are not numeric "
            f"(or lists of unequal length): {str(e).splitlines()[0]}"
        ) from None
    if x.ndim != 2:
        raise DistillError(f"dataset.features: expected one vector per row in {source}, got shape {x.shape}")
    return x


def _labels(table: pa.Table, label: str, source: str) -> np.ndarray:
    ycol = _column(table, label, "label", source)
    if ycol.null_count:
        raise DistillError(f"dataset.label: column '{label}' in {source} has {ycol.null_count} missing values")
    try:
        if pa.types.is_boolean(ycol.type):
            raise TypeError("boolean")
        yf = ycol.to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.all(np.isfinite(yf)) or np.any(yf != np.floor(yf)):
            raise ValueError("fractional")
    except (ValueError, TypeError):
        raise DistillError(f"dataset.label: column '{label}' in {source} must hold integer class ids") from None
    return yf.astype(np.int64)


def load_dataset(
    source: str,
    features: str | list[str] = "features",
    label: str = "label",
    id_column: str | None = None,
    limit: int | None = None,
) -> pa.Table:
    """Read ``source`` into the canonical table, validating it (one-line DistillError)."""
    ids = None
    if source.startswith("sklearn:"):
        x, y = _sklearn(source.split(":", 1)[1])
    else:
        table = _read_file(Path(source))
        if table.num_rows == 0:
            raise DistillError(f"dataset.source: {source} has no rows")
        x = _features_from_table(table, features, source)
        y = _labels(table, label, source)
        if id_column:
            ids = [str(v) for v in _column(table, id_column, "id_column", source).to_pylist()]
    if limit is not None:
        x, y = x[:limit], y[:limit]
        ids = ids[:limit] if ids is not None else None
    if len(x) == 0:
        raise DistillError(f"dataset.source: {source} has no rows")
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DistillError(f"dataset.features: row {bad} of {source} holds NaN or Inf; clean the data first")
    if (y < 0).any():
        raise DistillError(f"dataset.label: class ids must be >= 0 (found {int(y.min())}) in {source}")
    if ids is None:
        ids = content_ids(x)
    elif len(set(ids)) != len(ids):
        raise DistillError(f"dataset.id_column: '{id_column}' in {source} is not unique")
    return make_table(ids, x, y)


def load_labeled_text(source: str, text: str = "text", label: str = "label", id_column: str | None = None,
                      limit: int | None = None) -> tuple[list[str], np.ndarray, list[str] | None]:
    """Classification from text (dataset.text): (texts, labels [N] int64, ids or None), validated."""
    table = _read_file(Path(source))
    texts = load_text(source, text, limit)  # strings, none empty
    y = _labels(table, label, source)[:limit]
    if (y < 0).any():
        raise DistillError(f"dataset.label: class ids must be >= 0 (found {int(y.min())}) in {source}")
    ids = [str(v) for v in _column(table, id_column, "id_column", source).to_pylist()[:limit]] if id_column else None
    if ids is not None and len(set(ids)) != len(ids):
        raise DistillError(f"dataset.id_column: '{id_column}' in {source} is not unique")
    return texts, y, ids


def pad_tokens(token_ids: list[list[int]], pad_id: int, max_len: int) -> tuple[np.ndarray, int]:
    """Rows of token ids -> [N, L] float32 (L: the longest row, at most max_len), right-padded with
    pad_id; also how many rows were cut at max_len."""
    width = min(max(len(t) for t in token_ids), max_len)
    x = np.full((len(token_ids), width), pad_id, np.float32)
    for i, t in enumerate(token_ids):
        x[i, :min(len(t), width)] = t[:width]
    return x, sum(len(t) > width for t in token_ids)


def make_table(ids: list[str], x: np.ndarray, y: np.ndarray) -> pa.Table:
    d = x.shape[1]
    feats = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), d)
    return pa.table({"sample_id": pa.array(ids, pa.string()), "features": feats, "label": pa.array(y, pa.int64())})


def content_ids(x: np.ndarray) -> list[str]:
    """Stable ids from the input bytes; a repeated input gets '#n' so ids stay unique."""
    seen: dict[str, int] = {}
    out = []
    for row in np.ascontiguousarray(x, dtype=np.float32):
        h = hashlib.sha1(row.tobytes()).hexdigest()[:16]
        n = seen.get(h, 0)
        seen[h] = n + 1
        out.append(h if n == 0 else f"{h}#{n}")
    return out


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, test) row indices, each sorted. Teachers' jobs must use this too."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def features_of(table: pa.Table) -> np.ndarray:
    col = table.column("features").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)


def fingerprint(table: pa.Table) -> str:
    """Content hash of a canonical table (every column: ids, features or input_ids, labels)."""
    h = hashlib.sha256()
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        h.update(name.encode())
        if pa.types.is_fixed_size_list(col.type):
            h.update(np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False)).tobytes())
        else:
            h.update(pc.cast(col, pa.string()).to_pylist().__repr__().encode())
    return h.hexdigest()[:16]


# ---- text (task: lm) --------------------------------------------------------------------------


def load_text(source: str, text: str = "text", limit: int | None = None) -> list[str]:
    """The text column of a local .parquet / .csv file, validated."""
    table = _read_file(Path(source))
    col = _column(table, text, "text", source)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DistillError(f"dataset.text: column '{text}' in {source} must hold strings, not {col.type}")
    texts = col.to_pylist()[:limit]
    if not texts:
        raise DistillError(f"dataset.source: {source} has no rows")
    for i, t in enumerate(texts):
        if t is None or not t.strip():
            raise DistillError(f"dataset.text: row {i} of {source} is empty; drop empty texts first")
    return texts


def pack(token_ids: list[list[int]], max_len: int, eos_id: int) -> np.ndarray:
    """Concatenate the documents (each followed by EOS) and cut into [windows, max_len].

    The remainder shorter than max_len is dropped: every row then has the same shape, so the
    store, Ray Data and the train loop all see fixed-size tensors and no padding.
    """
    flat = np.fromiter((t for doc in token_ids for t in (*doc, eos_id)), dtype=np.int64)
    n = len(flat) // max_len
    if n == 0:
        raise DistillError(f"lm.max_len: {max_len} tokens is longer than the whole text ({len(flat)} tokens); "
                           "give more text or a smaller lm.max_len")
    return flat[: n * max_len].reshape(n, max_len)


def token_table(windows: np.ndarray) -> pa.Table:
    """Canonical LM rows: a content-hash sample_id and the window's input_ids."""
    ids = content_ids(windows.astype(np.float32))
    return pa.table({"sample_id": pa.array(ids, pa.string()),
                     "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1), pa.int32()),
                                                                    windows.shape[1])})
