"""Top-k label codec: per token position, k (id, log-prob) pairs in about 2.2 bytes per pair. No Ray.

Schema version 2 of the store keeps each teacher's (and the ensemble's) top-k in two
fixed-size-list columns per row, under the column names of version 1:

``*.topk_ids`` (int16, or int32 for a vocabulary over 32767), k per position:
    the position's ids sorted ascending, stored as gaps (id - previous id, the first from -1),
    so every gap is >= 1; a gap of 0 marks padding (id -1, which an ensemble writes when its
    union is short), which sorts last.
``*.topk_logprobs`` (uint8), k + 1 per position:
    round(LEVELS * sqrt(p)) for the k entries in the same order, then the same for the tail
    (1 - the k probabilities). The decoder renormalises the k + 1 values to sum to 1.

Why this shape (measured on 32k-vocabulary distributions, benchmarks/bench_lm_bytes.py):
  * A set of k ids sorted and gap-coded costs about log2(C(V, k)) / k bits per id (11 at
    k=32, V=32k) where ids in probability order cost 14: the order is implied by the
    probabilities, which are stored anyway.
  * KL(p || q) ~= 2 * sum_i (sqrt(p_i) - sqrt(q_i))^2, so a uniform grid in sqrt(p) spends
    the same KL on every entry: about (k + 1) / (6 * LEVELS^2) nats per position (3.4e-4 at
    k=32, 6.7e-4 at k=64), whatever the distribution's shape.
  * The tail is stored, not derived: 1 - sum(p) is a difference of large numbers, and a sharp
    position (p_top 0.99, tail 0.005) would lose it to the rounding of p_top. Renormalising
    the k + 1 decoded values spreads the rounding over all of them instead.
  * LEVELS = 127 keeps 128 distinct codes, which Parquet's dictionary encoding bit-packs to 7
    bits before zstd (plain zstd does worse on these near-random small bytes).
A code of 0 decodes to (h/4)^2 (h = 1/LEVELS), never to probability 0, so the KL from the true
distribution stays finite.

Version-1 columns (ids in probability order, float16 log-probs) decode as they are: the
log-prob column's dtype says which version a column is (uint8 codes: version 2).
"""
from __future__ import annotations

import numpy as np

LEVELS = 127
PAD_ID = -1
PAD_LOGPROB = -1e4  # as orchestrator.ensemble pads: exp() is exactly 0
_P = np.array([(0.25 / LEVELS) ** 2] + [(c / LEVELS) ** 2 for c in range(1, 256)], np.float64)  # code -> p


def is_coded(logprobs) -> bool:
    """True for version-2 codes (uint8), False for version-1 log-probs (float)."""
    return np.asarray(logprobs).dtype == np.uint8


def encode(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels -> the stored form.

    Args:
        ids: [N, k] int token ids, distinct per row, -1 = padding; any order.
        logprobs: [N, k] float log-probabilities of ``ids`` (padding: any value).
    Returns:
        (id gaps [N, k] int64, codes [N, k + 1] uint8), as in the module docstring.
    """
    ids = np.asarray(ids, np.int64)
    p = np.exp(np.asarray(logprobs, np.float64))
    pad = ids < 0
    p = np.where(pad, 0.0, np.nan_to_num(p, nan=0.0))
    tail = np.clip(1.0 - p.sum(axis=-1, keepdims=True), 0.0, 1.0)
    order = np.argsort(np.where(pad, np.iinfo(np.int64).max, ids), axis=-1, kind="stable")  # padding last
    s_ids = np.take_along_axis(ids, order, -1)
    s_p = np.take_along_axis(p, order, -1)
    gaps = np.where(s_ids < 0, 0, np.diff(s_ids, axis=-1, prepend=-1))
    codes = np.rint(np.sqrt(np.clip(np.concatenate([s_p, tail], -1), 0.0, 1.0)) * LEVELS)
    return gaps, codes.astype(np.uint8)


def decode(ids: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored form -> (ids [N, k] int64 ascending, padding -1 last; logprobs [N, k] float32).

    ``exp(logprobs).sum(-1)`` is the decoded top-k mass (the tail is the rest). Version-1
    input (float log-probs) comes back as it was stored.
    """
    if not is_coded(codes):
        return np.asarray(ids).astype(np.int64), np.asarray(codes, np.float32)
    gaps = np.asarray(ids).astype(np.int64)
    pad = gaps == 0
    out_ids = np.where(pad, PAD_ID, np.cumsum(gaps, axis=-1) - 1)
    q = _P[np.asarray(codes)]
    q[..., :-1][pad] = 0.0
    with np.errstate(divide="ignore"):
        lps = np.log(q[..., :-1] / q.sum(axis=-1, keepdims=True))
    return out_ids, np.where(pad, PAD_LOGPROB, lps).astype(np.float32)


def roundtrip(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """decode(encode(...)): what the store gives back for these labels."""
    return decode(*encode(ids, logprobs))
