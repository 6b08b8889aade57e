"""Scale check of the whole LM pipeline: two ~100M-parameter Llama teachers with a real
vocabulary (49,152), random weights, on Serve; labeling, a teacher-initialised student trained
for a few steps on Ray Train, and evaluation of `--test` held-out windows of 512 tokens through
the teachers' Serve deployments and a Ray task for the student.

    python -m benchmarks.scale_pipeline [--test 200] [--train 32] [--len 512]
    python -m benchmarks.scale_pipeline --on-policy --teachers 1 --hidden 768 --layers 12 --train 16 --test 8 --len 384

--on-policy: prompt_response data (prompts of about --len - --new tokens, answers after them),
train.on_policy on every batch (the student samples --new tokens on its Ray Train worker, the
Serve teachers score them) and eval.sample_max_new_tokens = --new (teacher_nll_of_samples).

    python -m benchmarks.scale_pipeline --generate --train 32 --test 8 --len 384 --new 64

--generate: `distill generate` on the train prompts (n 2 per teacher, temperature 1, cross-scored,
curated), then `distill run` on the curated teacher answers (SeqKD + KD) with
eval.sample_max_new_tokens = --new. A random-weight teacher never ends an answer on its own, and
curation drops answers that reach max_new_tokens unended, so the teachers are built with their
end token's logit raised to --eos-logit on average over random text (`raise_eos`; at the default 1.0
about 9 in 10 answers of a 640-wide, 8-layer teacher end within 64 tokens, among the tokenizer's
300 ids): what
the answers say is noise, but their lengths, the curation and the stores are a real teacher's.

The driver's peak RSS (ru_maxrss of this process, which runs the pipeline) is reported with
the stage times; run it at two --test sizes to see whether the driver's memory grows with the
held-out split. Prints `BENCH_RESULT {json}` at the end. No timing asserts.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def raise_eos(model, tokens: int, eos: int, logit: float) -> None:
    """Give every position one shared direction u (added to every token's embedding, at the
    embeddings' own norm), and point the end token's head row along it, scaled so that its logit
    averages `logit` over random text: the model then ends its answers now and then. (A random
    model's hidden states share no direction of their own to use.)"""
    import torch

    g = torch.Generator().manual_seed(0)
    emb = model.get_input_embeddings().weight
    u = torch.randn(emb.shape[1], generator=g)
    u /= u.norm()
    x = torch.randint(3, tokens, (4, 64), generator=g)
    with torch.no_grad():
        emb += emb.norm(dim=1).mean() * u
        h = model(x, output_hidden_states=True).hidden_states[-1]  # after the final norm: what the head reads
        model.lm_head.weight[eos] = logit * u / (h @ u).mean()


def build_teachers(root: Path, vocab: int, length: int, n: int, hidden: int, layers: int, eos_logit: float | None = None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.models import load_tokenizer

    tok, params = load_tokenizer(root / "tok"), {}
    for name, seed in (("big", 1), ("big2", 2))[:n]:
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          max_position_embeddings=length + 1,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
        if eos_logit is not None:
            raise_eos(model, len(tok), tok.eos_token_id, eos_logit)
        params[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    (root / "params.json").write_text(json.dumps(params))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", help=argparse.SUPPRESS)  # internal: build the teachers under this dir, then exit
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--teachers", type=int, default=2, choices=(1, 2))
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--on-policy", action="store_true", help="prompt_response data, train.on_policy, teacher_nll_of_samples")
    ap.add_argument("--new", type=int, default=64, help="--on-policy / --generate: max_new_tokens (and of sample eval)")
    ap.add_argument("--generate", action="store_true", help="distill generate on the train prompts, then SeqKD on the answers")
    ap.add_argument("--eos-logit", type=float, default=1.0, help="--generate: the teachers' mean end-token logit")
    args = ap.parse_args()
    if args.build:
        return build_teachers(Path(args.build), args.vocab, args.len, args.teachers, args.hidden, args.layers,
                              args.eos_logit if args.generate else None)
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydoc_data.topics import topics

    from orchestrator import pipeline
    from orchestrator.config import config_from_dict
    from tests.helpers_lm import make_tokenizer

    root = Path(tempfile.mkdtemp(prefix="scale_pipeline-"))
    texts = [" ".join(topics[k].split()) for k in sorted(topics)]
    make_tokenizer(root / "tok", texts[:20], vocab=300)  # ids < 300 of the 49,152: enough to run every stage
    per_window = args.len * 3  # characters: ~1 token per 2-3 characters with this tokenizer, so windows fill
    docs = [t[i:i + per_window] for t in texts for i in range(0, len(t), per_window)]
    need = args.train + args.test
    if len(docs) < need:
        raise SystemExit(f"only {len(docs)} documents for {need} windows")
    if args.on_policy or args.generate:  # a prompt of about --len - --new tokens (this tokenizer: ~0.72 tokens a character), an answer
        cut = (args.len - args.new) * 5 // 4
        table = {"prompt": [d[:cut] for d in docs], "response": [d[cut:cut + args.new] or "." for d in docs]}
    else:
        table = {"text": docs}
    pq.write_table(pa.table({k: v[:args.train] for k, v in table.items()}), root / "train.parquet")
    pq.write_table(pa.table({k: v[args.train:need] for k, v in table.items()}), root / "test.parquet")
    # The teachers are built in a child process: this process is the driver being measured.
    subprocess.run([sys.executable, "-m", "benchmarks.scale_pipeline", "--build", str(root), "--vocab", str(args.vocab),
                    "--len", str(args.len), "--teachers", str(args.teachers), "--hidden", str(args.hidden),
                    "--layers", str(args.layers), *(["--generate", "--eos-logit", str(args.eos_logit)] if args.generate else [])],
                   check=True)
    params = json.loads((root / "params.json").read_text())
    raw = {"run": {"name": "scale"}, "task": "lm", "output_dir": str(root / "runs"),
           "dataset": {"source": str(root / "train.parquet"), "test_source": str(root / "test.parquet")},
           "teachers": [{"name": n, "backend": "hf", "path": str(root / n), "num_cpus": 1, "max_batch_size": 4}
                        for n in params],
           "lm": {"max_len": args.len, "k": 32},
           "student": {"init": "teacher", "teacher": "big", "layers": [0, args.layers - 1]},
           "ensemble": {"mode": "mean_prob", "temperature": 1.0},
           "store": {"shard_size": 16},
           "train": {"workers": 1, "cpus_per_worker": 1, "epochs": 1, "batch_size": 2, "max_steps": 3, "lr": 1e-4},
           "eval": {"baseline": False}}
    if args.on_policy:
        raw["dataset"]["format"] = "prompt_response"
        raw["train"]["on_policy"] = {"fraction": 1.0, "max_new_tokens": args.new}
        raw["eval"]["sample_max_new_tokens"] = args.new
    gen = None
    if args.generate:
        from orchestrator.generate import generate

        raw["dataset"]["format"] = "prompt_response"
        raw["generate"] = {"n": 2, "temperature": 1.0, "max_new_tokens": args.new, "seed": 0, "block_size": 8,
                           "cross_score": args.teachers > 1, "output": str(root / "generated")}
        raw["eval"]["sample_max_new_tokens"] = args.new
        raw["train"]["alpha"] = 0.5  # SeqKD (hard CE on the written tokens) + KD on the ensembled top-k
        t0 = time.perf_counter()
        gen = generate(config_from_dict(raw), quiet=True)
        gen_s = time.perf_counter() - t0
        answers = pq.read_table(gen["dataset"], columns=["response_ids"]).column("response_ids").to_pylist()
        gen = {"wall_s": gen_s, "total": gen["total"], "kept": gen["kept"], "dropped": gen["dropped"],
               "per_teacher": gen["per_teacher"], "kept_mean_tokens": float(np.mean([len(a) for a in answers])) if answers else 0.0,
               "tokens_per_s": {t: r["tokens_per_s"] for t, r in gen["throughput"].items()}}
        print(f"[scale_pipeline] generate: {gen}", flush=True)
        if not gen["kept"]:
            raise SystemExit("no generated answer survived curation: raise --eos-logit or --new")
        raw["dataset"]["source"] = str(root / "generated" / "generated.parquet")
    t0 = time.perf_counter()
    out = pipeline.run(config_from_dict(raw), quiet=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    models = out["models"]
    from orchestrator.metrics import REGISTRY

    stages = {s: REGISTRY.get_sample_value("distill_stage_seconds", {"run": "scale", "stage": s})
              for s in ("label", "train", "evaluate")}
    figures = {"teacher_params_m": {n: p / 1e6 for n, p in params.items()}, "test_windows": args.test,
               "train_windows": args.train, "len": args.len, "wall_s": wall, "driver_peak_rss_gib": peak,
               "test_tokens": out["test_tokens"],
               "perplexity": {n: m["perplexity"] for n, m in models.items()}, "stage_s": stages,
               "teacher_nll_of_samples": {n: m["teacher_nll_of_samples"] for n, m in models.items()
                                          if "teacher_nll_of_samples" in m},
               "on_policy": args.on_policy, "new_tokens": args.new if args.on_policy or args.generate else None,
               "generate": gen, "store_bytes": sum(f.stat().st_size for f in (root / "runs").rglob("*.parquet")),
               # the train history's on-policy figures (actors/on_policy.py epoch_metrics), last epoch
               "train_on_policy": {k: v for k, v in json.loads(Path(out["report"]).read_text())["curves"]["student"][-1].items()
                                   if k.startswith("on_policy")}}
    print(f"[scale_pipeline] {args.test} held-out windows of {args.len}: {wall:.0f} s, driver peak RSS {peak:.2f} GiB",
          flush=True)
    print("BENCH_RESULT " + json.dumps({"ratios": {}, "figures": figures}), flush=True)


if __name__ == "__main__":
    main()
