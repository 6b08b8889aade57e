"""Real-model robustness at a real size: what the tiny unit tests pin, checked once at ~100M
parameters and a real vocabulary, with the time and memory it costs.

1. `init: teacher` on families with per-layer config lists (gemma3_text `layer_types`, qwen2
   sliding windows, smollm3 `no_rope_layers`): a ~100M teacher built from a config with random
   weights, saved, and a student of three of its layers built through `students.build_lm_student`;
   its logits against the teacher cut to the same modules, over 512 positions (past a 128-token
   sliding window); as a control, the same weights under the unsliced lists' first entries differ.
2. The tokenizer check on a Qwen-sized vocabulary (151,643 tokens + 22 specials): a copy re-saved
   with reformatted files and another pad token is the same vocabulary (`models.same_vocabulary`,
   the id -> token comparison), one renamed id is not; the time of each comparison.

    python -m benchmarks.scale_checks [--len 512] [--out benchmarks/results_scale_checks.json]

No timing asserts; the comparisons are asserted (a wrong slice or a wrong tokenizer verdict
fails the run).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# ~100M each: hidden 640, 12 layers, intermediate 2,048, a real vocabulary; sliding window 128
FAMILIES = {
    "gemma3_text": ({"model_type": "gemma3_text", "vocab_size": 49152, "head_dim": 160, "query_pre_attn_scalar": 160,
                     "sliding_window": 128, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2},
                    [0, 5, 6]),
    "qwen2_sliding": ({"model_type": "qwen2", "vocab_size": 151936, "tie_word_embeddings": True,
                       "use_sliding_window": True, "sliding_window": 128, "max_window_layers": 6}, [0, 6, 11]),
    "smollm3": ({"model_type": "smollm3", "vocab_size": 49152, "no_rope_layers": [1, 1, 1, 0] * 3}, [0, 3, 7]),
}


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def check_family(root: Path, name: str, extra: dict, keep: list[int], length: int) -> dict:
    from orchestrator.students import build_lm_student

    cfg = {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 4,
           "num_key_value_heads": 1, "max_position_embeddings": length + 1, **IDS, **extra}
    torch.manual_seed(0)
    teacher = build_lm_student({"init": "scratch", "config": cfg}).eval()
    with torch.no_grad():  # norms start at exactly 1: make them distinct, so a wrong copy shows
        for n, p in teacher.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    path = root / name
    teacher.save_pretrained(str(path))
    teacher_params = sum(p.numel() for p in teacher.parameters())
    t0 = time.perf_counter()
    student = build_lm_student({"init": "teacher", "path": str(path), "layers": keep}).eval()
    build_s = time.perf_counter() - t0
    sliced = {k: getattr(student.config, k) for k in ("layer_types", "no_rope_layers") if getattr(student.config, k, None)}
    whole = {k: list(getattr(teacher.config, k)) for k in sliced}  # the teacher's per-layer lists
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in keep])
    teacher.config.num_hidden_layers = len(keep)
    if getattr(teacher.config, "layer_types", None):
        teacher.config.layer_types = [teacher.config.layer_types[i] for i in keep]
    x = torch.randint(3, cfg["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = student(x, use_cache=False).logits, teacher(x, use_cache=False).logits
    diff = (a - b).abs().max().item()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # the control: the same weights under the first len(keep) entries of each per-layer list (what
    # an unsliced config gives) compute something else, so the comparison above could fail
    unsliced = {}
    for key in (k for k in sliced if whole[k][:len(keep)] != sliced[k]):
        cfg_wrong = type(student.config).from_dict({**student.config.to_dict(), key: whole[key][:len(keep)]})
        wrong = type(student)(cfg_wrong).eval()
        wrong.load_state_dict(student.state_dict())
        with torch.no_grad():
            unsliced[key] = (wrong(x, use_cache=False).logits - a).abs().max().item()
        assert unsliced[key] > 1e-3, (name, key)
        del wrong
    params = sum(p.numel() for p in teacher.parameters())  # the cut teacher: the student's size
    row = {"family": name, "teacher_params_m": round(teacher_params / 1e6, 1),
           "student_params_m": round(params / 1e6, 1), "vocab": cfg["vocab_size"], "kept_layers": keep,
           "sliced": sliced, "build_student_s": round(build_s, 2), "positions": length, "max_abs_logit_diff": diff,
           "max_abs_logit_diff_unsliced": unsliced,
           "peak_rss_gib": round(rss_gib(), 2)}
    print(json.dumps(row))
    del teacher, student, a, b
    return row


def qwen_sized_tokenizer(out: Path):
    """A byte-level BPE over 151,643 tokens (the 256 bytes, then made-up ones) and 22 specials:
    the size of Qwen2.5's; no merges, which the id -> token comparison does not read."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(sorted(alphabet))}
    for i in range(151643 - len(vocab)):
        vocab[f"Ġt{i}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(19)]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[3:])
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.save_pretrained(str(out))
    return len(fast)


def check_tokenizer(root: Path) -> dict:
    from orchestrator.models import same_vocabulary, tokenizer_hash, vocabulary_hash

    a, b, c = root / "tok_a", root / "tok_b", root / "tok_c"
    size = qwen_sized_tokenizer(a)
    shutil.copytree(a, b)
    raw = json.loads((b / "tokenizer.json").read_text())
    (b / "tokenizer.json").write_text(json.dumps(raw, indent=2, sort_keys=True))  # re-saved, reformatted
    conf = json.loads((b / "tokenizer_config.json").read_text())
    (b / "tokenizer_config.json").write_text(json.dumps({**conf, "pad_token": "<|im_end|>"}))
    shutil.copytree(a, c)
    raw["model"]["vocab"]["Ġrenamed"] = raw["model"]["vocab"].pop("Ġt1000")  # one id names another token
    (c / "tokenizer.json").write_text(json.dumps(raw))
    t0 = time.perf_counter()
    file_hashes = [tokenizer_hash(p) for p in (a, b, c)]
    hash_s = time.perf_counter() - t0
    assert len(set(file_hashes)) == 3  # the bytes differ: the id -> token map decides
    t0 = time.perf_counter()
    same = same_vocabulary(a, b)
    same_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    renamed = same_vocabulary(a, c)
    renamed_s = time.perf_counter() - t0
    assert same and not renamed
    vocabulary_hash.cache_clear()
    row = {"tokens": size, "tokenizer_json_mb": round((a / "tokenizer.json").stat().st_size / 2 ** 20, 1),
           "file_hash_3_dirs_s": round(hash_s, 3), "same_vocabulary_resaved_s": round(same_s, 2),
           "same_vocabulary_renamed_s": round(renamed_s, 2), "resaved_is_same": same, "renamed_is_same": renamed,
           "peak_rss_gib": round(rss_gib(), 2)}
    print(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--len", type=int, default=512, help="positions of the logit comparison")
    ap.add_argument("--out", default="benchmarks/results_scale_checks.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [check_family(root, n, extra, keep, args.len) for n, (extra, keep) in FAMILIES.items()]
        tok = check_tokenizer(root)
    from benchmarks.common import machine

    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "init_teacher": rows, "tokenizer": tok}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
