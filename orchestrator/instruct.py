"""Instruction data (task lm, dataset.format prompt_response | chat) -> packed windows with a
loss mask. Pure pyarrow / numpy (+ the tokenizer): no Ray.

Per example: the token ids and a mask of the tokens that carry loss (the response, or every
assistant turn, including its end-of-turn / EOS token so the student learns to stop).
- prompt_response: tokenizer(prompt) (with the tokenizer's special tokens, e.g. BOS) then
  tokenizer(response) and EOS; prompt and response are tokenized apart, as TRL does.
- chat: the conversation rendered with the tokenizer's chat template; an assistant turn's span
  is the text between the template rendered up to the turn's generation prompt and rendered
  through the turn, so any template works whose renderings of a conversation's prefixes are
  prefixes of the whole. A template that renders earlier turns differently once later ones
  follow (Qwen3's drops an answer's reasoning after the next user turn) still locates the last
  assistant turn: the earlier ones it cannot locate stay as context without loss, counted in one
  log line; a conversation whose last assistant turn cannot be located is refused by name.
Truncation: an example longer than lm.max_len keeps its first max_len tokens (its end is cut),
so the prompt stays whole and the response is cut short; one left without a loss token (its
prompt alone fills the window) is dropped and counted.
Packing: examples are laid into windows of max_len in dataset order, a window closed (and
padded) when the next example does not fit, so no example is ever split across windows. Position
ids restart at 0 for each example: transformers' models then attend within an example only
(its masking utilities find packed sequences from the position ids; models.check_packing proves
it per model), and each example is scored exactly as if it were alone. lm.packing false: one
example per window. Padding is its own segment and never carries loss.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .datasets import _column, _read_file
from .errors import DistillError


def load_examples(source: str, fmt: str, prompt: str = "prompt", response: str = "response",
                  messages: str = "messages", limit: int | None = None) -> list:
    """Rows of a local .parquet / .csv file: (prompt, response) pairs, or message lists."""
    table = _read_file(Path(source))
    if fmt == "prompt_response":
        cols = [_column(table, prompt, "prompt", source).to_pylist()[:limit],
                _column(table, response, "response", source).to_pylist()[:limit]]
        for field, name, values in (("prompt", prompt, cols[0]), ("response", response, cols[1])):
            for i, v in enumerate(values):
                if not isinstance(v, str) or not v.strip():
                    raise DistillError(f"dataset.{field}: row {i} of {source} ('{name}') is empty or not a string; "
                                       "drop such rows first")
        rows = list(zip(*cols))
    else:
        rows = _column(table, messages, "messages", source).to_pylist()[:limit]
        for i, conv in enumerate(rows):
            ok = isinstance(conv, list) and conv and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in conv)
            if not ok:
                raise DistillError(f"dataset.messages: row {i} of {source} is not a list of {{role, content}} strings")
            if not any(m["role"] == "assistant" for m in conv):
                raise DistillError(f"dataset.messages: row {i} of {source} has no assistant turn to learn from")
    if not rows:
        raise DistillError(f"dataset.source: {source} has no rows")
    return rows


def tokenize_examples(tokenizer, rows: list, fmt: str, tok_dir: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per example: (token ids int64 [n], loss mask uint8 [n])."""
    if fmt == "prompt_response":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DistillError(f"lm.tokenizer: {tok_dir} defines no eos token to end each response with")
        prompts = tokenizer([p for p, _ in rows], add_special_tokens=True)["input_ids"]
        responses = tokenizer([r for _, r in rows], add_special_tokens=False)["input_ids"]
        return [(np.array([*p, *r, eos], np.int64), np.array([0] * len(p) + [1] * (len(r) + 1), np.uint8))
                for p, r in zip(prompts, responses)]
    out = [_chat_example(tokenizer, conv, tok_dir, i) for i, conv in enumerate(rows)]
    if skipped := sum(n for _, _, n in out):
        logging.getLogger("distill").info(
            "prepare: %d earlier assistant turns in %d conversations carry no loss: the chat template of %s renders "
            "them differently once later turns follow (e.g. without their reasoning), so only what the whole "
            "conversation shows is learned: each conversation's last assistant turn", skipped,
            sum(1 for _, _, n in out if n), tok_dir)
    return [(ids, mask) for ids, mask, _ in out]


def _chat_example(tokenizer, conv: list[dict], tok_dir: str, row: int) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (token ids, loss mask, earlier assistant turns not located)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(f"dataset.format: chat needs a chat template, and the tokenizer in {tok_dir} has none; "
                           "use format prompt_response, or a tokenizer with a chat_template")
    if not getattr(tokenizer, "is_fast", False):
        raise DistillError(f"dataset.format: chat needs a fast tokenizer (tokenizer.json) in {tok_dir} "
                           "to map assistant text to tokens")

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text, spans, skipped = render(conv, False), [], 0
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        before, through = render(conv[:i], True), render(conv[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            if i < last:  # rendered otherwise inside the whole: context only
                skipped += 1
                continue
            raise DistillError(f"dataset.messages: row {row}: the chat template of {tok_dir} renders a conversation's "
                               "first turns differently from the whole, so assistant turns cannot be located")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.array([s for s, _ in enc["offset_mapping"]])
    mask = np.zeros(len(starts), np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    return np.array(enc["input_ids"], np.int64), mask, skipped


@dataclass
class PackStats:
    examples: int = 0
    truncated: int = 0  # cut to max_len
    dropped: int = 0  # no loss token left within max_len
    windows: int = 0
    tokens: int = 0  # non-padding tokens
    loss_tokens: int = 0

    def line(self, max_len: int) -> str:
        fill = self.tokens / max(self.windows * max_len, 1)
        return (f"{self.examples} examples -> {self.windows} windows ({fill:.0%} filled), "
                f"{self.loss_tokens} loss tokens; {self.truncated} truncated to lm.max_len, {self.dropped} dropped")


def pack_examples(examples: list[tuple[np.ndarray, np.ndarray]], max_len: int, pad_id: int,
                  packing: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, PackStats]:
    """-> input_ids, position_ids, loss_mask, each [windows, max_len], and the counts."""
    stats, windows, current, used = PackStats(), [], [], 0
    for ids, mask in examples:
        stats.examples += 1
        if len(ids) > max_len:
            stats.truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        mask = mask.copy()
        mask[0] = 0  # an example's first token is predicted by nothing of its own
        if not mask.any():
            stats.dropped += 1
            continue
        if current and (not packing or used + len(ids) > max_len):
            windows.append(current)
            current, used = [], 0
        current.append((ids, mask))
        used += len(ids)
        stats.tokens += len(ids)
        stats.loss_tokens += int(mask.sum())
    if current:
        windows.append(current)
    if not windows:
        raise DistillError(f"lm.max_len: no example keeps a response token within {max_len} tokens; "
                           "raise lm.max_len or shorten the prompts")
    out = np.full((3, len(windows), max_len), 0, np.int64)
    out[0] = pad_id
    for w, parts in enumerate(windows):
        at = 0
        for ids, mask in parts:
            n = len(ids)
            out[0, w, at:at + n], out[1, w, at:at + n], out[2, w, at:at + n] = ids, np.arange(n), mask
            at += n
        out[1, w, at:] = np.arange(max_len - at)  # padding: a segment of its own
    stats.windows = len(windows)
    return out[0], out[1], out[2].astype(np.uint8), stats


def example_table(input_ids: np.ndarray, position_ids: np.ndarray, loss_mask: np.ndarray) -> pa.Table:
    """Canonical packed LM rows: sample_id (content hash), input_ids, position_ids, loss_mask."""
    ids, seen = [], {}
    for row in zip(input_ids, position_ids, loss_mask):
        h = hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in row)).hexdigest()[:16]
        seen[h] = seen.get(h, 0) + 1
        ids.append(h if seen[h] == 1 else f"{h}#{seen[h] - 1}")  # a repeated window stays unique

    def col(a, t):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), t), a.shape[1])

    return pa.table({"sample_id": pa.array(ids, pa.string()), "input_ids": col(input_ids, pa.int32()),
                     "position_ids": col(position_ids, pa.int32()), "loss_mask": col(loss_mask, pa.uint8())})


def is_packed(table_or_columns) -> bool:
    names = table_or_columns.column_names if hasattr(table_or_columns, "column_names") else table_or_columns
    return "loss_mask" in names


def rows_of(table: pa.Table) -> np.ndarray:
    """What an LM teacher is sent: windows [B, L] (format text), or [B, 3, L] (ids, position
    ids, loss mask) for packed instruction rows."""
    from .columns import to_numpy

    ids = to_numpy(table.column("input_ids"))
    if not is_packed(table):
        return ids
    return np.stack([ids, to_numpy(table.column("position_ids")), to_numpy(table.column("loss_mask"))], axis=1)


def targets(rows: np.ndarray) -> np.ndarray:
    """bool [B, L-1]: prediction position p carries loss (token p+1 is a response token).
    Windows without a mask (format text): every position."""
    if rows.ndim == 2:
        return np.ones((rows.shape[0], rows.shape[1] - 1), bool)
    return rows[:, 2, 1:].astype(bool)
