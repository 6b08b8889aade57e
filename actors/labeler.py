"""The Ray Data callable that labels one store shard at a time.

Each input row names a shard; the labeler reads that shard's input rows from the store, asks
every teacher concurrently (in chunks no larger than the teacher's Serve batch), checks the
outputs, ensembles them and writes the shard (atomically) through the store.
"""
from __future__ import annotations

import numpy as np
from ray import serve

from orchestrator.datasets import features_of
from orchestrator.ensemble import ensemble_dense, teacher_disagreement
from orchestrator.errors import DistillError
from orchestrator.store import LabelStore, encode_dense


class Labeler:
    def __init__(self, store_uri: str, apps: dict[str, str], chunk: dict[str, int], ensemble: dict):
        self.store = LabelStore(store_uri)
        self.store.load_manifest()
        self.handles = {name: serve.get_app_handle(app) for name, app in apps.items()}
        self.chunk = chunk
        self.ensemble = ensemble

    def _ask_all(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # Fire every request first, then wait: teachers (and their replicas) work in parallel.
        pending = {
            name: [h.predict.remote(x[i : i + self.chunk[name]]) for i in range(0, len(x), self.chunk[name])]
            for name, h in self.handles.items()
        }
        return {name: np.concatenate([r.result() for r in rs]) for name, rs in pending.items()}

    def label_shard(self, shard: int) -> dict:
        inputs = self.store.read_inputs(shard)
        x, labels = features_of(inputs), inputs.column("label").to_numpy()
        logits = self._ask_all(x)
        width = {name: out.shape[-1] for name, out in logits.items()}
        for name, out in logits.items():
            if out.shape[0] != len(x) or len(set(width.values())) != 1:
                raise DistillError(f"teacher '{name}' returned shape {out.shape} for {len(x)} rows (widths: {width})")
            bad = ~np.isfinite(out).all(axis=1)
            if bad.any():
                sid = inputs.column("sample_id")[int(np.argmax(bad))].as_py()
                raise DistillError(
                    f"teacher '{name}' returned NaN/Inf for {int(bad.sum())} rows of shard {shard} "
                    f"(first: sample_id {sid}); nothing was written for this shard"
                )
        stacked = np.stack([logits[n] for n in self.handles])
        weights = [self.ensemble["weights"][n] for n in self.handles]
        soft = ensemble_dense(
            stacked, mode=self.ensemble["mode"], temperature=self.ensemble["temperature"],
            weights=weights, tau=self.ensemble["tau"], labels=labels,
        )
        info = self.store.write_shard(shard, encode_dense(inputs, logits, soft))
        return {
            "shard": shard,
            "rows": info.rows,
            "bytes": info.bytes,
            "disagreement": float(teacher_disagreement(stacked, self.ensemble["temperature"]).mean()),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.label_shard(int(s)) for s in batch["shard"]]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}
