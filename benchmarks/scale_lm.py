"""Scale check of the LM features on a ~100M-parameter Llama with a real vocabulary (49,152),
random weights, in one process (no Ray; benchmarks/scale_pipeline.py runs the whole pipeline): top-k labeling + NLL scoring, a teacher-initialised
student, KD training steps with the chunked top-k loss, export and reload, batched evaluation.

    python -m benchmarks.scale_lm [--windows 16] [--len 512] [--vocab 49152]

Prints one line per phase (seconds, process peak RSS) and `BENCH_RESULT {json}` at the end.
Peak RSS is the process high-water mark (ru_maxrss): it only grows, so each phase's line
shows the peak reached by the end of that phase.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from orchestrator.datasets import token_table
    from orchestrator.evaluate import evaluate_lm, lm_rows, student_scores
    from orchestrator.losses import build_topk_loss
    from orchestrator.models import CausalLMTeacher
    from orchestrator.students import build_lm_student, export_student, from_state
    from tests.helpers_lm import corpus, make_tokenizer

    out, figures = {}, {}
    root = Path(tempfile.mkdtemp(prefix="scale_lm-"))
    t = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        figures[f"{name}_s"], figures[f"{name}_peak_rss_gb"] = now - t, rss_gb()
        print(f"[scale] {name}: {now - t:.1f} s, peak RSS {rss_gb():.2f} GiB", flush=True)
        t = now

    tok = make_tokenizer(root / "tok", corpus(6), vocab=300)  # ids < 300: only the export needs a tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=640, intermediate_size=1920, num_hidden_layers=8,
                      num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=args.len,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    teacher = LlamaForCausalLM(cfg)
    figures["teacher_params_m"] = sum(p.numel() for p in teacher.parameters()) / 1e6
    teacher.save_pretrained(str(root / "teacher"))
    tok.save_pretrained(str(root / "teacher"))
    del teacher
    phase("build_teacher")

    windows = np.random.default_rng(0).integers(3, args.vocab, size=(args.windows, args.len))
    lm = CausalLMTeacher({"name": "t", "path": str(root / "teacher")}, args.k)
    ids, lps, nll = (np.concatenate(p) for p in zip(*(lm.score(windows[i:i + 4]) for i in range(0, len(windows), 4))))
    del lm
    phase("label_topk")
    figures["label_tokens_per_s"] = windows.size / figures["label_topk_s"]

    spec = {"init": "teacher", "path": str(root / "teacher"), "layers": [0, 3, 7]}
    student = build_lm_student(spec)
    figures["student_params_m"] = sum(p.numel() for p in student.parameters()) / 1e6
    phase("student_from_teacher_layers")

    loss_fn = build_topk_loss("kd", alpha=0.5, temperature=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x, tid, tlp = (torch.from_numpy(a) for a in (windows[:2], ids[:2].astype(np.int64), lps[:2]))
    losses = []
    for _ in range(3):
        logits = student(input_ids=x).logits[:, :-1]
        loss = loss_fn(logits, tid, tlp, x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    phase("train_3_steps_b2")
    figures["train_tokens_per_s"] = 3 * 2 * (args.len - 1) / figures["train_3_steps_b2_s"]

    path = export_student(student.eval(), spec, root / "export", root / "tok")
    again = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    with torch.inference_mode():
        diff = (again(input_ids=x[:1]).logits - student(input_ids=x[:1]).logits).abs().max().item()
    phase("export_and_reload")
    figures["export_max_logit_diff"] = diff

    state = {"spec": {"arch": "causal_lm", **spec}, "model": student.state_dict(), "loss": "kd"}
    del student, again, opt
    rows, labels = lm_rows(token_table(windows))
    teacher = {"ids": ids.reshape(-1, args.k), "logprobs": lps.reshape(-1, args.k), "nll": nll.reshape(-1),
               "params": int(figures["teacher_params_m"] * 1e6), "latency_ms": 0.0, "backend": "hf"}
    student = from_state({k: v for k, v in state["spec"].items() if k != "arch"}, state["model"])
    res = evaluate_lm(labels, {"t": teacher}, {"mode": "mean_prob", "tau": 1.0, "weights": {"t": 1.0}},
                      {"student": student_scores(student, rows)}, args.k, args.vocab)
    phase("evaluate")
    out = {"ratios": {}, "figures": {**figures, "train_losses": losses[-1],
                                     "eval_student_ppl": res["models"]["student"]["perplexity"],
                                     "eval_teacher_ppl": res["models"]["t"]["perplexity"]}}
    print("BENCH_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
