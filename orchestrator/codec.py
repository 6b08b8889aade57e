"""Top-k label codec: per token position, k (id, log-prob) pairs in about 2 bytes per pair. No Ray.

Schema version 3 of the store keeps each teacher's (and the ensemble's) top-k in two
fixed-size-list columns per row, under the column names of versions 1 and 2; per position:

``*.topk_ids`` (uint16, or uint32 for a vocabulary over 65535), k values:
    the position's ids sorted ascending, as gaps (id - previous id, the first from -1), so every
    gap is >= 1; a gap of 0 marks padding (id -1, which an ensemble writes when its union is
    short), which sorts last. Each gap's low 16 bits are stored bit-shuffled (``_shuffle``):
    byte 0 = gap bits 0-4 and 13-15, byte 1 = gap bits 5-12.
``*.topk_logprobs`` (uint8), k + 1 values:
    round(levels(k) * sqrt(p)) for the k entries in the same order, then the same for the tail
    (1 - the k probabilities). The decoder renormalises the k + 1 values to sum to 1.

Why this shape (measured on 32k-vocabulary distributions, benchmarks/bench_lm_bytes.py; both
columns are written BYTE_STREAM_SPLIT + zstd, ``columns.shard_write_options``):
  * A set of k ids sorted and gap-coded costs about log2(C(V, k)) / k bits per id (11 at
    k=32, V=32k) where ids in probability order cost 14: the order is implied by the
    probabilities, which are stored anyway.
  * Parquet keeps these integers as INT32; byte-stream-split hands zstd one stream per byte, and
    zstd's Huffman coder then spends about the stream's entropy on each. Split at bit 8, a gap
    (mean ~1000 at k=32) leaves a near-uniform low byte that Huffman cannot shrink (8 bits)
    beside a skewed high byte; split at bit 5, the skew goes where Huffman can use it:
    -0.9 bytes per position at k=32 (bits 13-15, rarely set, fill byte 0's spare bits).
  * KL(p || q) ~= 2 * sum_i (sqrt(p_i) - sqrt(q_i))^2, so a uniform grid in sqrt(p) spends
    the same KL on every entry: about (k + 1) / (6 * L^2) nats per position for L levels,
    whatever the distribution's shape; with an entropy coder behind it, an equal error per
    entry is also the fewest bits for a given KL. ``levels(k)`` is the smallest L that keeps
    that bound at KL_BUDGET for every k (k=8: 47, 16: 64, 32: 89, 64: 125; 255 at most, so
    over k=269 the bound grows as (k + 1) / (6 * 255^2)).
  * Codes go through byte-stream-split too, not Parquet's dictionary: the dictionary
    bit-packs to a fixed 7 bits that zstd cannot see through; one byte per code, Huffman-coded,
    costs the codes' entropy (~4.6 bits at k=32).
  * The tail is stored, not derived: 1 - sum(p) is a difference of large numbers, and a sharp
    position (p_top 0.99, tail 0.005) would lose it to the rounding of p_top. Renormalising
    the k + 1 decoded values spreads the rounding over all of them instead.
A code of 0 decodes to (1 / (4 L))^2, never to probability 0, so the KL from the true
distribution stays finite.

Older columns decode as they are; the dtypes say which version a column pair is:
  version 1: float16 log-probs (ids int16/int32 in probability order);
  version 2: uint8 codes with signed ids (plain gaps, L = 127 at every k);
  version 3: uint8 codes with unsigned ids (shuffled gaps, L = levels(k)).
"""
from __future__ import annotations

import math

import numpy as np

LEVELS_V2 = 127
KL_BUDGET = 1 / (6 * 240)  # ~6.9e-4 nats per position: the bound levels(k) keeps
PAD_ID = -1
PAD_LOGPROB = -1e4  # as orchestrator.ensemble pads: exp() is exactly 0


def levels(k: int) -> int:
    """Smallest L with (k + 1) / (6 L^2) <= KL_BUDGET, at most 255 (integer arithmetic: the
    stored format depends on it)."""
    return min(255, math.isqrt((k + 1) * 240 - 1) + 1)


def kl_bound(k: int) -> float:
    """The mean KL error (nats per position) the version-3 codes are built to stay under."""
    return (k + 1) / (6 * levels(k) ** 2)


def is_coded(logprobs) -> bool:
    """True for codes (uint8: version 2 or 3), False for version-1 log-probs (float)."""
    return np.asarray(logprobs).dtype == np.uint8


def is_current(ids, logprobs) -> bool:
    """True for version-3 columns (what ``encode`` writes)."""
    return is_coded(logprobs) and np.asarray(ids).dtype.kind == "u"


def _shuffle(g: np.ndarray) -> np.ndarray:
    """Gap bits 0-4 | 13-15 -> byte 0, bits 5-12 -> byte 1; bits from 16 up stay."""
    return (g & 0x1F) | ((g >> 13 & 7) << 5) | ((g >> 5 & 0xFF) << 8) | (g & ~0xFFFF)


def _unshuffle(v: np.ndarray) -> np.ndarray:
    return (v & 0x1F) | ((v >> 5 & 7) << 13) | ((v >> 8 & 0xFF) << 5) | (v & ~0xFFFF)


def _code_to_p(n_levels: int) -> np.ndarray:
    return np.array([(0.25 / n_levels) ** 2] + [(c / n_levels) ** 2 for c in range(1, 256)], np.float64)


def encode(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels -> the stored form (version 3).

    Args:
        ids: [N, k] int token ids (< 2^31), distinct per row, -1 = padding; any order.
        logprobs: [N, k] float log-probabilities of ``ids`` (padding: any value).
    Returns:
        (shuffled id gaps [N, k] uint32, codes [N, k + 1] uint8), as in the module docstring.
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
    codes = np.rint(np.sqrt(np.clip(np.concatenate([s_p, tail], -1), 0.0, 1.0)) * levels(ids.shape[-1]))
    return _shuffle(gaps).astype(np.uint32), codes.astype(np.uint8)


def decode(ids: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored form (any version) -> (ids [N, k] int64, logprobs [N, k] float32).

    Versions 2 and 3: ids ascending, padding -1 last; ``exp(logprobs).sum(-1)`` is the decoded
    top-k mass (the tail is the rest). Version-1 input (float log-probs) comes back as stored.
    """
    if not is_coded(codes):
        return np.asarray(ids).astype(np.int64), np.asarray(codes, np.float32)
    codes = np.asarray(codes)
    if is_current(ids, codes):
        gaps, n_levels = _unshuffle(np.asarray(ids).astype(np.int64)), levels(codes.shape[-1] - 1)
    else:
        gaps, n_levels = np.asarray(ids).astype(np.int64), LEVELS_V2
    pad = gaps == 0
    out_ids = np.where(pad, PAD_ID, np.cumsum(gaps, axis=-1) - 1)
    q = _code_to_p(n_levels)[codes]
    q[..., :-1][pad] = 0.0
    with np.errstate(divide="ignore"):
        lps = np.log(q[..., :-1] / q.sum(axis=-1, keepdims=True))
    return out_ids, np.where(pad, PAD_LOGPROB, lps).astype(np.float32)


def roundtrip(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """decode(encode(...)): what the store gives back for these labels."""
    return decode(*encode(ids, logprobs))
