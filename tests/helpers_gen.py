"""Tiny causal-LM teachers that answer the instruction prompts of tests/helpers_lm.py and then
stop (an end-of-sequence token after each response), for `distill generate` tests, in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers_lm import corpus, instruct_rows, make_tokenizer, write_instruct_files


def _instruct_lm(out: Path, tok, rows: list[dict], hidden: int, layers: int, seed: int, steps: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    seqs = [tok(r["prompt"])["input_ids"] + tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


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
