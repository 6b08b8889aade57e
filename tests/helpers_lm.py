"""Tiny causal-LM teachers for tests: a local BPE tokenizer and two small Llamas, in seconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch


def corpus(n_topics: int = 12) -> list[str]:
    from pydoc_data.topics import topics

    return [" ".join(topics[k].split())[:1500] for k in sorted(topics)[:n_topics]]


# A ChatML-like template over the test tokenizer's own specials (format chat).
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def instruct_rows(n_topics: int = 12, per_topic: int = 3) -> list[dict]:
    """Questions about pydoc topics answered by a slice of the topic's text: prompt, response
    and the same pair as chat messages."""
    from pydoc_data.topics import topics

    rows = []
    for key in sorted(topics)[:n_topics]:
        words = " ".join(topics[key].split()).split()
        for i in range(per_topic):
            prompt = f"About {key} ({i + 1})?"
            response = " ".join(words[i * 8:(i + 1) * 8]) or key
            rows.append({"prompt": prompt, "response": response,
                         "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
    return rows


def write_instruct_files(root: Path, n_topics: int = 12) -> tuple[Path, Path]:
    """train / test parquet files (prompt, response, messages); the last two topics held out."""
    rows = instruct_rows(n_topics)
    cut = len(rows) - 6
    paths = root / "instruct_train.parquet", root / "instruct_test.parquet"
    for path, part in zip(paths, (rows[:cut], rows[cut:])):
        pq.write_table(pa.Table.from_pylist(part), path)
    return paths


def make_tokenizer(out: Path, texts: list[str], vocab: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def tiny_llama(tokenizer, hidden: int, layers: int, seed: int):
    """A seeded random Llama over ``tokenizer``'s vocabulary and specials (64 positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg)


def fit_and_save(model, tokenizer, out: Path, batches, lr: float) -> Path:
    """AdamW over ``batches`` (an iterable of (input_ids, labels)), then save model and tokenizer to ``out``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for ids, labels in batches:
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def make_lm(out: Path, tokenizer, texts: list[str], hidden: int, layers: int, seed: int, steps: int = 40) -> Path:
    model = tiny_llama(tokenizer, hidden, layers, seed)
    ids = torch.tensor([t for doc in tokenizer(texts)["input_ids"] for t in doc])
    windows = ids[: len(ids) // 32 * 32].view(-1, 32)
    batches = (windows[torch.randint(len(windows), (16,))] for _ in range(steps))
    return fit_and_save(model, tokenizer, out, ((b, b) for b in batches), lr=3e-3)


def make_lm_setup(root: Path, teacher_steps: int = 40) -> dict:
    """Tokenizer, two teachers of different sizes, a student config and train/test text files."""
    texts = corpus()
    tok = make_tokenizer(root / "tokenizer", texts)
    teachers = {"small": make_lm(root / "small", tok, texts, 32, 1, seed=1, steps=teacher_steps),
                "large": make_lm(root / "large", tok, texts, 48, 2, seed=2, steps=teacher_steps)}
    student = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
    (root / "student.json").write_text(json.dumps(student))
    pq.write_table(pa.table({"text": texts[:10]}), root / "train.parquet")
    pq.write_table(pa.table({"text": texts[10:]}), root / "test.parquet")
    return {"teachers": teachers, "student_config": root / "student.json", "tokenizer": root / "tokenizer",
            "train": root / "train.parquet", "test": root / "test.parquet"}


def lm_config(tmp: Path, setup: dict, **sections) -> dict:
    cfg = {
        "run": {"name": "tinylm"},
        "task": "lm",
        "output_dir": str(tmp / "runs"),
        "dataset": {"source": str(setup["train"]), "test_source": str(setup["test"])},
        "teachers": [{"name": n, "backend": "hf", "path": str(p), "num_cpus": 0.25, "max_batch_size": 16}
                     for n, p in setup["teachers"].items()],
        "lm": {"max_len": 32, "k": 8, "student_config": str(setup["student_config"])},
        "ensemble": {"mode": "mean_prob", "temperature": 2.0},
        "store": {"shard_size": 64},
        "train": {"workers": 2, "cpus_per_worker": 0.5, "epochs": 2, "batch_size": 8, "lr": 0.003},
        "eval": {"baseline": True},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def make_untrained_lm_setup(root: Path) -> dict:
    """The files of make_lm_setup with untrained teachers (seconds, not a minute): enough for
    the checks that refuse bad input before any teacher runs (tests/test_bad_input.py)."""
    return make_lm_setup(root, teacher_steps=0)


# A teacher architecture transformers does not ship, as a hub repo with its own code has it.
REMOTE_CODE = '''"""A test teacher whose code lives in its dir: a {family} under its own model_type."""
from transformers import {family}Config, {family}ForCausalLM


class TinyCustomConfig({family}Config):
    model_type = "tiny_custom"


class TinyCustomForCausalLM({family}ForCausalLM):
    config_class = TinyCustomConfig
'''


def as_remote_code(src: Path, out: Path, architecture: str = "TinyCustomForCausalLM", family: str = "Llama") -> Path:
    """A copy of the ``family`` dir ``src`` (a transformers class prefix: Llama, Qwen2; same weights
    and tokenizer) whose config.json names its own code (model_type tiny_custom, auto_map ->
    modeling_tiny.py): loading it needs trust_remote_code. architecture: config.json's
    architectures, the class vLLM picks (e.g. LlamaForCausalLM: vLLM's own implementation, as for
    hub models vLLM supports whose config class is remote code)."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="tiny_custom", architectures=[architecture],
               auto_map={"AutoConfig": "modeling_tiny.TinyCustomConfig",
                         "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "modeling_tiny.py").write_text(REMOTE_CODE.format(family=family))
    return out
