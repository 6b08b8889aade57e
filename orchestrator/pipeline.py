"""The whole data path, top-down: prepare -> deploy + label -> train -> evaluate -> report.

    run(cfg)
      prepare   load the dataset, split it, fingerprint data and teachers     orchestrator/prepare.py
      label     Serve teachers -> a Labeler per shard -> store shards            orchestrator/labeling.py
                (finished shards are skipped; `--reensemble` needs no teacher)
      train     Ray Train TorchTrainer(student.train_loop) on the store,          orchestrator/training.py
                the KD student and the hard-label baseline
      evaluate  held-out scores of teachers, ensemble, students -> report       orchestrator/evaluation.py

Each stage is one call here; the CLI's `label`, `train` and `eval` commands call the same
functions one at a time. Ray runs only inside `ray_session` (orchestrator/session.py).
"""
from __future__ import annotations

import logging
import time

from . import metrics, resources, teacher_pool
from .config import DistillConfig
from .evaluation import evaluate_and_report
from .labeling import label
from .prepare import Prepared, prepare
from .session import RAY_ENV, ray_session
from .training import open_complete_store, train, train_students

log = logging.getLogger("distill")

__all__ = ["RAY_ENV", "Prepared", "evaluate_and_report", "label", "open_complete_store", "prepare", "ray_session",
           "run", "train", "train_students"]


def run(cfg: DistillConfig, quiet: bool = False) -> dict:
    t0, timings, name = time.perf_counter(), {}, cfg.run.name
    prep = prepare(cfg)
    # Serve teachers needed by several stages (train.on_policy) are deployed once: teacher_pool.py.
    with ray_session(cfg, quiet), teacher_pool.for_run(cfg):
        resources.check(cfg)  # a stage the cluster cannot place would wait for ever: refused here
        with metrics.stage(name, "label", timings):
            label(cfg, prep)
        with metrics.stage(name, "train", timings):
            states = train_students(cfg, prep)
        with metrics.stage(name, "evaluate", timings):
            out = evaluate_and_report(cfg, prep, states, quiet)
    log.info("run: done in %.0fs (%s)", time.perf_counter() - t0, ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return out
