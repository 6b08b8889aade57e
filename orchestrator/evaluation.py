"""Stage 4, evaluate and report: held-out scores of the teachers, the ensemble and the students
(the maths is in orchestrator/evaluate.py), then report.json / report.md / plots.

Task lm: nothing large runs in the driver.
- Teachers are scored as they are served: through their Serve deployments' `score` (a vLLM
  teacher by vLLM, on the GPUs that serve it). Labeling scores the held-out split while the
  teachers are up anyway and keeps the scores in `run_dir/eval/` (keyed by the held-out data,
  the teacher's fingerprint and k); evaluation deploys the teachers only when a score is missing.
- Students are scored in a Ray task (on a GPU when train.use_gpu), in batches.
The driver holds per-position arrays only ([N, k] top-k of the teachers; [N] NLLs).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from . import metrics, teacher_pool
from .config import DistillConfig
from .errors import DistillError
from .prepare import Prepared
from .report import table, write_report
from .session import ray_session, reraise_user_error
from .store import open_store

log = logging.getLogger("distill")
IN_FLIGHT = 4  # held-out batches outstanding per teacher: bounded memory, replicas kept busy


def evaluate_and_report(cfg: DistillConfig, prep: Prepared, states: dict[str, dict] | None = None,
                        quiet: bool = False) -> dict:
    import ray

    from .evaluate import evaluate, evaluate_lm, lm_rows

    if states is None:
        states = load_students(cfg)
    # One teacher order everywhere: the store's (by name), not the config list's.
    teachers = sorted((t.model_dump() for t in cfg.teachers), key=lambda t: t["name"])
    store = open_store(cfg.store_path)
    if cfg.task == "lm":
        vocab = store.load_manifest()["lm"]["vocab_size"]
        rows, labels = lm_rows(prep.test)
        # One deployment serves both the missing held-out scores and teacher_nll_of_samples. The
        # students' own tasks come first (and their answers before the teachers are deployed, in
        # _sample_scores): on a cluster the teachers fill, a student task beside them never starts.
        with ray_session(cfg, quiet), teacher_pool.hold():
            from . import resources

            resources.check(cfg, ("evaluate",))  # `distill eval` alone too: never a silent wait
            # Each student goes to the object store once, for both of its tasks (a task argument
            # is serialised by the driver at every call).
            refs = {n: ray.put({"spec": s["spec"], "model": s["model"]}) for n, s in states.items()}
            s_scores = {n: {**score_student(cfg, refs[n], rows), "loss": s.get("loss")} for n, s in states.items()}
            samples = _sample_scores(cfg, prep, refs, vocab)
            t_scores = teacher_scores(cfg, prep, teachers, rows)
        results = {**evaluate_lm(labels, t_scores, prep.ensemble, s_scores, cfg.lm.k, vocab), "test_rows": len(rows)}
        for n, extra in samples.items():  # beside each student's reference perplexity
            results["models"][n].update(extra)
    else:
        results = evaluate(prep.test, teachers, prep.ensemble, states)
    metrics.eval_results(cfg.run.name, results["models"])
    curves = {name: s["history"] for name, s in states.items()}
    extra = {"config": cfg.model_dump(mode="json"), "store": store.summary() if store.exists() else None}
    path = write_report(cfg.run_dir, cfg.run.name, cfg.task, results, curves, extra)
    return {"report": str(path), "table": table(results["models"], cfg.task), **results}


def load_students(cfg: DistillConfig) -> dict[str, dict]:
    import torch

    from .training import drop_training_state

    names = ["student", "student_hard"] if cfg.eval.baseline else ["student"]
    states = {}
    for n in names:
        p = cfg.run_dir / "students" / f"{n}.pt"
        if not p.exists():
            raise DistillError(f"no trained '{n}' at {p}: run `distill train` first")
        # mmap: the optimiser's part of the file is dropped without being read
        states[n] = drop_training_state(torch.load(p, map_location="cpu", weights_only=False, mmap=True))
    return states


# ---- teachers, through Serve --------------------------------------------------------------------


def _score_file(cfg: DistillConfig, prep: Prepared, teacher: dict) -> tuple[Path, str]:
    from .models import teacher_fingerprint

    key = hashlib.sha256(f"{prep.test_fingerprint}|{teacher_fingerprint(teacher)}|{cfg.lm.k}".encode()).hexdigest()[:16]
    return cfg.run_dir / "eval" / f"{teacher['name']}.npz", key


def _cached(cfg: DistillConfig, prep: Prepared, teacher: dict) -> dict | None:
    path, key = _score_file(cfg, prep, teacher)
    if not path.exists():
        return None
    with np.load(path) as z:
        if str(z["key"]) != key:
            return None
        return {n: z[n] for n in ("ids", "logprobs", "nll")} | {
            "params": int(z["params"]), "latency_ms": float(z["latency_ms"]), "backend": teacher["backend"]}


def score_teachers(cfg: DistillConfig, prep: Prepared, apps: dict[str, str], rows: np.ndarray | None = None) -> None:
    """Score the held-out split through the deployed teachers `apps` and keep it in run_dir/eval/."""
    from ray import serve

    from .evaluate import EVAL_BATCH, _latency_ms, flat_scores, lm_rows

    rows = lm_rows(prep.test)[0] if rows is None else rows
    teachers = {t.name: t.model_dump() for t in cfg.teachers}
    for name, app in apps.items():
        handle = serve.get_app_handle(app)
        batches = [rows[i:i + EVAL_BATCH] for i in range(0, len(rows), EVAL_BATCH)]
        parts, pending = [], []
        try:
            for b in batches:  # at most IN_FLIGHT batches outstanding
                pending.append(handle.score.remote(b))
                if len(pending) >= IN_FLIGHT:
                    parts.append(pending.pop(0).result())
            parts += [r.result() for r in pending]
            latency = _latency_ms(lambda r: handle.score.remote(r).result(), rows)
            params = handle.params.remote().result()
        except Exception as e:  # noqa: BLE001
            reraise_user_error(e)
        ids, lps, nll = flat_scores(parts, cfg.lm.k)
        path, key = _score_file(cfg, prep, teachers[name])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids, logprobs=lps, nll=nll, params=params, latency_ms=latency, key=key)
        tmp.replace(path)  # atomic: a half-written file is never read
        log.info("evaluate: teacher '%s' scored %d held-out positions through Serve (ppl %.2f)",
                 name, len(nll), float(np.exp(nll.mean())))


def missing_scores(cfg: DistillConfig, prep: Prepared) -> list[str]:
    return [t.name for t in cfg.teachers if _cached(cfg, prep, t.model_dump()) is None]


def teacher_scores(cfg: DistillConfig, prep: Prepared, teachers: list[dict], rows: np.ndarray) -> dict[str, dict]:
    """Per teacher (store order): its held-out scores, from run_dir/eval/ or, where missing,
    from the teachers deployed now (attached ones are used and left running)."""
    from actors import teacher as serve_teachers

    scores = {t["name"]: _cached(cfg, prep, t) for t in teachers}
    missing = [t for t in teachers if scores[t["name"]] is None]
    if missing:
        log.info("evaluate: scoring the held-out split through %s", ", ".join(t["name"] for t in missing))
        apps = serve_teachers.attach([t for t in missing if t["serve_app"]])
        owned = teacher_pool.deploy(cfg.run.name, [t for t in missing if not t["serve_app"]], cfg.task, cfg.lm.k)
        try:
            score_teachers(cfg, prep, {**apps, **owned}, rows)
        finally:
            teacher_pool.release(owned)
        scores.update({t["name"]: _cached(cfg, prep, t) for t in missing})
    return scores


# ---- students, in a Ray task ---------------------------------------------------------------------


def _sample_scores(cfg: DistillConfig, prep: Prepared, states: dict[str, dict], vocab: int) -> dict[str, dict]:
    """Each student's answers to the held-out prompts, scored by the teachers (eval.sample_*)."""
    if not cfg.eval.sample_max_new_tokens or not states:
        return {}
    from .sample_eval import for_students

    return for_students(cfg, prep, states, vocab)


def score_student(cfg: DistillConfig, state: dict, rows: np.ndarray) -> dict:
    """A student's held-out scores, computed in a Ray task (on a GPU when train.use_gpu)."""
    import ray

    task = ray.remote(_score_student_task).options(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)
    try:
        return ray.get(task.remote(state, rows))
    except Exception as e:  # noqa: BLE001
        reraise_user_error(e)


def _score_student_task(state: dict, rows: np.ndarray) -> dict:
    import torch

    from .evaluate import student_scores
    from .students import from_state

    torch.set_num_threads(1)  # single-sample latency is what a served student sees
    model = from_state({k: v for k, v in state["spec"].items() if k != "arch"}, state["model"])
    return student_scores(model, rows, "cuda" if torch.cuda.is_available() else "cpu")
