"""Causal-LM teacher features (``teachers[].features`` with task lm): capture, answer plumbing and
the store layout. Pure torch / numpy / pyarrow: no Ray.

A feature is a hidden-state index (0 = the embeddings, i = after layer i, negative from the last),
read from the teacher's ``output_hidden_states`` in the same forward pass as its top-k. What is
kept depends on ``pool``:
- ``none`` (per token): the vector at every position that carries a label in the store, i.e. the
  positions whose top-k is stored (position t predicts token t+1): every position 0..L-2 of a
  text window, the loss-masked (response) positions of packed instruction rows. Windows are
  stored as ``[L-1, D]`` per row (a fixed-size list, like their top-k); packed rows as a
  variable-length list of ``count * D`` values (the row's labeled positions, in order), with
  shape ``[-1, D]`` in the field metadata.
- ``mean``: the mean over the row's labeled positions, ``[D]`` per row (one vector per store
  row; a packed row's examples are averaged together).
- ``cls``: position 0 of the row, ``[D]``. Of little use for a causal model (the first token
  sees nothing else); kept for symmetry with classification.
Everything is cast to float16 on the teacher's device before it crosses to the host, and only
the named layers at the kept positions ever leave the forward pass.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from .columns import ragged_list
from .features import PREFIX, SHAPE_KEY, decode_feature, encode_features, feature_column

PER_POSITION = -1  # the leading shape entry of a packed row's per-token feature: one D-vector per labeled position


def keep_positions(hidden: torch.Tensor, sel: torch.Tensor, pool: str, windows: bool) -> torch.Tensor:
    """One layer's hidden states [B, L, D] -> what the store keeps, float16.

    sel [B, L-1] bool: the positions that carry a label. pool none: [B, L-1, D] for windows
    (every position is selected), [N, D] for packed rows (N = sel.sum(), row order); mean:
    [B, D] over each row's selected positions; cls: [B, D] at position 0.
    """
    h = hidden[:, :-1]
    if pool == "none":
        return (h if windows else h[sel]).to(torch.float16)
    if pool == "cls":
        return hidden[:, 0].to(torch.float16)
    m = sel.to(torch.float32).unsqueeze(-1)  # mean in float32: a long row's float16 sum would overflow
    return ((h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).to(torch.float16)


def gather_student(hidden: torch.Tensor, sel: torch.Tensor, pool: str | None) -> torch.Tensor:
    """The student's side of a term, at the teacher feature's positions: hidden [B, L, Ds],
    sel [B, L-1] -> [N, Ds] (pool none: the labeled positions, row order, as the teacher's are
    stored) or [B, Ds] (mean over the labeled positions, or cls at position 0)."""
    if pool in (None, "none"):
        return hidden[:, :-1][sel]
    if pool == "cls":
        return hidden[:, 0]
    m = sel.to(hidden.dtype).unsqueeze(-1)
    return (hidden[:, :-1] * m).sum(1) / m.sum(1).clamp_min(1.0)


def split_answer(out: tuple, row_cuts: np.ndarray, pos_cuts: np.ndarray, per_token: bool) -> list:
    """Serve batching: one LM answer (ids, logprobs[, {layer: features}]) for many callers ->
    one per caller. Top-k (and per-token features) split at pos_cuts, pooled features at row_cuts."""
    parts = [np.split(o, pos_cuts) for o in out[:2]]
    answers = list(zip(*parts))
    if len(out) == 2:
        return answers
    cuts = pos_cuts if per_token else row_cuts
    feats = {k: np.split(v, cuts) for k, v in out[2].items()}
    return [(*a, {k: v[i] for k, v in feats.items()}) for i, a in enumerate(answers)]


def concat_answers(parts: list[tuple]) -> tuple:
    """The inverse for the labeler: a teacher's answers to consecutive chunks of rows, joined."""
    joined = tuple(np.concatenate([p[j] for p in parts]) for j in range(2))
    if len(parts[0]) == 2:
        return joined
    return (*joined, {k: np.concatenate([p[2][k] for p in parts]) for k in parts[0][2]})


def arrays(out) -> list[np.ndarray]:
    """Every array of an answer (the health probe checks them all for NaN/Inf)."""
    if isinstance(out, tuple):
        return [a for o in out for a in (o.values() if isinstance(o, dict) else [o])]
    return [out]


def encode_lm_features(table: pa.Table, feats: dict[str, dict[str, np.ndarray]], teachers: list[dict],
                       counts: np.ndarray | None) -> pa.Table:
    """Append the LM feature columns, in the manifest's teacher order (``teachers``: its entries,
    with ``pool``). Pooled features and windows' per-token ones [B, L-1, D] are fixed-size lists
    (orchestrator/features.py); a packed shard's per-token [N, D] become one variable-length list
    per row (``counts``: labeled positions per row) with shape [-1, D]."""
    for t in teachers:
        for layer, x in feats.get(t["name"], {}).items():
            if counts is None or t.get("pool") != "none":
                table = encode_features(table, {t["name"]: {layer: x}})
                continue
            arr = ragged_list(np.ascontiguousarray(x, dtype=np.float16), counts, pa.float16())
            field = pa.field(feature_column(t["name"], layer), arr.type,
                             metadata={SHAPE_KEY: json.dumps([PER_POSITION, int(x.shape[-1])]).encode()})
            table = table.append_column(field, arr)
    return table


def decode_lm_feature(table: pa.Table, teacher: str, layer: int | str) -> np.ndarray:
    """A stored LM feature as float16: [B, D], [B, L-1, D], or [N, D] for a packed shard's per-token one."""
    name = feature_column(teacher, layer)
    shape = json.loads(table.schema.field(name).metadata[SHAPE_KEY])
    if shape[0] != PER_POSITION:
        return decode_feature(table, teacher, layer)
    col = table.column(name)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, shape[1])


def split_lm_features(table: pa.Table, teachers: list[dict]) -> tuple[pa.Table, dict[str, dict[str, np.ndarray]]]:
    """A stored LM shard -> (the shard without feature columns, {teacher: {layer: float16 array}})."""
    out = {t["name"]: {str(x): decode_lm_feature(table, t["name"], x) for x in t["features"]}
           for t in teachers if t.get("features")}
    return table.drop_columns([c for c in table.column_names if c.startswith(PREFIX)]), out


def dense_positions(values: np.ndarray, sel: np.ndarray, shape: list[int]) -> np.ndarray:
    """A batch's stored feature values (rows concatenated) -> per row: [B, L-1, D] per token (zero
    where no label; the stored vectors fill sel's positions in row order) or [B, D] pooled."""
    if len(shape) == 1:
        return values.reshape(len(sel), shape[0])
    d = shape[-1]
    dense = np.zeros((*sel.shape, d), values.dtype)
    dense[sel] = values.reshape(-1, d)
    return dense


def feature_bytes_per_token(pf, max_len: int) -> dict[str, float] | None:
    """Stored (compressed) bytes per labeled token position of each feature column of an LM shard
    file (``pf``: a pyarrow ParquetFile); None without feature columns."""
    from .columns import to_numpy
    from .features import feature_bytes_per_sample

    per_sample = feature_bytes_per_sample(pf.metadata)
    if not per_sample:
        return None
    rows = pf.metadata.num_rows
    if "loss_mask" in pf.schema_arrow.names:  # packed instruction rows: only the response positions are labeled
        positions = int(to_numpy(pf.read(["loss_mask"]).column(0))[:, 1:].sum())
    else:
        positions = rows * (max_len - 1)
    return {c: b * rows / max(positions, 1) for c, b in per_sample.items()}
