"""Stage 4, evaluate and report: held-out scores of the teachers, the ensemble and the students
(the maths is in orchestrator/evaluate.py), then report.json / report.md / plots."""
from __future__ import annotations

from . import metrics
from .config import DistillConfig
from .errors import DistillError
from .prepare import Prepared
from .report import table, write_report
from .store import open_store


def evaluate_and_report(cfg: DistillConfig, prep: Prepared, states: dict[str, dict] | None = None) -> dict:
    from .evaluate import evaluate, evaluate_lm

    if states is None:
        states = load_students(cfg)
    # One teacher order everywhere: the store's (by name), not the config list's.
    teachers = sorted((t.model_dump() for t in cfg.teachers), key=lambda t: t["name"])
    store = open_store(cfg.store_path)
    if cfg.task == "lm":
        vocab = store.load_manifest()["lm"]["vocab_size"]
        results = evaluate_lm(prep.test, teachers, prep.ensemble, states, cfg.lm.k, vocab)
    else:
        results = evaluate(prep.test, teachers, prep.ensemble, states)
    metrics.eval_results(cfg.run.name, results["models"])
    curves = {name: s["history"] for name, s in states.items()}
    extra = {"config": cfg.model_dump(mode="json"), "store": store.summary() if store.exists() else None}
    path = write_report(cfg.run_dir, cfg.run.name, cfg.task, results, curves, extra)
    return {"report": str(path), "table": table(results["models"], cfg.task), **results}


def load_students(cfg: DistillConfig) -> dict[str, dict]:
    import torch

    names = ["student", "student_hard"] if cfg.eval.baseline else ["student"]
    states = {}
    for n in names:
        p = cfg.run_dir / "students" / f"{n}.pt"
        if not p.exists():
            raise DistillError(f"no trained '{n}' at {p}: run `distill train` first")
        states[n] = torch.load(p, map_location="cpu", weights_only=False)
    return states
