"""The Ray Data callable that labels one store shard at a time.

Each input row names a shard; the labeler reads that shard's input rows from the store, asks
every teacher concurrently (in chunks no larger than the teacher's Serve batch), checks the
outputs, ensembles them (dense class logits, or per-token top-k for causal LMs) and writes the
shard (atomically) through the store.
"""
from __future__ import annotations

import numpy as np
from ray import serve

from orchestrator.datasets import features_of
from orchestrator.ensemble import ensemble_dense, ensemble_topk, teacher_disagreement, teacher_disagreement_topk
from orchestrator.errors import DistillError
from orchestrator.store import LabelStore, encode_dense, encode_topk, to_numpy


class Labeler:
    def __init__(self, store_uri: str, apps: dict[str, str], chunk: dict[str, int], ensemble: dict):
        self.store = LabelStore(store_uri)
        self.store.load_manifest()
        self.lm = self.store.manifest["label_kind"] == "topk"
        self.handles = {name: serve.get_app_handle(app) for name, app in apps.items()}
        self.chunk = chunk
        self.ensemble = ensemble

    def _ask_all(self, x: np.ndarray) -> dict:
        # Fire every request first, then wait: teachers (and their replicas) work in parallel.
        pending = {
            name: [h.predict.remote(x[i : i + self.chunk[name]]) for i in range(0, len(x), self.chunk[name])]
            for name, h in self.handles.items()
        }
        out = {}
        for name, rs in pending.items():
            parts = [r.result() for r in rs]
            out[name] = tuple(np.concatenate(p) for p in zip(*parts)) if self.lm else np.concatenate(parts)
        return out

    def _check(self, outputs: dict, inputs, shard: int) -> None:
        rows = inputs.num_rows
        for name, out in outputs.items():
            first = out[0] if self.lm else out
            if first.shape[0] != rows:
                raise DistillError(f"teacher '{name}' returned {first.shape[0]} rows for {rows} in shard {shard}")
            values = out[1] if self.lm else out
            bad = ~np.isfinite(values.reshape(rows, -1)).all(axis=1)
            if bad.any():
                sid = inputs.column("sample_id")[int(np.argmax(bad))].as_py()
                raise DistillError(
                    f"teacher '{name}' returned NaN/Inf for {int(bad.sum())} rows of shard {shard} "
                    f"(first: sample_id {sid}); nothing was written for this shard"
                )
        if not self.lm and len({o.shape[-1] for o in outputs.values()}) != 1:
            widths = {n: o.shape[-1] for n, o in outputs.items()}
            raise DistillError(f"teachers returned different class counts in shard {shard}: {widths}")

    def _weights(self) -> list[float]:
        return [self.ensemble["weights"][n] for n in self.handles]

    def _dense(self, inputs, logits: dict) -> tuple:
        stacked = np.stack([logits[n] for n in self.handles])
        soft = ensemble_dense(
            stacked, mode=self.ensemble["mode"], temperature=self.ensemble["temperature"],
            weights=self._weights(), tau=self.ensemble["tau"], labels=inputs.column("label").to_numpy(),
        )
        stats = {"disagreement": float(teacher_disagreement(stacked, self.ensemble["temperature"]).mean()),
                 "tail_mass": 0.0, "tokens": 0}
        return encode_dense(inputs, logits, soft), stats

    def _topk(self, inputs, topk: dict) -> tuple:
        windows = to_numpy(inputs.column("input_ids"))
        b, k = len(windows), self.store.manifest["k"]
        ids = np.stack([topk[n][0].reshape(-1, k) for n in self.handles])  # [M, B*P, k]
        lps = np.stack([topk[n][1].reshape(-1, k) for n in self.handles])
        vocab = self.store.manifest["lm"]["vocab_size"]
        s_ids, s_lps, tail = ensemble_topk(
            ids, lps, k_out=k, vocab_size=vocab, mode=self.ensemble["mode"],
            temperature=self.ensemble["temperature"], weights=self._weights(), tau=self.ensemble["tau"],
            labels=windows[:, 1:].reshape(-1),  # position t predicts token t+1
        )
        labels = {n: topk[n] for n in self.handles}
        labels["soft"] = (s_ids.reshape(b, -1, k), s_lps.reshape(b, -1, k))
        stats = {"disagreement": float(teacher_disagreement_topk(ids, lps, self.ensemble["temperature"]).mean()),
                 "tail_mass": float(tail.mean()), "tokens": int(ids.shape[1])}
        return encode_topk(inputs, labels, vocab), stats

    def label_shard(self, shard: int) -> dict:
        inputs = self.store.read_inputs(shard)
        x = to_numpy(inputs.column("input_ids")) if self.lm else features_of(inputs)
        outputs = self._ask_all(x)
        self._check(outputs, inputs, shard)
        table, stats = (self._topk if self.lm else self._dense)(inputs, outputs)
        info = self.store.write_shard(shard, table)
        return {"shard": shard, "rows": info.rows, "bytes": info.bytes, **stats}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.label_shard(int(s)) for s in batch["shard"]]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}
