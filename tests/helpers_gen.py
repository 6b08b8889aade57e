"""Tiny causal-LM teachers that answer the instruction prompts of tests/helpers_lm.py and then
stop (an end-of-sequence token after each response), for `distill generate` tests, in seconds."""
from __future__ import annotations

import json
from pathlib import Path

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
