"""`teacher_nll_of_samples`: how the teacher ensemble judges what a student *writes*.

A student answers the held-out prompts itself (greedy by default, or fixed-seed samples at
eval.sample_temperature), up to eval.sample_max_new_tokens; every teacher scores each answer
through its Serve deployment's `score` (the same call that scores the held-out split), and the
per-token scores are ensembled as the evaluation ensembles the held-out ones
(orchestrator/evaluate.py ensemble_true_token_nll: exact for mean_prob). The metric is the
ensemble's NLL per generated token, the end token included when one ended the answer: low when
the teachers would have written what the student wrote. Reference perplexity says how well the
student predicts the given answers; this says how good its own answers are to the teachers
(the on-policy quantity of GKD / MiniLLM).

Pure parts (no Ray): `held_out_prompts`, `budgets`, `ensemble_nll_per_token`.
Ray parts: `student_samples` (a Ray task, like evaluation.score_student), `score_samples`
(Serve handles), `nll_of_answers` (the two after sampling), and `teacher_nll_of_samples` /
`for_students`, what evaluation calls (for_students: every student's answers before the teachers
are deployed).
The driver holds the prompts' and answers' token ids and per-token [N, k] scores only.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("distill")
GEN_BATCH = 16  # held-out prompts a student answers per decode loop


# ---- pure -----------------------------------------------------------------------------------------


def held_out_prompts(rows: np.ndarray) -> list[list[int]]:
    """Packed instruction rows [B, 3, L] (ids, position ids, loss mask; orchestrator/instruct.py)
    -> each example's prompt, in row order: its tokens before its first loss token (for chat,
    the conversation up to the first assistant turn, generation prompt included). Examples
    start where the position ids restart at 0; padding is a segment without loss tokens."""
    prompts = []
    for ids, pos, mask in rows:
        starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            loss = np.flatnonzero(mask[a:b])
            if len(loss):
                prompts.append(ids[a:a + loss[0]].tolist())
    return prompts


def budgets(prompts: list[list[int]], max_new_tokens: int, max_len: int) -> list[int]:
    """New tokens each prompt may get: max_new_tokens, cut so prompt + answer fits lm.max_len."""
    return [max(0, min(max_new_tokens, max_len - len(p))) for p in prompts]


def ensemble_nll_per_token(teachers: list[dict], weights, mode: str, tau: float, labels: np.ndarray, k: int,
                           vocab_size: int, chunk: int = 8192) -> tuple[np.ndarray, str | None]:
    """teachers: per teacher (store order) {ids [N, k], logprobs [N, k], nll [N]} at the N scored
    positions; labels [N]: the tokens written there -> (the ensemble's NLL of each [N], how it
    was computed: None when exact). Modes that need true labels are scored as mean_prob, as
    the held-out evaluation scores them."""
    from .ensemble import NEEDS_LABELS, ensemble_topk
    from .evaluate import ensemble_true_token_nll

    mode = mode if mode not in NEEDS_LABELS else "mean_prob"
    nll, how = np.empty(len(labels)), None
    for a in range(0, len(labels), chunk):  # bounded temporaries, as evaluate_lm does
        part = slice(a, a + chunk)
        e_ids = e_lps = tail = None
        if mode != "mean_prob":  # mean_prob is exact from the teachers' own true-token NLLs
            e_ids, e_lps, tail = ensemble_topk(np.stack([t["ids"][part] for t in teachers]),
                                               np.stack([t["logprobs"][part] for t in teachers]), k_out=k,
                                               vocab_size=vocab_size, mode=mode, temperature=1.0, weights=weights,
                                               tau=tau)
        nll[part], how = ensemble_true_token_nll(np.stack([t["nll"][part] for t in teachers]), np.asarray(weights),
                                                 mode, e_ids, e_lps, tail, labels[part], vocab_size)
    return nll, how


# ---- Ray: the student writes, the teachers score ----------------------------------------------------


def student_samples(state_or_model, prompts: list[list[int]], limits: list[int], *, eos_ids: list[int], pad_id: int,
                    temperature: float = 0.0, seed: int = 0, use_gpu: bool = False,
                    vocab_limit: int | None = None) -> list[dict]:
    """A student's answers to `prompts` (a training state {spec, model}, or a loaded causal LM),
    each cut at its limit: [{tokens [T] int32, finished}], in a Ray task. vocab_limit: the
    tokenizer's token count (generation.sample: no padding row is written)."""
    import ray

    from .session import reraise_user_error

    task = ray.remote(_sample_task).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    try:
        return ray.get(task.remote(state_or_model, prompts, limits, eos_ids, pad_id, temperature, seed, vocab_limit))
    except Exception as e:  # noqa: BLE001
        reraise_user_error(e)


def _sample_task(state_or_model, prompts, limits, eos_ids, pad_id, temperature, seed, vocab_limit=None) -> list[dict]:
    import torch

    from .generate import sample_seed
    from .generation import sample

    torch.set_num_threads(1)
    model = state_or_model
    if isinstance(model, dict):
        from .students import from_state

        model = from_state({k: v for k, v in model["spec"].items() if k != "arch"}, model["model"])
    model = model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for a in range(0, len(prompts), GEN_BATCH):
        batch, lim = prompts[a:a + GEN_BATCH], limits[a:a + GEN_BATCH]
        seeds = [[sample_seed(seed, str(a + i), "student", 0)] for i in range(len(batch))]
        got = sample(model, batch, seeds, temperature=temperature, top_p=1.0, max_new_tokens=max(lim), eos_ids=eos_ids,
                     k=1, pad_id=pad_id, vocab_limit=vocab_limit)
        for (s,), n in zip(got, lim):  # a prompt with less room stops at its own limit
            out.append({"tokens": s["tokens"][:n], "finished": s["finished"] and len(s["tokens"]) <= n})
    return out


def score_samples(handles: dict, prompts: list[list[int]], samples: list[dict], pad_id: int, k: int,
                  batch: int = 8, in_flight: int = 4) -> dict[str, dict]:
    """Every teacher's `score` of every written token: {teacher: {ids [N, k], logprobs [N, k], nll [N]}}
    with N = all answers' tokens, answer after answer (the order of `labels_of`)."""
    from .evaluate import flat_scores
    from .generate import _score_rows

    seqs = [(p + s["tokens"].tolist(), len(p)) for p, s in zip(prompts, samples) if len(s["tokens"])]
    if not seqs:  # nothing written (every budget 0): nothing to score
        return {n: {"ids": np.zeros((0, k), np.int64), "logprobs": np.zeros((0, k)), "nll": np.zeros(0)} for n in handles}
    out = {}
    for name, handle in handles.items():
        parts, pending = [], []
        for a in range(0, len(seqs), batch):
            part = seqs[a:a + batch]
            pending.append(handle.score.remote(_score_rows([s for s, _ in part], [n for _, n in part], pad_id)))
            if len(pending) >= in_flight:
                parts.append(pending.pop(0).result())
        parts += [r.result() for r in pending]
        ids, lps, nll = flat_scores(parts, k)
        out[name] = {"ids": ids, "logprobs": lps, "nll": nll}
    return out


def labels_of(samples: list[dict]) -> np.ndarray:
    """The written tokens, answer after answer: what `score_samples` scored, in its order."""
    toks = [s["tokens"] for s in samples if len(s["tokens"])]
    return np.concatenate(toks).astype(np.int64) if toks else np.zeros(0, np.int64)


def teacher_nll_of_samples(state_or_model, prompts: list[list[int]], handles: dict, *, ensemble: dict, k: int,
                           vocab_size: int, max_new_tokens: int, max_len: int, eos_ids: list[int], pad_id: int,
                           temperature: float = 0.0, seed: int = 0, use_gpu: bool = False,
                           vocab_limit: int | None = None) -> dict:
    """One student (a training state, or a loaded causal LM) against the teachers behind
    `handles` ({teacher: Serve handle}, in the store's order): it answers `prompts`, the
    teachers score the answers, the ensemble's NLL per written token. Callable during training
    too (an on-policy run holds its teachers' handles already)."""
    limits = budgets(prompts, max_new_tokens, max_len)
    samples = student_samples(state_or_model, prompts, limits, eos_ids=eos_ids, pad_id=pad_id,
                              temperature=temperature, seed=seed, use_gpu=use_gpu, vocab_limit=vocab_limit)
    return nll_of_answers(samples, prompts, handles, ensemble=ensemble, k=k, vocab_size=vocab_size, pad_id=pad_id,
                          max_new_tokens=max_new_tokens, temperature=temperature)


def nll_of_answers(samples: list[dict], prompts: list[list[int]], handles: dict, *, ensemble: dict, k: int,
                   vocab_size: int, pad_id: int, max_new_tokens: int, temperature: float) -> dict:
    """A student's answers (student_samples) scored by the teachers behind `handles`: the
    ensemble's NLL per written token, and the answers' lengths."""
    labels = labels_of(samples)
    scores = score_samples(handles, prompts, samples, pad_id, k)
    nll, how = ensemble_nll_per_token([scores[n] for n in handles], [ensemble["weights"][n] for n in handles],
                                      ensemble["mode"], ensemble["tau"], labels, k, vocab_size)
    lengths = [len(s["tokens"]) for s in samples]
    return {"teacher_nll_of_samples": float(nll.mean()) if len(nll) else float("nan"),
            "samples": {"prompts": len(prompts), "tokens": int(len(labels)), "mean_length": float(np.mean(lengths)),
                        "finished": float(np.mean([s["finished"] for s in samples])),
                        "max_new_tokens": max_new_tokens, "temperature": temperature,
                        **({"approximation": how} if how else {})}}


def for_students(cfg, prep, states: dict[str, dict], vocab_size: int) -> dict[str, dict]:
    """evaluation's hook: every student's teacher_nll_of_samples on the held-out prompts, the
    teachers deployed for it, or reused from an earlier stage (orchestrator/teacher_pool.py;
    attached ones used and left running), and shut down after unless a hold keeps them."""
    from pathlib import Path

    from ray import serve

    from actors import teacher as serve_teachers

    from . import teacher_pool
    from .evaluate import lm_rows
    from .models import load_tokenizer
    from .prompts import eos_ids
    from .session import reraise_user_error

    rows = lm_rows(prep.test)[0]
    if rows.ndim != 3:  # format text: windows without prompts
        log.info("evaluate: teacher_nll_of_samples needs prompts (format prompt_response or chat); skipped")
        return {}
    prompts = held_out_prompts(rows)
    tokenizer = load_tokenizer(prep.tokenizer)
    eos = sorted({e for t in cfg.teachers for e in eos_ids(t.name, Path(t.path), tokenizer)})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    e = cfg.eval
    # Every student answers first, in its own task, before this deploys any teacher: a cluster the
    # teachers fill (their GPUs, or all the CPUs) has no room for a student task beside them.
    limits = budgets(prompts, e.sample_max_new_tokens, cfg.lm.max_len)
    answers = {}
    for name, state in states.items():
        answers[name] = student_samples(state, prompts, limits, eos_ids=eos, pad_id=pad, temperature=e.sample_temperature,
                                        seed=e.sample_seed, use_gpu=cfg.train.use_gpu, vocab_limit=len(tokenizer))
    teachers = sorted((t.model_dump() for t in cfg.teachers), key=lambda t: t["name"])
    apps = serve_teachers.attach([t for t in teachers if t["serve_app"]])
    owned = teacher_pool.deploy(cfg.run.name, [t for t in teachers if not t["serve_app"]], cfg.task, cfg.lm.k)
    try:
        handles = {t["name"]: serve.get_app_handle({**apps, **owned}[t["name"]]) for t in teachers}
        out = {}
        for name, samples in answers.items():
            try:
                out[name] = nll_of_answers(samples, prompts, handles, ensemble=prep.ensemble, k=cfg.lm.k,
                                           vocab_size=vocab_size, pad_id=pad, max_new_tokens=e.sample_max_new_tokens,
                                           temperature=e.sample_temperature)
            except Exception as err:  # noqa: BLE001
                reraise_user_error(err)
            log.info("evaluate: '%s' answered %d held-out prompts (%d tokens); teacher NLL per token %.3f",
                     name, len(prompts), out[name]["samples"]["tokens"], out[name]["teacher_nll_of_samples"])
        return out
    finally:
        teacher_pool.release(owned)
