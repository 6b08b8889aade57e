"""The prompts `distill generate` answers, and the end tokens its teachers stop at. Pure: no Ray.

prompt_response: the prompt column, tokenized as orchestrator/instruct.py tokenizes a prompt
(with the tokenizer's special tokens); chat: the conversation without its trailing assistant
turn(s), rendered with the chat template and its generation prompt. A prompt's id is a hash of
its content, so it names the same prompt whatever the row order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .config import DistillConfig
from .datasets import _column, _read_file
from .errors import DistillError


@dataclass
class Prompt:
    id: str  # content hash of the prompt (stable across runs and row orders)
    row: int
    ids: list[int]  # what the teacher continues
    value: str | list  # the prompt text, or the prompt's messages


def eos_ids(name: str, path: Path, tokenizer) -> list[int]:
    """The end-of-sequence token(s) a teacher stops at: its generation_config.json, else its
    config.json, else the ensemble tokenizer's; only those inside the ensemble tokenizer, the ids a
    sampler writes (a family's newer version may end with a token the ensemble's lacks). None
    anywhere: refused (it would never stop)."""
    for f in ("generation_config.json", "config.json"):
        try:
            v = json.loads((path / f).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            v = None
        if v is not None and v != []:
            found = [int(v)] if isinstance(v, int) else [int(x) for x in v]
            if inside := [e for e in found if e < len(tokenizer)]:
                return inside
            raise DistillError(f"teacher '{name}': its end-of-sequence ids {found} ({path / f}) lie past the "
                               f"ensemble's tokenizer ({len(tokenizer)} ids), which no sampler writes, so its "
                               "responses could never end; set lm.tokenizer to a tokenizer with those ids")
    if tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)]
    raise DistillError(f"teacher '{name}': no end-of-sequence token (eos_token_id in {path}/generation_config.json or "
                       "config.json, or the tokenizer's eos_token), so its responses could never end; set one")


def load_prompts(cfg: DistillConfig, tokenizer) -> list[Prompt]:
    d, g = cfg.dataset, cfg.generate
    table = _read_file(Path(d.source))
    if d.format == "prompt_response":
        field, values = "prompt", _column(table, d.prompt, "prompt", d.source).to_pylist()[:d.limit]
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                raise DistillError(f"dataset.prompt: row {i} of {d.source} ('{d.prompt}') is empty or not a string; "
                                   "drop such rows first")
        ids = tokenizer(values, add_special_tokens=True)["input_ids"] if values else []
    else:
        field, values = "messages", [_prompt_turns(conv, i, d.source) for i, conv in
                                     enumerate(_column(table, d.messages, "messages", d.source).to_pylist()[:d.limit])]
        if values and not getattr(tokenizer, "chat_template", None):
            raise DistillError("dataset.format: chat needs a tokenizer with a chat template; use format prompt_response")
        texts = [tokenizer.apply_chat_template(v, tokenize=False, add_generation_prompt=True) for v in values]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if not values:
        raise DistillError(f"dataset.source: {d.source} has no prompts to generate for; give it at least one row")
    room = cfg.lm.max_len - g.max_new_tokens
    prompts, seen = [], {}
    for i, (v, p) in enumerate(zip(values, ids)):
        pid = hashlib.sha1(json.dumps(v, sort_keys=True).encode()).hexdigest()[:12]
        seen[pid] = seen.get(pid, 0) + 1
        pid = pid if seen[pid] == 1 else f"{pid}-{seen[pid] - 1}"  # a repeated prompt stays its own
        if len(p) > room:
            raise DistillError(f"dataset.{field}: prompt {pid} (row {i}) is {len(p)} tokens, and with "
                               f"generate.max_new_tokens {g.max_new_tokens} it does not fit lm.max_len {cfg.lm.max_len}; "
                               "shorten or drop it, lower generate.max_new_tokens, or raise lm.max_len")
        prompts.append(Prompt(pid, i, list(p), v))
    return prompts


def _prompt_turns(conv, row: int, source: str) -> list[dict]:
    """A conversation without its trailing assistant turn(s): what the teacher answers."""
    ok = isinstance(conv, list) and conv and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in conv)
    if not ok:
        raise DistillError(f"dataset.messages: row {row} of {source} is not a list of {{role, content}} strings")
    turns = [{"role": m["role"], "content": m["content"]} for m in conv]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns:
        raise DistillError(f"dataset.messages: row {row} of {source} has no turn before its answer to prompt with")
    return turns


def reference_answers(cfg: DistillConfig, prompts: list[Prompt]) -> dict[str, str | list]:
    """generate.include_reference: each prompt's own answer in the dataset, {prompt id: the
    response text (prompt_response), or the whole conversation (chat)}. A prompt without one
    is refused: the option promises every reference pair."""
    d = cfg.dataset
    table = _read_file(Path(d.source))
    name, field = (d.response, "response") if d.format == "prompt_response" else (d.messages, "messages")
    if name not in table.column_names:
        raise DistillError(f"generate.include_reference: {d.source} has no '{name}' column (dataset.{field}) with the "
                           "reference answers; add it or set include_reference false")
    values = _column(table, name, field, d.source).to_pylist()
    out = {}
    for p in prompts:
        v = values[p.row]
        ok = (isinstance(v, str) and v.strip()) if d.format == "prompt_response" else \
            any(m.get("role") == "assistant" and (m.get("content") or "").strip() for m in v)
        if not ok:
            raise DistillError(f"generate.include_reference: row {p.row} of {d.source} has no reference answer "
                               f"(dataset.{field}); drop the row or set include_reference false")
        out[p.id] = v if d.format == "prompt_response" else [{"role": m["role"], "content": m["content"]} for m in v]
    return out


def reference_record(p: Prompt, answer) -> dict:
    """generate.include_reference: the dataset's own answer to a prompt, as a row of generated.parquet."""
    return {"sample_id": f"{p.id}/reference", "prompt_id": p.id, "origin": "reference", "teacher": None,
            "sample_index": None, "response_ids": None, "own_nll_mean": None, "ensemble_nll": None,
            **({"conversation": answer} if isinstance(answer, list) else {"text": answer})}
