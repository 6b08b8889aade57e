"""Build a tiny English corpus, a BPE tokenizer and two causal-LM teachers for LM distillation.

    python -m jobs.train_lm_teachers [--out artifacts/teachers/lm] [--force]

The LM example distils causal-LM teachers that share one vocabulary into a smaller LM; this job
makes everything it needs locally (no hub access) in about three minutes on 2 CPU cores:

* ``corpus/{train,test}.parquet``  columns ``sample_id`` ("topic:i") and ``text`` (50-200 words),
  from Python's bundled help texts (``pydoc_data.topics``). Topics ordered by sha256 of their key
  are held out whole until 10% of all words (no paragraph of a test topic leaks into training).
* ``tokenizer/``  one byte-level BPE tokenizer (vocab 2048) trained on the train split only,
  saved as a ``PreTrainedTokenizerFast``; it prepends ``<s>`` like Llama's tokenizer does.
* ``small/`` and ``large/``  ``LlamaForCausalLM`` teachers (seeds 1 and 2), each a complete
  ``from_pretrained`` folder with byte-identical tokenizer files (the pipeline checks the hash),
  trained on packed 128-token windows of ``<s> text </s>``; held-out perplexity is measured
  after reloading from disk, on packed windows of the test split.
* ``student_config.json``  a suggested ``LlamaConfig`` for the student (smaller than ``small``).
* ``meta.json``  written last; a re-run is "cached" if its version matches and every file exists.

Importing this module is cheap (no training, no ray, no transformers at import time).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from pathlib import Path

import torch

VERSION = 1
DEFAULT_OUT = "artifacts/teachers/lm"
TEST_WORD_FRACTION = 0.10
CHUNK_WORDS = (50, 200)          # min / max words per corpus chunk
VOCAB_SIZE = 2048
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
SEQ_LEN = 128
BATCH, LR = 16, 3e-3             # windows per step, peak learning rate (both teachers)
# name: (seed, train steps, LlamaConfig sizes). At Llama's default init (0.02) the 4-layer model sat on
# the unigram plateau far longer than the 2-layer one (held-out ppl worse than `small`); 0.05 fixes it.
TEACHERS = {
    "small": (1, 400, dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)),
    "large": (2, 500, dict(hidden_size=160, num_hidden_layers=4, num_attention_heads=4, intermediate_size=448,
                           initializer_range=0.05)),
}
STUDENT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160)


# ----------------------------------------------------------------------------- corpus
def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, whitespace-normalised, without underlines or tiny ones."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [" ".join(ln.split()) for ln in block.splitlines()]
        para = " ".join(ln for ln in lines if ln and not re.fullmatch(r"(.)\1{2,}", ln))  # drop "*****" rules
        if len(para.split()) >= 4:
            out.append(para)
    return out


def _chunks(text: str) -> list[str]:
    """Concatenate paragraphs until CHUNK_WORDS[0] words; split anything over CHUNK_WORDS[1]."""
    lo, hi = CHUNK_WORDS
    chunks, cur = [], []
    for para in _paragraphs(text):
        cur.extend(para.split())
        while len(cur) >= hi:
            chunks.append(" ".join(cur[:hi]))
            cur = cur[hi:]
        if len(cur) >= lo:
            chunks.append(" ".join(cur))
            cur = []
    if cur and chunks and len(chunks[-1].split()) + len(cur) <= hi:  # short tail: onto the last chunk
        chunks[-1] += " " + " ".join(cur)
    elif len(cur) >= 10:
        chunks.append(" ".join(cur))
    return chunks


def held_out_topics() -> set[str]:
    """The pydoc topics held out whole: in sha256 order of their key, until 10% of all words."""
    from pydoc_data.topics import topics

    total = sum(len(t.split()) for t in topics.values())
    test_keys, words = set(), 0
    for k in sorted(topics, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if words >= TEST_WORD_FRACTION * total:
            break
        test_keys.add(k)
        words += len(topics[k].split())
    return test_keys


def build_corpus() -> tuple[list[dict], list[dict]]:
    """Deterministic (train_rows, test_rows) of {"sample_id", "text"} from pydoc_data.topics."""
    from pydoc_data.topics import topics

    keys, test_keys = sorted(topics), held_out_topics()
    train, test = [], []
    for k in keys:
        rows = [{"sample_id": f"{k}:{i}", "text": t} for i, t in enumerate(_chunks(topics[k]))]
        (test if k in test_keys else train).extend(rows)
    return train, test


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str]):
    """Byte-level BPE on ``texts``, wrapped as a PreTrainedTokenizerFast that prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=256)


def _files_sha256(folder: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()


def _pack(tokenizer, texts: list[str]) -> torch.Tensor:
    """<s> text </s> for every text, concatenated and cut into [N, SEQ_LEN] windows (tail dropped)."""
    ids = []
    for enc in tokenizer(texts, verbose=False)["input_ids"]:  # each starts with <s>; longer than 256 is fine
        ids.extend(enc + [tokenizer.eos_token_id])
    n = len(ids) // SEQ_LEN
    return torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)


# ----------------------------------------------------------------------------- teachers
def llama_config(tokenizer, **sizes):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **sizes)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 32) -> float:
    """Token-level perplexity over packed windows (every token but each window's first is predicted)."""
    model.eval()
    nll = 0.0
    for x in windows.split(batch):
        logits = model(input_ids=x).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum"))
    return math.exp(nll / windows[:, 1:].numel())


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Baseline: add-one smoothed unigram distribution of the train tokens, scored on the test tokens."""
    counts = torch.bincount(train.flatten(), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[test[:, 1:].flatten()].mean()))


def train_teacher(model, windows: torch.Tensor, *, seed: int, steps: int, batch: int, lr: float) -> None:
    """AdamW, linear warm-up (5%) then cosine decay; shuffled windows, reshuffled every epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm))))))
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(len(windows), generator=gen)
        idx, order = order[:batch], order[batch:]
        loss = model(input_ids=windows[idx], labels=windows[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


# ----------------------------------------------------------------------------- job
def cached_meta(out: Path, version: int, teachers) -> dict | None:
    """out/meta.json if it is of `version`, names these `teachers` and every file it lists exists."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    ok = meta.get("version") == version and set(meta.get("teachers", {})) == set(teachers) \
        and meta.get("files") and all((out / f).is_file() for f in meta["files"])
    return meta if ok else None


def write_meta(out: Path, meta: dict) -> dict:
    """Written last and atomically: a run killed before it leaves no meta.json, so it re-runs."""
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / "meta.json")
    return meta


def ensure_lm_teachers(out: str | Path = DEFAULT_OUT, force: bool = False) -> dict:
    """Build (or reuse cached) corpus, tokenizer, small/large LM teachers under ``out``; returns meta."""
    out = Path(out)
    meta = None if force else cached_meta(out, VERSION, TEACHERS)
    if meta is not None:
        print(f"cached: LM teachers in {out} (" + ", ".join(
            f"{n} ppl={t['held_out_ppl']:.2f}" for n, t in meta["teachers"].items()) + ")")
        return meta
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a crash from here on leaves no "cached" marker

    train_rows, test_rows = build_corpus()
    schema = pa.schema([("sample_id", pa.string()), ("text", pa.string())])
    for split, rows in (("train", train_rows), ("test", test_rows)):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "corpus" / f"{split}.parquet")
    train_texts, test_texts = [r["text"] for r in train_rows], [r["text"] for r in test_rows]

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts)
    tok_files = sorted(tokenizer.save_pretrained(str(out / "tokenizer")))
    tok_names = [Path(f).name for f in tok_files if Path(f).is_file()]
    tok_sha = _files_sha256(out / "tokenizer", tok_names)
    train_win, test_win = _pack(tokenizer, train_texts), _pack(tokenizer, test_texts)
    corpus = {"train_chunks": len(train_rows), "test_chunks": len(test_rows), "train_tokens": train_win.numel(),
              "test_tokens": test_win.numel(), "seq_len": SEQ_LEN}
    print(f"corpus     train {corpus['train_chunks']} chunks / {corpus['train_tokens']:,} tokens, "
          f"test {corpus['test_chunks']} chunks / {corpus['test_tokens']:,} tokens", flush=True)
    unigram = unigram_perplexity(train_win, test_win, len(tokenizer))
    print(f"tokenizer  byte-level BPE vocab={len(tokenizer)} sha256={tok_sha[:12]} "
          f"({time.perf_counter() - t0:.1f}s); unigram held-out ppl={unigram:.1f}", flush=True)

    files = ["corpus/train.parquet", "corpus/test.parquet"] + [f"tokenizer/{n}" for n in tok_names]
    teachers = {}
    for name, (seed, steps, sizes) in TEACHERS.items():
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(tokenizer, **sizes))
        train_teacher(model, train_win, seed=seed, steps=steps, batch=BATCH, lr=LR)
        secs = time.perf_counter() - t0
        model.save_pretrained(str(out / name))
        tokenizer.save_pretrained(str(out / name))
        if _files_sha256(out / name, tok_names) != tok_sha:
            raise RuntimeError(f"tokenizer files in {out / name} differ from {out / 'tokenizer'}")
        reloaded = AutoModelForCausalLM.from_pretrained(str(out / name), local_files_only=True)
        ppl = perplexity(reloaded, test_win)
        params = sum(p.numel() for p in model.parameters())
        teachers[name] = {"dir": name, "seed": seed, "params": params, "steps": steps, "batch": BATCH, "lr": LR,
                          "train_tokens_seen": steps * BATCH * SEQ_LEN, "train_seconds": round(secs, 1),
                          "held_out_ppl": round(ppl, 3), **sizes}
        files += [f"{name}/config.json", f"{name}/model.safetensors"] + [f"{name}/{n}" for n in tok_names]
        print(f"teacher {name:<5} params={params:>9,}  steps={steps}  train={secs:5.1f}s  held-out ppl={ppl:.2f}",
              flush=True)

    student = llama_config(tokenizer, **STUDENT)
    (out / "student_config.json").write_text(json.dumps(student.to_dict(), indent=2, sort_keys=True) + "\n")
    files.append("student_config.json")
    student_params = sum(p.numel() for p in LlamaForCausalLM(student).parameters())
    print(f"student    config suggestion params={student_params:,} -> {out / 'student_config.json'}", flush=True)
    meta = {"version": VERSION, "corpus": corpus, "source": "pydoc_data.topics",
            "tokenizer": {"dir": "tokenizer", "vocab_size": len(tokenizer), "sha256": tok_sha, "files": tok_names,
                          "adds_bos": True, "seq_packing": "<s> text </s>"},
            "unigram_held_out_ppl": round(unigram, 3), "teachers": teachers,
            "student_config": "student_config.json", "student_params": student_params, "files": files}
    return write_meta(out, meta)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached outputs match")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ensure_lm_teachers(args.out, force=args.force)
    print(f"done in {time.perf_counter() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
