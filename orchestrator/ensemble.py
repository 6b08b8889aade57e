"""Combine M teachers' class logits into one soft target distribution per sample.

Pure numpy (no Ray, no torch): float64 inside, float32 out. Every mode works on the
teachers' temperature-softened distributions ``p_i = softmax(z_i / T)``; modes that judge
teachers against the ground truth (``best_teacher``, ``ca_mkd``) score them with the
cross-entropy at T=1, so the choice of teacher does not move with the softening.

The per-sample teacher weights are computed from per-teacher statistics only (entropy,
label cross-entropy), see ``_teacher_weights``, so a sparse top-k path can reuse them.
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
