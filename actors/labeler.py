"""The Ray Data callable that labels one store shard at a time.

Each input row names a shard; the labeler reads that shard's input rows from the store, asks
every teacher concurrently (in chunks no larger than the teacher's Serve batch), checks the
outputs, ensembles them (dense class logits, or per-token top-k for causal LMs) and writes the
shard (atomically) through the store.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from ray import exceptions, serve

from orchestrator.datasets import features_of
from orchestrator.errors import DistillError
from orchestrator.features import check_features, concat_outputs, logits_of
from orchestrator.soft_labels import build_shard
from orchestrator.instruct import rows_of, targets
from orchestrator.lm_features import concat_answers
from orchestrator.store import LabelStore

log = logging.getLogger("distill")

# What a replica's death looks like to a caller: its actor died (process killed, node lost) or
# was unreachable for a while. Anything else (a teacher's own exception) is not retried.
REPLICA_LOST = (exceptions.RayActorError,)  # ActorDiedError, ActorUnavailableError
RETRIES = 8  # backoff 1, 2, 4, 8, 10... s: about a minute for Serve to bring up a new replica


class Labeler:
    def __init__(self, store_uri: str, apps: dict[str, str], chunk: dict[str, int], run: str = ""):
        from actors import metrics

        self.metrics, self.tags = metrics.labeler(), {"run": run}
        self.store = LabelStore(store_uri)
        self.store.load_manifest()
        self.lm = self.store.manifest["label_kind"] == "topk"
        self.handles = {name: serve.get_app_handle(app) for name, app in apps.items()}
        self.chunk = chunk
        self.features = {t["name"]: t.get("features", []) for t in self.store.manifest["teachers"]}
        self.pools = {t["name"]: t.get("pool") for t in self.store.manifest["teachers"]}

    def _ask_all(self, x: np.ndarray) -> dict:
        # Fire every request first, then wait: teachers (and their replicas) work in parallel.
        pending = {
            name: [(i, h.predict.remote(x[i : i + self.chunk[name]])) for i in range(0, len(x), self.chunk[name])]
            for name, h in self.handles.items()
        }
        out = {}
        for name, rs in pending.items():
            parts = [self._result(name, r, x[i : i + self.chunk[name]]) for i, r in rs]
            out[name] = concat_answers(parts) if self.lm else concat_outputs(parts)
        return out

    def _result(self, name: str, response, rows: np.ndarray):
        return answer(name, response, lambda: self.handles[name].predict.remote(rows),
                      then="; re-run to resume from the finished shards")

    def _check(self, outputs: dict, inputs, x: np.ndarray, shard: int) -> None:
        rows = inputs.num_rows
        # Packed instruction rows: teachers answer only the positions that carry loss, in row order.
        counts = targets(x).sum(axis=1) if self.lm and x.ndim == 3 else None
        expect = int(counts.sum()) if counts is not None else rows
        for name, out in outputs.items():  # teachers[].features: every layer, [rows (or positions), ...], finite
            if isinstance(out, dict):
                check_features(name, out["features"], self.features[name], rows, shard)
            elif self.lm and len(out) == 3:  # LM (ids, logprobs, features): packed rows' per-token ones, one per labeled position
                check_features(name, out[2], self.features[name], expect if self.pools[name] == "none" else rows, shard)
        outputs = {n: logits_of(o) for n, o in outputs.items()}
        for name, out in outputs.items():
            first = out[0] if self.lm else out
            if first.shape[0] != expect:
                what = "labeled positions" if counts is not None else "rows"
                raise DistillError(f"teacher '{name}' returned {first.shape[0]} {what} for {expect} in shard {shard}")
            values = out[1] if self.lm else out
            bad = ~np.isfinite(values.reshape(expect, -1)).all(axis=1)
            if counts is not None:  # per position -> per row
                bad = np.add.reduceat(bad, np.r_[0, np.cumsum(counts)[:-1]]) > 0
            if bad.any():
                sid = inputs.column("sample_id")[int(np.argmax(bad))].as_py()
                raise DistillError(
                    f"teacher '{name}' returned NaN/Inf for {int(bad.sum())} rows of shard {shard} "
                    f"(first: sample_id {sid}); nothing was written for this shard"
                )
        if not self.lm and len({o.shape[-1] for o in outputs.values()}) != 1:
            widths = {n: o.shape[-1] for n, o in outputs.items()}
            raise DistillError(f"teachers returned different class counts in shard {shard}: {widths}")

    def label_shard(self, shard: int) -> dict:
        inputs = self.store.read_inputs(shard)
        x = rows_of(inputs) if self.lm else features_of(inputs)
        outputs = self._ask_all(x)
        self._check(outputs, inputs, x, shard)
        table, stats = build_shard(inputs, {n: outputs[n] for n in self.handles}, self.store.manifest)
        info = self.store.write_shard(shard, table)
        m = self.metrics
        m["samples"].inc(info.rows, tags=self.tags)
        if stats["tokens"]:
            m["tokens"].inc(stats["tokens"], tags=self.tags)
        m["bytes"].inc(info.bytes, tags=self.tags)
        m["disagreement"].set(stats["disagreement"], tags=self.tags)
        m["tail_mass"].set(stats["tail_mass"], tags=self.tags)
        return {"shard": shard, "rows": info.rows, "bytes": info.bytes, **stats}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.label_shard(int(s)) for s in batch["shard"]]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def answer(name: str, response, resend, lost: str = "request", what: str = "", then: str = ""):
    """A teacher's answer to `response`; a request lost with its replica (killed, node gone) is
    sent again with `resend()`, up to RETRIES times (labeling, on-policy scoring).

    Teachers are pure functions of their input, so a retry gives the same labels. Serve
    replaces a dead replica; the handle routes the retry to a live one once it is up.
    lost / what / then word the warning and the final error for the caller.
    """
    for attempt in range(RETRIES + 1):
        try:
            return response.result()
        except REPLICA_LOST as e:
            if attempt == RETRIES:
                raise DistillError(f"teacher '{name}': no live replica answered{what} after {RETRIES} retries "
                                   f"({type(e).__name__}){then}") from None
            log.warning("teacher '%s': %s lost with its replica (%s); retry %d/%d",
                        name, lost, type(e).__name__, attempt + 1, RETRIES)
            time.sleep(min(2 ** attempt, 10))
            response = resend()
