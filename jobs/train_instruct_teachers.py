"""Instruction pairs from Python's pydoc topics and two chat teachers fine-tuned on them.

    python -m jobs.train_instruct_teachers [--out artifacts/teachers/instruct] [--force]

The instruction example (examples/lm_instruct.yaml) distils chat teachers into a student made of
the larger teacher's layers; this job makes what it needs locally (no hub access), in about six
minutes on 2 idle CPU cores, three of them for the base teachers:

* the base tokenizer and the ``small`` / ``large`` Llama teachers pretrained on pydoc topic text
  (``jobs.train_lm_teachers.ensure_lm_teachers``, cached under ``artifacts/teachers/lm``);
* ``data/{train,test}.parquet``  columns ``sample_id`` ("topic:i"), ``prompt``, ``response`` and
  ``messages`` (the same pair as ``[{user: prompt}, {assistant: response}]``). A prompt asks about
  a topic (one of a few fixed templates, chosen by a hash of the topic and part), the response
  is a 30-120 word chunk of the topic's text, cut at the end until the pair fits in
  ``MAX_TOKENS`` = 256 tokens (the teachers' ``max_position_embeddings``) in either format. The
  test split is exactly the topics that ``build_corpus`` holds out, so no held-out response was
  seen by a teacher in pretraining or here;
* ``small/`` and ``large/``  each base teacher with ``CHAT_TEMPLATE`` added to the tokenizer (the
  tokenizer files are byte-identical between the two), fine-tuned on the train pairs with loss on
  the assistant tokens only, on the pipeline's own data layout (``orchestrator.instruct``'s
  tokenize / pack, position ids restarting per example). Held-out response perplexity (over the
  same tokens the pipeline's report uses) is measured after reloading from disk;
* ``meta.json``  written last; a re-run is "cached" if its version matches and every file exists.

Importing this module is cheap (no training, no ray, no transformers at import time).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from jobs.train_lm_teachers import DEFAULT_OUT as LM_OUT
from jobs.train_lm_teachers import _files_sha256, _paragraphs, cached_meta, held_out_topics, write_meta

VERSION = 2
DEFAULT_OUT = "artifacts/teachers/instruct"
MAX_TOKENS = 256                 # prompt + response (+ template / specials): the teachers' max positions
RESPONSE_WORDS = (30, 120)       # min / max words per response chunk
TEMPLATES = (
    "What does the Python reference say about {topic}? (part {part} of {parts})",
    "Explain {topic} in Python, part {part} of {parts}.",
    "Tell me about {topic} (section {part}/{parts}).",
    "Describe Python's {topic}: part {part} of {parts}.",
)
# ChatML-like, over the tokenizer's own specials: <s>role\ncontent</s>\n per turn.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# Fine-tuning on the train pairs (both teachers): packed 256-token windows, loss on responses only.
# 600 steps (about 7 epochs of the 669 windows): at 150 the teachers' held-out response perplexity
# (small 30.5, large 19.0) was worse than the 2-layer student's after its 252 steps on the same
# pairs (17.8), so distilling them could not beat the references; at 600: small 23.2, large 13.3.
# Cost: 4x the fine-tuning time (from the 150-step times, about 2.5 min on 2 idle cores instead of
# about 40 s; 286 s measured on one thread of a heavily loaded machine).
FINETUNE = {"small": (1, 600), "large": (2, 600)}  # name: (seed, steps)
BATCH, LR = 8, 1e-3


# ----------------------------------------------------------------------------- pairs
def _response_chunks(text: str) -> list[list[str]]:
    """Word lists of RESPONSE_WORDS[0]..[1] words: paragraphs joined until the minimum, long ones split."""
    lo, hi = RESPONSE_WORDS
    chunks, cur = [], []
    for para in _paragraphs(text):
        cur.extend(para.split())
        while len(cur) >= hi:
            chunks.append(cur[:hi])
            cur = cur[hi:]
        if len(cur) >= lo:
            chunks.append(cur)
            cur = []
    if len(cur) >= lo // 3 and chunks and len(chunks[-1]) + len(cur) <= hi:  # a short tail joins the last
        chunks[-1] = chunks[-1] + cur
    elif len(cur) >= lo or (cur and not chunks):
        chunks.append(cur)
    return chunks


def pair_tokens(tokenizer, prompt: str, response: str) -> int:
    """Tokens of the pair in the longer of its two layouts: prompt_response (<s> prompt response
    </s>) and chat (the template rendered)."""
    plain = len(tokenizer(prompt, verbose=False)["input_ids"]) + len(
        tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]) + 1
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    return max(plain, len(tokenizer(chat, add_special_tokens=False, verbose=False)["input_ids"]))


def build_pairs(tokenizer, max_tokens: int = MAX_TOKENS) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, test) rows of {sample_id, prompt, response, messages}; test = the
    topics build_corpus holds out. ``tokenizer`` needs CHAT_TEMPLATE (see with_chat_template)."""
    from pydoc_data.topics import topics

    test_keys = held_out_topics()
    train, test = [], []
    for key in sorted(topics):
        chunks = _response_chunks(topics[key])
        name = re.sub(r"[-_]+", " ", key)
        for i, words in enumerate(chunks):
            h = int(hashlib.sha256(f"{key}:{i}".encode()).hexdigest(), 16)
            prompt = TEMPLATES[h % len(TEMPLATES)].format(topic=name, part=i + 1, parts=len(chunks))
            n = len(words)
            while n > 1 and pair_tokens(tokenizer, prompt, " ".join(words[:n])) > max_tokens:
                n -= 5 if n > 5 else 1  # cut the response's end until the pair fits
            response = " ".join(words[:n])
            row = {"sample_id": f"{key}:{i}", "prompt": prompt, "response": response,
                   "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
            (test if key in test_keys else train).append(row)
    return train, test


def with_chat_template(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------- fine-tuning
def packed(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pipeline's layout of chat rows: input_ids, position_ids, loss_mask, each [N, MAX_TOKENS]."""
    from orchestrator.instruct import pack_examples, tokenize_examples

    examples = tokenize_examples(tokenizer, [r["messages"] for r in rows], "chat", "tokenizer")
    ids, pos, mask, _ = pack_examples(examples, MAX_TOKENS, tokenizer.pad_token_id)
    return torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask.astype(np.int64))


def response_nll(model, ids, pos, mask, reduction: str = "mean") -> torch.Tensor:
    """Next-token CE at the positions whose next token is a response token (the pipeline's targets)."""
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1].float()
    sel = mask[:, 1:].bool()
    return torch.nn.functional.cross_entropy(logits[sel], ids[:, 1:][sel], reduction=reduction)


@torch.no_grad()
def response_perplexity(model, ids, pos, mask, batch: int = 16) -> float:
    model.eval()
    nll = sum(float(response_nll(model, *t, reduction="sum")) for t in zip(ids.split(batch), pos.split(batch),
                                                                           mask.split(batch)))
    return math.exp(nll / float(mask[:, 1:].sum()))


def finetune(model, ids, pos, mask, *, seed: int, steps: int) -> None:
    """AdamW, 10% warm-up then cosine decay, shuffled windows reshuffled every epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm))))))
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < BATCH:
            order = torch.randperm(len(ids), generator=gen)
        idx, order = order[:BATCH], order[BATCH:]
        loss = response_nll(model, ids[idx], pos[idx], mask[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


# ----------------------------------------------------------------------------- job
def ensure_instruct_teachers(out: str | Path = DEFAULT_OUT, force: bool = False, lm_out: str | Path = LM_OUT) -> dict:
    """Build (or reuse cached) instruction pairs and fine-tuned chat teachers under ``out``; returns meta."""
    out = Path(out)
    meta = None if force else cached_meta(out, VERSION, FINETUNE)
    if meta is not None:
        print(f"cached: instruct teachers in {out} (" + ", ".join(
            f"{n} response ppl={t['held_out_response_ppl']:.2f}" for n, t in meta["teachers"].items()) + ")")
        return meta
    from jobs.train_lm_teachers import ensure_lm_teachers

    base = ensure_lm_teachers(lm_out)
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    lm_out = Path(lm_out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a crash from here on leaves no "cached" marker

    tokenizer = with_chat_template(AutoTokenizer.from_pretrained(str(lm_out / "tokenizer"), local_files_only=True))
    train_rows, test_rows = build_pairs(tokenizer)
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("sample_id", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
                        ("messages", msg)])
    for split, rows in (("train", train_rows), ("test", test_rows)):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "data" / f"{split}.parquet")
    train, test = packed(tokenizer, train_rows), packed(tokenizer, test_rows)
    data = {"train_pairs": len(train_rows), "test_pairs": len(test_rows), "train_windows": len(train[0]),
            "test_windows": len(test[0]), "train_response_tokens": int(train[2][:, 1:].sum()),
            "test_response_tokens": int(test[2][:, 1:].sum()), "max_tokens": MAX_TOKENS,
            "held_out_topics": sorted(held_out_topics())}
    print(f"pairs      train {data['train_pairs']} pairs / {data['train_windows']} windows / "
          f"{data['train_response_tokens']:,} response tokens, test {data['test_pairs']} pairs / "
          f"{data['test_response_tokens']:,} response tokens", flush=True)

    files, teachers, tok_sha = ["data/train.parquet", "data/test.parquet"], {}, None
    for name, (seed, steps) in FINETUNE.items():
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(lm_out / name), local_files_only=True)
        before = response_perplexity(model, *test)
        torch.manual_seed(seed)
        finetune(model, *train, seed=seed, steps=steps)
        secs = time.perf_counter() - t0
        model.save_pretrained(str(out / name))
        tok_names = sorted(Path(f).name for f in tokenizer.save_pretrained(str(out / name)) if Path(f).is_file())
        sha = _files_sha256(out / name, tok_names)
        if tok_sha not in (None, sha):
            raise RuntimeError(f"tokenizer files in {out / name} differ from the other teacher's")
        tok_sha = sha
        reloaded = AutoModelForCausalLM.from_pretrained(str(out / name), local_files_only=True)
        ppl = response_perplexity(reloaded, *test)
        teachers[name] = {"dir": name, "base": str(lm_out / name), "seed": seed, "steps": steps, "batch": BATCH,
                          "lr": LR, "train_seconds": round(secs, 1), "base_held_out_ppl":
                          base["teachers"][name]["held_out_ppl"], "held_out_response_ppl_before": round(before, 3),
                          "held_out_response_ppl": round(ppl, 3)}
        files += [f"{name}/config.json", f"{name}/model.safetensors"] + [f"{name}/{n}" for n in tok_names]
        print(f"teacher {name:<5} steps={steps}  fine-tune={secs:5.1f}s  held-out response ppl "
              f"{before:.2f} -> {ppl:.2f}", flush=True)

    meta = {"version": VERSION, "source": "pydoc_data.topics", "data": data, "chat_template": CHAT_TEMPLATE,
            "tokenizer_sha256": tok_sha, "teachers": teachers, "files": files}
    return write_meta(out, meta)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild the pairs and fine-tuned teachers")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ensure_instruct_teachers(args.out, force=args.force)
    print(f"done in {time.perf_counter() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
