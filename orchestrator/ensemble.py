"""Combine M teachers' class logits into one soft target distribution per sample.

Pure numpy (no Ray, no torch): float64 inside, float32 out. Every mode works on the
teachers' temperature-softened distributions ``p_i = softmax(z_i / T)``; modes that judge
teachers against the ground truth (``best_teacher``, ``ca_mkd``) score them with the
cross-entropy at T=1, so the choice of teacher does not move with the softening.

The per-sample teacher weights are computed from per-teacher statistics only (entropy,
label cross-entropy), see ``_teacher_weights``, so the sparse top-k path (``ensemble_topk``,
for causal-LM teachers that return per-token top-k ids + logprobs) reuses them.

Over 300 lines: the dense and the sparse (top-k) paths share that weighting and its checks;
split in two files, one algorithm would be read in two places.
"""
from __future__ import annotations

import numpy as np

MODES = ("mean_prob", "mean_logit", "entropy", "best_teacher", "ca_mkd")
NEEDS_LABELS = ("best_teacher", "ca_mkd")


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax along ``axis`` (shift by the max before exp)."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats; 0 * log 0 is taken as 0."""
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -np.sum(plogp, axis=axis)


def _check_logits(logits, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3:
        raise ValueError(f"teacher logits must be 3-D [teachers, batch, classes], got shape {z.shape}")
    if z.shape[0] == 0 or z.shape[2] == 0:
        raise ValueError(f"teacher logits need at least one teacher and one class, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("teacher logits contain NaN or inf")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return z


def _static_weights(weights, num_teachers: int) -> np.ndarray:
    """[M] non-negative static teacher weights, normalised to sum 1 (default: uniform)."""
    if weights is None:
        return np.full(num_teachers, 1.0 / num_teachers)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != num_teachers:
        raise ValueError(f"weights has {w.shape[0]} entries but there are {num_teachers} teachers")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() == 0:
        raise ValueError("weights are all zero; at least one teacher needs a positive weight")
    return w / w.sum()


def _check_labels(labels, mode: str, batch: int, num_classes: int) -> np.ndarray:
    if labels is None:
        raise ValueError(f"ensemble mode '{mode}' needs ground-truth labels")
    y = np.asarray(labels)
    if y.shape != (batch,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {batch} integers (one per sample), "
                         f"got shape {y.shape} dtype {y.dtype}")
    if np.any(y < 0) or np.any(y >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {y.min()} max {y.max()}")
    return y.astype(np.int64)


def _label_ce(log_p1: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[M, B] cross-entropy -log p_i(y_b) from T=1 log-probs [M, B, C]."""
    batch = np.arange(log_p1.shape[1])
    return -log_p1[:, batch, labels]


def _teacher_weights(mode: str, static_w: np.ndarray, batch: int, *,
                     entropy=None, label_ce=None, tau: float = 1.0) -> np.ndarray:
    """Per-sample teacher weights [M, B] (each column sums to 1) for the weighted-sum modes.

    Takes only per-teacher statistics ([M, B] entropies of the softened distributions,
    [M, B] label cross-entropies at T=1), never the distributions themselves, so a sparse
    (top-k) representation can feed it too.
    """
    if mode == "mean_prob":
        return np.repeat(static_w[:, None], batch, axis=1)
    if mode == "entropy":
        # softmax over teachers of -H/tau, times the static weights; done in log space
        # so a sharp tau cannot underflow every teacher to 0. A zero static weight -> -inf.
        with np.errstate(divide="ignore"):
            score = np.log(static_w)[:, None] - entropy / tau
        return np.exp(log_softmax(score, axis=0))
    if mode == "best_teacher":
        # np.argmin returns the first minimum, so ties go to the lowest teacher index.
        best = np.argmin(label_ce, axis=0)
        w = np.zeros_like(label_ce)
        w[best, np.arange(label_ce.shape[1])] = 1.0
        return w
    if mode == "ca_mkd":
        num_teachers = label_ce.shape[0]
        if num_teachers == 1:
            return np.ones_like(label_ce)
        # Zhang et al. 2022: a teacher with low CE gets a small softmax share, hence a
        # large weight; dividing by M-1 makes the weights sum to 1.
        share = np.exp(log_softmax(label_ce, axis=0))
        return (1.0 - share) / (num_teachers - 1)
    raise ValueError(f"no per-sample teacher weights for mode '{mode}'")


def ensemble_dense(logits: np.ndarray, *, mode: str, temperature: float = 1.0,
                   weights=None, tau: float = 1.0, labels=None) -> np.ndarray:
    """Ensemble target distribution from dense teacher logits.

    Args:
        logits: [M, B, C] raw class logits of M teachers (at T=1).
        mode: one of ``MODES``.
        temperature: softening T applied to every teacher, p_i = softmax(z_i / T).
        weights: [M] non-negative static teacher weights (default uniform); ignored by
            ``best_teacher`` and ``ca_mkd``, which pick their own per-sample weights.
        tau: temperature of the softmax over teachers in ``entropy`` mode.
        labels: [B] int class labels, required by the modes in ``NEEDS_LABELS``.

    Returns:
        [B, C] float32 probabilities, rows summing to 1.
    """
    if mode not in MODES:
        raise ValueError(f"unknown ensemble mode '{mode}'; use one of {', '.join(MODES)}")
    z = _check_logits(logits, temperature)
    num_teachers, batch, num_classes = z.shape
    static_w = _static_weights(weights, num_teachers)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_p = log_softmax(z / temperature)  # [M, B, C]

    if mode == "mean_logit":
        # Product of experts: weighted geometric mean of the softened distributions.
        out = np.exp(log_softmax(np.einsum("m,mbc->bc", static_w, log_p)))
        return out.astype(np.float32)

    entropy = label_ce = None
    if mode == "entropy":
        entropy = _entropy(np.exp(log_p))  # [M, B], of the softened distributions
    if mode in NEEDS_LABELS:
        y = _check_labels(labels, mode, batch, num_classes)
        label_ce = _label_ce(log_softmax(z), y)  # at T=1
    w = _teacher_weights(mode, static_w, batch, entropy=entropy, label_ce=label_ce, tau=tau)  # [M, B]
    out = np.einsum("mb,mbc->bc", w, np.exp(log_p))
    out /= out.sum(axis=-1, keepdims=True)  # guard against float drift
    return out.astype(np.float32)


def teacher_disagreement(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Generalised Jensen-Shannon divergence between the M softened teachers, per sample.

    JS = H(mean_i p_i) - mean_i H(p_i), in nats, equal teacher weights. 0 when all
    teachers agree; at most ln M.

    Args:
        logits: [M, B, C] raw teacher logits.
    Returns:
        [B] float32.
    """
    z = _check_logits(logits, temperature)
    p = np.exp(log_softmax(z / temperature))  # [M, B, C]
    js = _entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0)
    return np.maximum(js, 0.0).astype(np.float32)  # clip -1e-17 rounding noise


# ---------------------------------------------------------------------------------------
# Sparse (top-k) teachers: per token position, k token ids + their log-probs at T=1, the
# unlisted mass 1 - sum(exp(logprobs)) kept as one "tail bucket".
# ---------------------------------------------------------------------------------------

# Padding of ensemble_topk's output when fewer than k_out tokens have probability > 0.
# exp(PAD_LOGPROB) is exactly 0 in float16/32/64, so padded rows still sum to 1 with the
# tail, and -1e4 is finite and exact in float16 (the store's logprob dtype), unlike -inf.
PAD_ID = -1
PAD_LOGPROB = -1e4

# Top-k probabilities may sum a little over 1 from rounding (float16 storage); more than
# this is taken for a caller passing logits instead of log-probabilities.
_MASS_TOL = 1e-2
# Floor of a probability read from a tail bucket: an empty tail gives a large but finite
# -log (about 708), so CE-based weights and the product of experts stay finite.
_LOG_TINY = float(np.log(np.finfo(np.float64).tiny))


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_topk(ids, logprobs, temperature: float, vocab_size=None):
    """Validate top-k teacher outputs; returns (ids int64 [M, N, k], logprobs float64 [M, N, k])."""
    i, lp = np.asarray(ids), np.asarray(logprobs, dtype=np.float64)
    if i.ndim != 3 or lp.shape != i.shape:
        raise ValueError(f"top-k ids and logprobs must both be 3-D [teachers, positions, k] of one "
                         f"shape, got {i.shape} and {lp.shape}")
    if not np.issubdtype(i.dtype, np.integer):
        raise ValueError(f"top-k ids must be integers, got dtype {i.dtype}")
    if i.shape[0] == 0 or i.shape[2] == 0:
        raise ValueError(f"top-k outputs need at least one teacher and k >= 1, got shape {i.shape}")
    if not np.all(np.isfinite(lp)):
        raise ValueError("top-k logprobs contain NaN or inf")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    i = i.astype(np.int64)
    if i.size and i.min() < 0:
        raise ValueError(f"top-k ids must be >= 0, got {i.min()}")
    if vocab_size is not None and i.size and i.max() >= vocab_size:
        raise ValueError(f"vocab_size {vocab_size} must exceed every token id, got id {i.max()}")
    srt = np.sort(i, axis=-1)
    if np.any(srt[..., 1:] == srt[..., :-1]):
        raise ValueError("a teacher lists the same token id twice at one position")
    mass = np.exp(lp).sum(axis=-1)
    if mass.size and mass.max() > 1.0 + _MASS_TOL:
        raise ValueError(f"top-k probabilities sum to {mass.max():.4f} > 1 at some position; "
                         f"logprobs must be log-probabilities at T=1")
    return i, lp


def topk_tail_mass(logprobs) -> np.ndarray:
    """Unlisted probability mass 1 - sum(exp(logprobs)) over the last axis, clipped to [0, 1].

    Args:
        logprobs: [..., k] top-k log-probabilities (padding ``PAD_LOGPROB`` adds 0).
    Returns:
        [...] float32.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim == 0:
        raise ValueError("logprobs must have a last axis of k entries, got a scalar")
    return np.clip(1.0 - np.exp(lp).sum(axis=-1), 0.0, 1.0).astype(np.float32)


def _soften_topk(logprobs: np.ndarray, temperature: float) -> np.ndarray:
    """[M, N, k] logprobs at T=1 -> [M, N, k+1] softened log-probs; the last bucket is the tail.

    q_j ∝ p_j^(1/T) over the k listed tokens and the tail as one category. Top-k mass over 1
    (rounding) gives tail 0 and is renormalised here.
    """
    tail = np.clip(1.0 - np.exp(logprobs).sum(axis=-1, keepdims=True), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        buckets = np.concatenate([logprobs, np.log(tail)], axis=-1)  # an empty tail is -inf
    return log_softmax(buckets / temperature)


def _union(ids: np.ndarray, span: int):
    """Union of the teachers' token ids per position, as a padded slot grid.

    Returns ``slots`` [N, S=M*k] (every listed id, sorted ascending per row, repeats kept),
    ``first`` [N, S] (True on the first slot of each distinct id: the union's tokens) and
    ``pos`` [M, N*k], where teacher i's listed token (n, j) sits in the flattened grid.
    """
    num_teachers, n, k = ids.shape
    slots = np.sort(np.moveaxis(ids, 0, 1).reshape(n, num_teachers * k), axis=1)
    first = np.ones(slots.shape, dtype=bool)
    first[:, 1:] = slots[:, 1:] != slots[:, :-1]
    offset = np.arange(n, dtype=np.int64)[:, None] * span  # row-major keys: sorted overall
    keys = (slots + offset).ravel()
    pos = np.stack([np.searchsorted(keys, (ids[i] + offset).ravel()) for i in range(num_teachers)])
    return slots, first, pos


def _on_union(values: np.ndarray, pos: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Scatter per-teacher values [M, N, k] into a copy of ``base`` [M, N, S] at ``pos``."""
    out = base.reshape(base.shape[0], -1).copy()
    np.put_along_axis(out, pos, values.reshape(values.shape[0], -1), axis=1)
    return out.reshape(base.shape)


def _topk_label_ce(ids, log_q1, labels, vocab_size: int) -> np.ndarray:
    """[M, N] -log p_i(y_n) at T=1; an unlisted label gets its share of the uniform tail."""
    k = ids.shape[2]
    hit = ids == labels[None, :, None]  # [M, N, k]
    listed = np.where(hit, log_q1[..., :k], 0.0).sum(axis=-1)
    unlisted = np.maximum(log_q1[..., k] - np.log(max(vocab_size - k, 1)), _LOG_TINY)
    return -np.where(hit.any(axis=-1), listed, unlisted)


def _cut_back(slots, valid, p, tail, k_out: int):
    """Keep the k_out most probable union tokens (p > 0), the rest of the mass goes to the tail."""
    p = np.where(valid, p, 0.0)
    total = p.sum(axis=1) + tail
    p, tail = p / total[:, None], tail / total  # guard against float drift
    if p.shape[1] < k_out:
        extra = ((0, 0), (0, k_out - p.shape[1]))
        p, slots = np.pad(p, extra), np.pad(slots, extra, constant_values=PAD_ID)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k_out]  # ties: lower token id first
    top = np.take_along_axis(p, order, axis=1)
    keep = top > 0
    ids_out = np.where(keep, np.take_along_axis(slots, order, axis=1), PAD_ID)
    with np.errstate(divide="ignore"):
        lp_out = np.where(keep, np.log(top), PAD_LOGPROB)
    tail_out = np.clip(1.0 - top.sum(axis=1), 0.0, 1.0)  # = tail + the mass cut off
    return ids_out.astype(np.int64), lp_out.astype(np.float32), tail_out.astype(np.float32)


def ensemble_topk(ids, logprobs, *, k_out: int, vocab_size: int, mode: str, temperature: float = 1.0,
                  weights=None, tau: float = 1.0, labels=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ensemble target from sparse (top-k) teacher outputs, cut back to k_out tokens + a tail.

    Each teacher i gives, per token position, k token ids and their log-probs at T=1; its
    unlisted mass ``tail_i = 1 - sum(exp(logprobs))`` is kept as one extra bucket.

    Approximations (the teachers' full distributions are not known):
      * Temperature: each teacher's k listed tokens + its tail bucket are softened as a
        (k+1)-category distribution, q_j ∝ p_j^(1/T), the tail as ONE category. The tail is
        really many tokens, each of which would soften on its own; this is the usual top-k
        approximation. It is exact at T=1, and it magnifies small tails for T > 1 (tail^(1/T)),
        rounding noise in stored logprobs included.
      * Union: the output support is every token any teacher listed. A teacher's probability
        for a union token it did not list is 0 in the mixture modes (``mean_prob``,
        ``entropy``, ``best_teacher``, ``ca_mkd``); that mass stays in its tail bucket, and
        the mixture's tail is the weighted sum of the teachers' tails.
      * Uniform tail: where a per-token value of an unlisted token is needed, teacher i is
        taken to spread its (softened) tail evenly over its V - k unlisted tokens,
        q_i(v) = tail_i / (V - k) (V = vocab_size), floored at float64 tiny when the tail
        is empty. ``mean_logit`` uses it for union tokens a teacher did not list, and gives
        the V - |U| tokens outside the union U the bucket
        ``tail = (V - |U|) * prod_i (tail_i / (V - k))^w_i``, i.e. the geometric mean of the
        teachers' tails times (V - |U|) / (V - k); union and tail are then renormalised
        together. ``best_teacher`` / ``ca_mkd`` score an unlisted label at T=1 with
        CE_i = -log(tail_i / (V - k)).
      * Cut back: the k_out most probable union tokens are kept; the rest of the union and
        the mixture's tail form ``tail_out``. Tokens with probability 0 (e.g. ones only a
        teacher with weight 0 listed) are dropped. When fewer than k_out tokens remain, the
        row is padded with id ``PAD_ID`` (-1) and logprob ``PAD_LOGPROB`` (-1e4), which
        exponentiates to exactly 0.

    Args:
        ids: [M, N, k] int token ids (M teachers, N flattened token positions); rows need not
            be sorted, ids within a row must be distinct and in [0, vocab_size).
        logprobs: [M, N, k] float log-probabilities of ``ids`` at T=1.
        k_out: number of tokens kept per position in the output.
        vocab_size: V, the shared vocabulary size.
        mode, temperature, weights, tau: as in ``ensemble_dense``.
        labels: [N] int ground-truth next-token ids, required by the modes in ``NEEDS_LABELS``.

    Returns:
        ``(ids_out [N, k_out] int64, logprobs_out [N, k_out] float32, tail_out [N] float32)``,
        sorted by probability descending (ties: lower id first), softened at ``temperature``,
        with ``exp(logprobs_out).sum(-1) + tail_out == 1``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown ensemble mode '{mode}'; use one of {', '.join(MODES)}")
    k_out = _check_count("k_out", k_out)
    vocab_size = _check_count("vocab_size", vocab_size)
    ids, lp = _check_topk(ids, logprobs, temperature, vocab_size)
    num_teachers, n, k = ids.shape
    static_w = _static_weights(weights, num_teachers)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_q = _soften_topk(lp, temperature)  # [M, N, k+1], tail last
    slots, first, pos = _union(ids, vocab_size)
    grid = (num_teachers, *slots.shape)

    if mode == "mean_logit":
        # Product of experts over union + tail under the uniform-tail assumption.
        # Every log here is finite (the floor), so a weight-0 teacher adds exactly 0.
        log_unlisted = np.maximum(log_q[..., k] - np.log(max(vocab_size - k, 1)), _LOG_TINY)  # [M, N]
        log_qu = _on_union(log_q[..., :k], pos, np.broadcast_to(log_unlisted[..., None], grid))
        score = np.where(first, np.einsum("m,mns->ns", static_w, log_qu), -np.inf)
        with np.errstate(divide="ignore"):  # a union covering the vocabulary leaves no tail
            log_tail = np.log(vocab_size - first.sum(axis=1)) + static_w @ log_unlisted
        p_all = np.exp(log_softmax(np.concatenate([score, log_tail[:, None]], axis=1)))
        return _cut_back(slots, first, p_all[:, :-1], p_all[:, -1], k_out)

    q = np.exp(log_q)
    entropy = label_ce = None
    if mode == "entropy":
        entropy = _entropy(q)  # [M, N], over the k+1 softened buckets
    if mode in NEEDS_LABELS:
        y = _check_labels(labels, mode, n, vocab_size)
        label_ce = _topk_label_ce(ids, _soften_topk(lp, 1.0), y, vocab_size)  # at T=1
    w = _teacher_weights(mode, static_w, n, entropy=entropy, label_ce=label_ce, tau=tau)  # [M, N]
    qu = _on_union(q[..., :k], pos, np.zeros(grid))  # unlisted -> 0
    p = np.einsum("mn,mns->ns", w, qu)
    tail = np.einsum("mn,mn->n", w, q[..., k])
    return _cut_back(slots, first, p, tail, k_out)


def teacher_disagreement_topk(ids, logprobs, temperature: float = 1.0) -> np.ndarray:
    """Generalised JSD between M softened top-k teachers, per position, over union + tail.

    Same as ``teacher_disagreement`` on the (|U|+1)-bucket distributions: each teacher puts 0
    on union tokens it did not list, and the tails are compared as one shared bucket (which
    cannot tell apart teachers whose tails cover different tokens, so it underestimates).
    0 for identical teachers, at most ln M.

    Args:
        ids, logprobs: [M, N, k] top-k ids and log-probs at T=1 (see ``ensemble_topk``).
    Returns:
        [N] float32.
    """
    ids, lp = _check_topk(ids, logprobs, temperature)
    num_teachers, _, k = ids.shape
    q = np.exp(_soften_topk(lp, temperature))  # [M, N, k+1]
    slots, _, pos = _union(ids, int(ids.max()) + 1 if ids.size else 1)
    mix = _on_union(q[..., :k], pos, np.zeros((num_teachers, *slots.shape))).mean(axis=0)
    mix = np.concatenate([mix, q[..., k].mean(axis=0)[:, None]], axis=1)  # repeated slots hold 0
    js = _entropy(mix) - _entropy(q).mean(axis=0)
    return np.maximum(js, 0.0).astype(np.float32)
