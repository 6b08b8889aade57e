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
# Held-out LM windows per forward pass: the [B, L, V] float32 logits of a batch are what is held
# (8 x 512 x 151,936 x 4 B = 2.5 GB), so memory does not grow with the held-out split.
EVAL_BATCH = 8
ENSEMBLE_CHUNK = 8192  # held-out positions ensembled at a time (evaluate_lm)


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
    """features [N, D] -> logits [N, C] of a trained student (an MLP, or an arch hf sequence
    classifier reading the features as token ids, EVAL_BATCH * 32 rows per forward pass)."""
    hf = state["spec"]["arch"] == "hf"
    if hf:
        from .cls_students import cls_from_state, cls_logits

        model = cls_from_state(state["spec"], state["model"])
    else:
        model = build_student(state["spec"])
        model.load_state_dict(state["model"])
        model.eval()

    @torch.inference_mode()
    def predict(x: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not hf:
            return model(x).numpy()
        pad, step = state["spec"].get("pad_token_id"), EVAL_BATCH * 32
        return torch.cat([cls_logits(model, x[i:i + step], pad) for i in range(0, len(x), step)]).numpy()

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


def _lm_scores(nll: np.ndarray, top1: np.ndarray, labels: np.ndarray) -> dict:
    return {"perplexity": float(np.exp(nll.mean())), "nll": float(nll.mean()),
            "accuracy": float((top1 == labels).mean())}  # top-1 next-token accuracy


def ensemble_true_token_nll(teacher_nll: np.ndarray, weights: np.ndarray, mode: str, e_ids: np.ndarray,
                            e_lps: np.ndarray, tail: np.ndarray, labels: np.ndarray, vocab_size: int):
    """The ensemble's NLL of each true next token, [N], and how it was computed (None: exact).

    mean_prob is exact: p(y) = sum_i w_i p_i(y), from each teacher's own log-probability of the
    true token. Other modes need every teacher's full distribution to normalise; from top-k
    labels only, a true token outside the kept k gets an equal share of the tail bucket.
    """
    if mode == "mean_prob":
        w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        return -np.log(np.clip(np.einsum("m,mn->n", w, np.exp(-teacher_nll.astype(np.float64))), 1e-30, None)), None
    k = e_ids.shape[1]
    hit = e_ids == labels[:, None]
    rest = max(vocab_size - k, 1)  # lm.k may equal the vocabulary: then nothing is outside the kept k
    p_true = np.where(hit.any(1), np.exp((e_lps * hit).sum(1)), tail / rest)
    return -np.log(np.clip(p_true, 1e-30, None)), f"top-{k} union + tail bucket, uniform tail over the other V-k tokens"


def lm_rows(test: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The held-out LM rows as teachers take them, and the true next token at every position
    that carries loss (all of a text window's; an instruction row's response tokens)."""
    from .instruct import rows_of, targets

    rows = rows_of(test).astype(np.int64)
    return rows, (rows if rows.ndim == 2 else rows[:, 0])[:, 1:][targets(rows)]


def flat_scores(parts: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A teacher's score() answers for consecutive batches -> ids [N, k], log-probs [N, k], NLL [N]."""
    ids, lps, nll = (np.concatenate([p.reshape(-1) for p in col]) for col in zip(*parts))
    return ids.reshape(-1, k), lps.reshape(-1, k), nll


def student_scores(model, rows: np.ndarray, device: str = "cpu") -> dict:
    """A student's NLL [N] and top-1 [N] at the held-out positions that carry loss, EVAL_BATCH
    rows at a time ([EVAL_BATCH, L, V] logits at most, never the split's), and its latency."""
    from .packing import logits_at, split_rows

    model = model.eval().to(device)

    @torch.inference_mode()
    def logits_of(r: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids, kwargs, chosen = split_rows(torch.from_numpy(r).to(device))
        return logits_at(model, ids, kwargs, chosen).float(), ids[:, 1:][chosen]

    nll, top1 = [], []
    for i in range(0, len(rows), EVAL_BATCH):
        lg, y = logits_of(rows[i:i + EVAL_BATCH])
        nll.append(torch.nn.functional.cross_entropy(lg, y, reduction="none").cpu().numpy())
        top1.append(lg.argmax(-1).cpu().numpy())
    return {"nll": np.concatenate(nll), "top1": np.concatenate(top1), "params": count_params(model),
            "latency_ms": _latency_ms(logits_of, rows)}


def evaluate_lm(labels: np.ndarray, teachers: dict[str, dict], ensemble: dict, students: dict[str, dict], k: int,
                vocab_size: int) -> dict:
    """Held-out perplexities of every teacher, the ensemble and the students over the positions
    that carry loss, from their scores (see `ensemble_true_token_nll` for when the ensemble's
    is exact).

    labels [N]: the true next tokens. teachers: per name (in the store's order) {ids [N, k],
    logprobs [N, k], nll [N], params, latency_ms, backend}. students: per name {nll [N],
    top1 [N], params, latency_ms, loss}.
    """
    from .ensemble import NEEDS_LABELS, ensemble_topk

    models = {n: {"kind": "teacher", "backend": t["backend"], **_lm_scores(t["nll"], t["ids"][:, 0], labels),
                  "params": int(t["params"]), "latency_ms": float(t["latency_ms"])} for n, t in teachers.items()}
    mode = ensemble["mode"] if ensemble["mode"] not in NEEDS_LABELS else "mean_prob"
    weights = [ensemble["weights"][n] for n in teachers]
    nll, top1 = np.empty(len(labels)), np.empty(len(labels), np.int64)
    approximation = None
    # In chunks of positions: the ensemble's temporaries (~6 KB per position at k=32, measured)
    # would otherwise grow the driver with the held-out split; what is kept is 16 B per position.
    for a in range(0, len(labels), ENSEMBLE_CHUNK):
        part = slice(a, a + ENSEMBLE_CHUNK)
        e_ids, e_lps, tail = ensemble_topk(np.stack([t["ids"][part] for t in teachers.values()]),
                                           np.stack([t["logprobs"][part] for t in teachers.values()]), k_out=k,
                                           vocab_size=vocab_size, mode=mode, temperature=1.0, weights=weights,
                                           tau=ensemble["tau"])
        nll[part], approximation = ensemble_true_token_nll(np.stack([t["nll"][part] for t in teachers.values()]),
                                                           np.asarray(weights), mode, e_ids, e_lps, tail, labels[part],
                                                           vocab_size)
        top1[part] = e_ids[:, 0]
    rows = [models[n] for n in teachers]
    models["ensemble"] = {"kind": "ensemble", "mode": mode, **_lm_scores(nll, top1, labels),
                          "params": sum(m["params"] for m in rows), "latency_ms": sum(m["latency_ms"] for m in rows),
                          **({"approximation": approximation} if approximation else {})}
    for name, s in students.items():
        models[name] = {"kind": "student", "loss": s.get("loss"), **_lm_scores(s["nll"], s["top1"], labels),
                        "params": s["params"], "latency_ms": s["latency_ms"],
                        "agreement_with_ensemble": float((s["top1"] == top1).mean())}
    return {"models": models, "test_tokens": int(labels.size), "ensemble_eval_mode": mode}
