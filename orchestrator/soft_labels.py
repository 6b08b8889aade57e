"""Teacher outputs of one shard -> the shard's stored table (teachers + ensemble). No Ray.

The labeler calls this with fresh teacher outputs; `distill label --reensemble` calls it with
the outputs already in the store, so both paths produce byte-identical shards for the same
ensemble settings.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .ensemble import ensemble_dense, ensemble_topk, teacher_disagreement, teacher_disagreement_topk
from .store import (SOFT_COLUMN, SOFT_TOPK, decode_teachers, decode_topk, encode_dense, encode_topk, teacher_column,
                    to_numpy, topk_columns)


def build_shard(inputs: pa.Table, outputs: dict, manifest: dict) -> tuple[pa.Table, dict]:
    """Ensemble the teachers' outputs and encode the shard.

    Args:
        inputs: the shard's input rows (sample_id, row, features+label or input_ids).
        outputs: per teacher name (any order: they are taken in the manifest's teacher order,
            so the shard's columns and the ensemble's sums never depend on the caller's order):
            dense logits [B, C], or top-k (ids [B, P, k], logprobs [B, P, k]) for an LM store.
        manifest: the store manifest (label_kind, k, ensemble, lm.vocab_size).
    Returns:
        (table, stats) with stats = mean teacher disagreement (JSD), mean top-k tail mass of the
        ensemble, and the number of labeled token positions (0 for classification).
    """
    ens = manifest["ensemble"]
    outputs = {t["name"]: outputs[t["name"]] for t in manifest["teachers"]}
    # Ensemble exactly what the store keeps (float32 logits; float16 log-probs), so that
    # re-ensembling stored outputs reproduces a freshly labeled shard bit for bit.
    if manifest["label_kind"] == "topk":
        outputs = {n: (np.asarray(i), np.asarray(lp).astype(np.float16).astype(np.float32)) for n, (i, lp) in outputs.items()}
    else:
        outputs = {n: np.asarray(o, dtype=np.float32) for n, o in outputs.items()}
    weights = [ens["weights"][n] for n in outputs]
    if manifest["label_kind"] != "topk":
        stacked = np.stack(list(outputs.values()))
        soft = ensemble_dense(stacked, mode=ens["mode"], temperature=ens["temperature"], weights=weights,
                              tau=ens["tau"], labels=inputs.column("label").to_numpy())
        stats = {"disagreement": float(teacher_disagreement(stacked, ens["temperature"]).mean()),
                 "tail_mass": 0.0, "tokens": 0}
        return encode_dense(inputs, outputs, soft), stats

    windows = to_numpy(inputs.column("input_ids"))
    b, k, vocab = len(windows), manifest["k"], manifest["lm"]["vocab_size"]
    ids = np.stack([o[0].reshape(-1, k) for o in outputs.values()])  # [M, B*P, k]
    lps = np.stack([o[1].reshape(-1, k) for o in outputs.values()])
    s_ids, s_lps, tail = ensemble_topk(
        ids, lps, k_out=k, vocab_size=vocab, mode=ens["mode"], temperature=ens["temperature"],
        weights=weights, tau=ens["tau"], labels=windows[:, 1:].reshape(-1),  # position t predicts token t+1
    )
    labels = {**outputs, SOFT_TOPK: (s_ids.reshape(b, -1, k), s_lps.reshape(b, -1, k))}
    stats = {"disagreement": float(teacher_disagreement_topk(ids, lps, ens["temperature"]).mean()),
             "tail_mass": float(tail.mean()), "tokens": int(ids.shape[1])}
    return encode_topk(inputs, labels, vocab), stats


def stored_outputs(shard: pa.Table, manifest: dict) -> tuple[pa.Table, dict]:
    """Split a stored shard back into (inputs, per-teacher outputs) as `build_shard` takes them."""
    names = [t["name"] for t in manifest["teachers"]]
    if manifest["label_kind"] == "topk":
        outputs = {n: decode_topk(shard, n, manifest["k"]) for n in names}
        labels = [c for n in [*names, SOFT_TOPK] for c in topk_columns(n)]
    else:
        outputs = dict(zip(names, decode_teachers(shard, names)))
        labels = [*(teacher_column(n) for n in names), SOFT_COLUMN]
    return shard.drop_columns(labels), outputs
