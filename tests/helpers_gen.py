"""Tiny causal-LM teachers that answer the instruction prompts of tests/helpers_lm.py and then
stop (an end-of-sequence token after each response), for `distill generate` tests, in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from tests.helpers_lm import corpus, fit_and_save, instruct_rows, make_tokenizer, tiny_llama, write_instruct_files


def _instruct_lm(out: Path, tok, rows: list[dict], hidden: int, layers: int, seed: int, steps: int) -> Path:
    model = tiny_llama(tok, hidden, layers, seed)
    seqs = [tok(r["prompt"])["input_ids"] + tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
    return fit_and_save(model, tok, out, ((ids, labels) for _ in range(steps)), lr=1e-2)


def make_gen_setup(root: Path, steps: int = 60) -> dict:
    """Tokenizer, two instruction teachers (different sizes), a student config, and the
    instruction train / test files (prompt, response, messages)."""
    tok = make_tokenizer(root / "tokenizer", corpus())
    rows = instruct_rows()
    teachers = {"small": _instruct_lm(root / "small", tok, rows, 32, 1, seed=1, steps=steps),
                "large": _instruct_lm(root / "large", tok, rows, 48, 2, seed=2, steps=steps)}
    student = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
    (root / "student.json").write_text(json.dumps(student))
    train, test = write_instruct_files(root)
    return {"teachers": teachers, "student_config": root / "student.json", "tokenizer": root / "tokenizer",
            "train": train, "test": test}


def written_samples(out: Path) -> dict[str, dict]:
    """Every sample a `distill generate` run wrote under `out`, by sample_id; fails if one is there
    twice (exactly-once per (prompt, teacher, sample index))."""
    rows = [r for p in sorted((out / "parts").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a (prompt, teacher, sample) written twice"
    return {r["sample_id"]: r for r in rows}


def sample_nll_in_process(c, name: str, mode: str = "mean_prob", tau: float = 1.0) -> float:
    """teacher_nll_of_samples without Ray or Serve, for a run `c` (format prompt_response): the saved
    student answers each held-out prompt greedily (generation.sample), each teacher scores the
    answer in-process; mean_prob: the mixture by the weights, computed here; another mode: the
    teachers' top-k ensembled with the tail bucket (sample_eval.ensemble_nll_per_token)."""
    from orchestrator.generation import sample
    from orchestrator.models import load_teacher, load_tokenizer
    from orchestrator.sample_eval import ensemble_nll_per_token
    from orchestrator.students import from_state

    tok = load_tokenizer(c.teachers[0].path)
    state = torch.load(c.run_dir / "students" / f"{name}.pt", map_location="cpu", weights_only=False)
    model = from_state({k: v for k, v in state["spec"].items() if k != "arch"}, state["model"])
    prompts = tok(pq.read_table(c.dataset.test_source).column("prompt").to_pylist(), add_special_tokens=True)["input_ids"]
    teachers = {t.name: (load_teacher(t.model_dump(), "lm", c.lm.k), t.weight) for t in c.teachers}
    scores, labels = {n: [] for n in teachers}, []  # per teacher, per answer: (ids [T, k], logprobs [T, k], nll [T])
    for p in prompts:
        (s,), = sample(model, [p], [[0]], temperature=0.0, top_p=1.0,
                       max_new_tokens=min(c.eval.sample_max_new_tokens, c.lm.max_len - len(p)),
                       eos_ids=[tok.eos_token_id], k=1, pad_id=tok.pad_token_id)
        seq = p + s["tokens"].tolist()
        rows = np.zeros((1, 3, len(seq)), np.int64)
        rows[0, 0], rows[0, 1], rows[0, 2, len(p):] = seq, np.arange(len(seq)), 1
        for n, (t, _) in teachers.items():
            scores[n].append(t.score(rows))
        labels.append(s["tokens"])
    per = {n: [np.concatenate([a.reshape(-1, c.lm.k) for a, _, _ in parts]),
               np.concatenate([b.reshape(-1, c.lm.k) for _, b, _ in parts]),
               np.concatenate([x.reshape(-1) for _, _, x in parts])] for n, parts in scores.items()}
    weights = np.array([w for _, w in teachers.values()], np.float64)
    if mode == "mean_prob":
        mix = sum(w * np.exp(-per[n][2].astype(np.float64)) for n, w in zip(teachers, weights))
        nll = -np.log(mix / weights.sum())
    else:
        vocab = next(iter(teachers.values()))[0].vocab_size
        nll, _ = ensemble_nll_per_token([{"ids": i, "logprobs": lp, "nll": x} for i, lp, x in per.values()],
                                        weights, mode, tau, np.concatenate(labels).astype(np.int64), c.lm.k, vocab)
    assert len(nll) == sum(len(x) for x in labels)
    return float(nll.mean())
