"""The baseline the pipeline's labeling is compared with: the same teachers, called directly in
a tight loop in one process, at the same batch size, ensembled with the same function
(orchestrator.soft_labels.build_shard) and written as the same per-shard tables with plain
pyarrow. No Ray, no Serve, no sidecars or checksums.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.datasets import features_of
from orchestrator.models import load_teacher
from orchestrator.soft_labels import build_shard


def load_teachers(cfg) -> dict:
    return {t.name: load_teacher(t.model_dump()) for t in cfg.teachers}


def label_direct(cfg, train: pa.Table, out_dir: Path, teachers: dict | None = None, threads: int = 1,
                 ensemble: dict | None = None) -> dict:
    """Label ``train`` shard by shard; returns timings (s) of the parts and rows/s.

    ``threads``: torch intra-op threads of this process (1 = what each Serve replica uses).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        if teachers is None:
            teachers = load_teachers(cfg)
        t_loaded = time.perf_counter()
        manifest = {"label_kind": "dense", "ensemble": ensemble, "teachers": [{"name": n} for n in sorted(teachers)]}
        chunk = {t.name: t.max_batch_size for t in cfg.teachers}
        size = cfg.store.shard_size
        out_dir.mkdir(parents=True, exist_ok=True)
        compute = ens = write = 0.0
        for s, start in enumerate(range(0, train.num_rows, size)):
            inputs = train.slice(start, size)
            x = features_of(inputs)
            a = time.perf_counter()
            outputs = {name: np.concatenate([m(x[i: i + chunk[name]]) for i in range(0, len(x), chunk[name])])
                       for name, m in teachers.items()}
            b = time.perf_counter()
            table, _ = build_shard(inputs, outputs, manifest)
            c = time.perf_counter()
            pq.write_table(table, str(out_dir / f"shard-{s:05d}.parquet"))
            d = time.perf_counter()
            compute, ens, write = compute + b - a, ens + c - b, write + d - c
        t_end = time.perf_counter()
    finally:
        torch.set_num_threads(before)
    loop = t_end - t_loaded
    return {"load_s": t_loaded - t0, "loop_s": loop, "total_s": t_end - t0, "compute_s": compute,
            "ensemble_encode_s": ens, "write_s": write, "rows_per_s": train.num_rows / loop,
            "rows_per_s_with_load": train.num_rows / (t_end - t0)}
