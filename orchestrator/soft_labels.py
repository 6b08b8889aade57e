"""Teacher outputs of one shard -> the shard's stored table (teachers + ensemble). No Ray.

The labeler calls this with fresh teacher outputs; `distill label --reensemble` calls it with
the outputs already in the store, so both paths produce byte-identical shards for the same
ensemble settings.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import codec
from .ensemble import ensemble_dense, ensemble_topk, teacher_disagreement, teacher_disagreement_topk
from .features import encode_features, features_of_output, logits_of, split_features
from .instruct import rows_of, targets
from .lm_features import encode_lm_features, split_lm_features
from .store import (SOFT_COLUMN, SOFT_REF_KEY, SOFT_TOPK, decode_teachers, encode_dense, encode_topk, stored_topk, teacher_column,
                    topk_columns)

# Modes whose ensemble of a single teacher at T=1 is that teacher's distribution: then the
# shard keeps no soft columns of its own but refers to the teacher's (store.soft_same_as).
IDENTITY_MODES = ("mean_prob", "mean_logit", "entropy")


def soft_same_as(manifest: dict, names: list[str]) -> str | None:
    """The teacher whose stored top-k equals the ensemble's, or None."""
    ens = manifest["ensemble"]
    if manifest["label_kind"] == "topk" and len(names) == 1 and ens["temperature"] == 1.0 \
            and ens["mode"] in IDENTITY_MODES and ens["weights"][names[0]] > 0:
        return names[0]
    return None


def build_shard(inputs: pa.Table, outputs: dict, manifest: dict) -> tuple[pa.Table, dict]:
    """Ensemble the teachers' outputs and encode the shard.

    Args:
        inputs: the shard's input rows (sample_id, row, features+label or input_ids).
        outputs: per teacher name (any order: they are taken in the manifest's teacher order,
            so the shard's columns and the ensemble's sums never depend on the caller's order):
            dense logits [B, C] (or {"logits", "features"} for a teacher with features: see
            orchestrator/features.py), or top-k (ids [B, P, k], logprobs [B, P, k]) for an LM store
            (+ {layer: float16 features} with teachers[].features: orchestrator/lm_features.py).
        manifest: the store manifest (label_kind, k, ensemble, lm.vocab_size).
    Returns:
        (table, stats) with stats = mean teacher disagreement (JSD), mean top-k tail mass of the
        ensemble, and the number of labeled token positions (0 for classification).
    """
    ens = manifest["ensemble"]
    outputs = {t["name"]: outputs[t["name"]] for t in manifest["teachers"]}
    # teachers[].features: stored after every label column, in the manifest's teacher order
    feats = {n: features_of_output(o) for n, o in outputs.items() if features_of_output(o)}
    outputs = {n: logits_of(o) for n, o in outputs.items()}
    if manifest["label_kind"] == "topk":  # LM teachers with features answer (ids, logprobs, {layer: features})
        feats = {n: o[2] for n, o in outputs.items() if len(o) == 3}
        outputs = {n: tuple(o[:2]) for n, o in outputs.items()}
    # Ensemble exactly what the store keeps (float32 logits; top-k through the codec), so that
    # re-ensembling stored outputs reproduces a freshly labeled shard bit for bit: the stored
    # codes go back unchanged, and the ensemble sees their decoded values either way.
    if manifest["label_kind"] == "topk":
        k = manifest["k"]
        coded = {n: (i, lp) if codec.is_coded(lp) else codec.encode(np.asarray(i).reshape(-1, k), np.asarray(lp).reshape(-1, k))
                 for n, (i, lp) in outputs.items()}
        outputs = {n: codec.decode(*c) for n, c in coded.items()}
    else:
        outputs = {n: np.asarray(o, dtype=np.float32) for n, o in outputs.items()}
    weights = [ens["weights"][n] for n in outputs]
    if manifest["label_kind"] != "topk":
        stacked = np.stack(list(outputs.values()))
        soft = ensemble_dense(stacked, mode=ens["mode"], temperature=ens["temperature"], weights=weights,
                              tau=ens["tau"], labels=inputs.column("label").to_numpy())
        stats = {"disagreement": float(teacher_disagreement(stacked, ens["temperature"]).mean()),
                 "tail_mass": 0.0, "tokens": 0}
        return encode_features(encode_dense(inputs, outputs, soft), feats), stats

    # Windows (format text): every position t of a row, predicting token t+1. Packed
    # instruction rows: the teachers answered only the positions that carry loss, in row order.
    rows = rows_of(inputs)
    sel = targets(rows)
    b, k, vocab = len(rows), manifest["k"], manifest["lm"]["vocab_size"]
    true_next = (rows if rows.ndim == 2 else rows[:, 0])[:, 1:][sel]
    ids = np.stack([o[0].reshape(-1, k) for o in outputs.values()])  # [M, N, k]
    lps = np.stack([o[1].reshape(-1, k) for o in outputs.values()])
    s_ids, s_lps, tail = ensemble_topk(
        ids, lps, k_out=k, vocab_size=vocab, mode=ens["mode"], temperature=ens["temperature"],
        weights=weights, tau=ens["tau"], labels=true_next,
    )
    counts = sel.sum(axis=1) if rows.ndim == 3 else None
    if counts is None:
        labels = {n: (c[0].reshape(b, -1), c[1].reshape(b, -1)) for n, c in coded.items()}
        labels[SOFT_TOPK] = (s_ids.reshape(b, -1, k), s_lps.reshape(b, -1, k))
    else:
        labels = {**coded, SOFT_TOPK: (s_ids, s_lps)}
    stats = {"disagreement": float(teacher_disagreement_topk(ids, lps, ens["temperature"]).mean()),
             "tail_mass": float(tail.mean()), "tokens": int(ids.shape[1])}
    table = encode_topk(inputs, labels, vocab, soft_same_as=soft_same_as(manifest, list(outputs)), counts=counts)
    return encode_lm_features(table, feats, manifest["teachers"], counts) if feats else table, stats


def stored_outputs(shard: pa.Table, manifest: dict) -> tuple[pa.Table, dict]:
    """Split a stored shard back into (inputs, per-teacher outputs) as `build_shard` takes them
    (top-k as stored: the codes go back into the shard unchanged)."""
    names = [t["name"] for t in manifest["teachers"]]
    if manifest["label_kind"] == "topk":
        outputs = {n: stored_topk(shard, n, manifest["k"]) for n in names}
        labels = [c for n in [*names, SOFT_TOPK] for c in topk_columns(n)]
        shard, feats = split_lm_features(shard, manifest["teachers"])  # teachers[].features, as stored
        outputs.update({n: (*outputs[n], f) for n, f in feats.items()})
    else:
        outputs = dict(zip(names, decode_teachers(shard, names)))
        labels = [*(teacher_column(n) for n in names), SOFT_COLUMN]
        shard, feats = split_features(shard, manifest["teachers"])
        outputs.update({n: {"logits": outputs[n], "features": f} for n, f in feats.items()})
    shard = shard.drop_columns([c for c in labels if c in shard.column_names])
    meta = {k: v for k, v in (shard.schema.metadata or {}).items() if k != SOFT_REF_KEY}
    return shard.replace_schema_metadata(meta or None), outputs
