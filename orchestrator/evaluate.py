"""Held-out evaluation of every teacher, the ensemble and the students. Pure torch: no Ray."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from .datasets import features_of
from .ensemble import NEEDS_LABELS, ensemble_dense, log_softmax
from .models import ClassifierTeacher, build_student, count_params

LATENCY_SAMPLES = 50


def _latency_ms(predict, x: np.ndarray) -> float:
    """Median wall time of single-sample calls (after one warm-up call)."""
    predict(x[:1])
    times = []
    for i in range(min(LATENCY_SAMPLES, len(x))):
        t0 = time.perf_counter()
        predict(x[i : i + 1])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _scores(log_probs: np.ndarray, y: np.ndarray) -> dict:
    return {
        "accuracy": float((log_probs.argmax(1) == y).mean()),
        "nll": float(-log_probs[np.arange(len(y)), y].mean()),
    }


def student_predictor(state: dict):
    model = build_student(state["spec"])
    model.load_state_dict(state["model"])
    model.eval()

    @torch.inference_mode()
    def predict(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return predict, count_params(model)


def evaluate(test: pa.Table, teachers: list[dict], ensemble: dict, students: dict[str, dict]) -> dict:
    """Scores on the held-out split. ``students`` maps a model name to its checkpoint state."""
    torch.set_num_threads(1)  # single-sample latency is what a served student sees
    x, y = features_of(test), test.column("label").to_numpy()
    models, teacher_logits = {}, []
    for cfg in teachers:
        teacher = ClassifierTeacher(cfg)
        logits = teacher(x)
        teacher_logits.append(logits)
        models[cfg["name"]] = {
            "kind": "teacher", "backend": cfg["backend"], **_scores(log_softmax(logits), y),
            "params": count_params(teacher.model), "latency_ms": _latency_ms(teacher, x),
        }

    # The ensemble is scored at T=1 (T only softens the training targets). Modes that weight
    # teachers by the true label cannot run on unseen data: score their mean_prob mixture.
    mode = ensemble["mode"] if ensemble["mode"] not in NEEDS_LABELS else "mean_prob"
    weights = [ensemble["weights"][c["name"]] for c in teachers]
    probs = ensemble_dense(np.stack(teacher_logits), mode=mode, temperature=1.0, weights=weights, tau=ensemble["tau"])
    ens_lp = np.log(np.clip(probs, 1e-12, None))
    teacher_rows = [models[c["name"]] for c in teachers]
    models["ensemble"] = {
        "kind": "ensemble", "mode": mode, **_scores(ens_lp, y),
        "params": sum(m["params"] for m in teacher_rows),
        "latency_ms": sum(m["latency_ms"] for m in teacher_rows),
    }
    for name, state in students.items():
        predict, params = student_predictor(state)
        lp = log_softmax(predict(x))
        models[name] = {
            "kind": "student", "loss": state.get("loss"), **_scores(lp, y), "params": params,
            "latency_ms": _latency_ms(predict, x),
            "agreement_with_ensemble": float((lp.argmax(1) == ens_lp.argmax(1)).mean()),
        }
    return {"models": models, "test_rows": int(len(y)), "ensemble_eval_mode": mode}
