"""GPU: an LM teacher's top-k labeling throughput vs plain prefill and vs the FLOP limit.

    python -m benchmarks.bench_gpu_topk [--out results_gpu.json] [--quick]

Runs only on a machine with a CUDA GPU (BENCHMARKS.md says when it last ran, and where). A
Llama-shaped causal LM (~1.1B parameters, 32k vocabulary, random bf16 weights: the speed of a
forward pass does not depend on the values) is saved as a local from_pretrained folder and
loaded through the project's own `hf` teacher (orchestrator/models.py CausalLMTeacher,
teachers[].num_gpus 1). Per repeat, alternating:

  prefill   model(input_ids).logits on the GPU, nothing kept: the floor any labeler pays
  teacher   CausalLMTeacher(windows): the same forward + log_softmax + top-k on the GPU, and the
            [B, L-1, k] ids / log-probs copied to the host (what a Serve replica returns)

tokens/s for both, their ratio, and model FLOP utilisation against the bf16 matrix-product rate
measured on the same GPU in the same run (2 * N FLOPs per token; N without the embedding table).
vLLM's prompt_logprobs path is the other LM backend; the device machines here have no vLLM and
no registry to fetch it from, so it is not measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _matmul_tflops(torch, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results_gpu.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.models import CausalLMTeacher

    assert torch.cuda.is_available(), "bench_gpu_topk needs a CUDA GPU"
    layers, hidden, inter = (4, 1024, 2816) if args.quick else (16, 2048, 5632)
    batch, length = (4, 512) if args.quick else (8, 1024)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=length,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp)
        teacher = CausalLMTeacher({"name": "llama", "path": tmp, "num_gpus": 1}, args.k)
    model = teacher.model
    params = sum(p.numel() for p in model.parameters())
    non_embedding = params - model.get_input_embeddings().weight.numel()
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, length), dtype=np.int64)
    x = torch.from_numpy(windows).cuda()
    tokens = batch * length

    @torch.inference_mode()
    def prefill():
        model(input_ids=x).logits
        torch.cuda.synchronize()

    def label():
        ids, logp = teacher(windows)  # returns host numpy arrays: the copy is included
        assert ids.shape == (batch, length - 1, args.k) and np.isfinite(logp).all()

    for fn in (prefill, label, prefill, label):  # warm-up: kernels, allocator
        fn()
    peak = _matmul_tflops(torch)
    samples: dict[str, list[float]] = {"prefill": [], "teacher": []}
    for r in range(args.repeats):
        steps = [("prefill", prefill), ("teacher", label)]
        for name, fn in (steps if r % 2 == 0 else steps[::-1]):
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            samples[name].append(3 * tokens / (time.perf_counter() - t0))
    med = {n: statistics.median(v) for n, v in samples.items()}
    out = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "model": f"Llama-shaped, {layers} layers, hidden {hidden}, vocab {cfg.vocab_size}, bf16, random weights",
        "params": params, "non_embedding_params": non_embedding, "batch": batch, "length": length, "k": args.k,
        "repeats": args.repeats, "bf16_matmul_tflops": peak,
        "prefill_tokens_per_s": med["prefill"], "teacher_tokens_per_s": med["teacher"],
        "teacher_vs_prefill": med["teacher"] / med["prefill"],
        "prefill_mfu": 2 * non_embedding * med["prefill"] / (peak * 1e12),
        "teacher_mfu": 2 * non_embedding * med["teacher"] / (peak * 1e12),
        "samples": samples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
