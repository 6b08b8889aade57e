"""Curating teacher-generated responses before training (`distill generate`). Pure numpy: no Ray.

The curation score of a response is its NLL per token (lower is better): with cross-scoring the
ensemble's, else the generating teacher's own. The ensemble's NLL of a written token is that of
the weighted mixture of the teachers at T=1, -log sum_i w_i p_i(token), computed exactly from
each teacher's NLL of that token (as the held-out evaluation computes the mean_prob ensemble's
perplexity, orchestrator/evaluate.py): high when the teachers disagree with what was written.
"""
from __future__ import annotations

import numpy as np

# In the order they are applied; a response is counted under the first reason that drops it.
REASONS = ("no_eos", "empty", "duplicate", "max_nll", "over_keep")


def mixture_nll(teacher_nll: np.ndarray, weights: np.ndarray) -> float:
    """teacher_nll [M, T] (each teacher's NLL of the T written tokens), weights [M] -> the
    mixture's mean NLL per token."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    p = np.einsum("m,mt->t", w, np.exp(-np.asarray(teacher_nll, np.float64)))
    return float(-np.log(np.clip(p, 1e-30, None)).mean())


def curate(samples: list[dict], max_nll: float | None = None, keep: int | None = None) -> tuple[list[int], dict]:
    """samples, each {prompt_id, tokens (sequence of ints), finished, empty, score}, in a fixed
    order (the first of exact duplicates is the one kept) -> (indices kept, in input order;
    counts {total, kept, dropped: {reason: count}}).

    Dropped, in this order: `no_eos` (hit max_new_tokens without an end-of-sequence token),
    `empty` (nothing but the end token: no response text to learn from), `duplicate` (same
    prompt, same response tokens as an earlier sample, from any teacher), `max_nll` (score above
    max_nll), `over_keep` (beyond the best `keep` of its prompt by score; ties by input order).
    """
    dropped = dict.fromkeys(REASONS, 0)
    seen, alive = set(), []
    for i, s in enumerate(samples):
        key = (s["prompt_id"], tuple(int(t) for t in s["tokens"]))
        reason = ("no_eos" if not s["finished"] else "empty" if s["empty"] else "duplicate" if key in seen
                  else "max_nll" if max_nll is not None and not s["score"] <= max_nll else None)
        seen.add(key)
        if reason:
            dropped[reason] += 1
        else:
            alive.append(i)
    if keep is not None:
        by_prompt: dict = {}
        for i in alive:
            by_prompt.setdefault(samples[i]["prompt_id"], []).append(i)
        best = set()
        for members in by_prompt.values():
            best.update(sorted(members, key=lambda i: (samples[i]["score"], i))[:keep])
        dropped["over_keep"] = len(alive) - len(best)
        alive = [i for i in alive if i in best]
    return alive, {"total": len(samples), "kept": len(alive), "dropped": dropped}
