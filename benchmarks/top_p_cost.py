"""What generate.top_p costs per decode step at real vocabulary sizes: orchestrator/generation.py
`_filtered` (the nucleus looked for in the top _NUCLEUS_K, rows sorted whole only when those hold
no more than top_p) beside the full [B, V] sort it replaced, on the same logits, and beside one
decode step (batch B, KV cache of --prompt tokens) of a ~100M Llama with random weights.

    python -m benchmarks.top_p_cost [--vocab 49152,151936] [--batch 8,32] [--temperature 0.7]
        [--top-p 0.9] [--threads 1] [--out benchmarks/results_top_p.json] [--tiny]

Logit shapes (the cut's cost depends on how peaked a row is):
  zipfS  p proportional to rank^-S over a random permutation of the vocabulary, before the
         temperature. Trained LMs' next-token distributions are mostly more peaked than zipf1.0;
  flat   randn * 0.1, what a random-weight model gives: every row is sorted whole (the slow path).
Per (vocab, batch, shape): ms per call of each, whether they give the same tensor (they must),
the mean mass of the top _NUCLEUS_K, and the fraction of rows sorted whole. Torch threads:
--threads (a replica decodes with what Ray gives it). Prints `[top_p] ...` lines and
`BENCH_RESULT {json}`; writes the figures to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from orchestrator import generation


def full_sort(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The cut as generation.py made it before the top-k search: sort every row whole."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    return torch.zeros_like(probs).scatter(-1, order, generation._nucleus(sorted_p, top_p))


def logits_of(shape: str, B: int, V: int, gen: torch.Generator) -> torch.Tensor:
    if shape == "flat":
        return torch.randn(B, V, generator=gen) * 0.1
    s = float(shape.removeprefix("zipf"))
    ranked = -s * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    return torch.stack([ranked[torch.randperm(V, generator=gen)] for _ in range(B)])


def ms_per_call(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


@torch.inference_mode()
def decode_step_ms(V: int, B: int, a) -> tuple[float, float]:
    """-> (ms per decode step, params in millions) of a Llama with random weights: prefill B x a.prompt
    tokens, then one token per row with the KV cache, as generation.sample's loop does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                      num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=a.prompt + 16,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, V, (B, a.prompt))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, steps = out.past_key_values, []
    for i in range(a.decode_steps + 1):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        steps.append(time.perf_counter() - t)
        cache = out.past_key_values
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return sum(steps[1:]) / a.decode_steps * 1e3, params  # the first step is a warm-up


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="49152,151936")
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--shapes", default="zipf1.0,zipf1.5,flat")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results_top_p.json")
    ap.add_argument("--tiny", action="store_true", help="smoke sizes (seconds): vocab 4096, batch 2, hidden 64, 2 layers")
    a = ap.parse_args(argv)
    if a.tiny:
        a.vocab, a.batch, a.hidden, a.layers, a.prompt, a.decode_steps, a.reps = "4096", "2", 64, 2, 8, 1, 1
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    K, figures = generation._NUCLEUS_K, {"nucleus_k": generation._NUCLEUS_K, "temperature": a.temperature,
                                         "top_p": a.top_p, "threads": a.threads, "hidden": a.hidden, "layers": a.layers}
    for V in map(int, a.vocab.split(",")):
        for B in map(int, a.batch.split(",")):
            step_ms, params = decode_step_ms(V, B, a)
            figures[f"v{V}_b{B}_decode_step_ms"], figures[f"v{V}_params_m"] = step_ms, params
            print(f"[top_p] vocab {V} batch {B}: one decode step of a {params:.0f}M Llama {step_ms:.1f} ms", flush=True)
            for shape in a.shapes.split(","):
                logits = logits_of(shape, B, V, gen)
                probs = torch.softmax(logits / a.temperature, -1)
                mass = probs.topk(min(K, V), -1).values.sum(-1)
                new = ms_per_call(lambda: generation._filtered(logits, a.temperature, a.top_p), a.reps)
                old = ms_per_call(lambda: full_sort(logits, a.temperature, a.top_p), a.reps)
                same = torch.equal(generation._filtered(logits, a.temperature, a.top_p), full_sort(logits, a.temperature, a.top_p))
                p = f"v{V}_b{B}_{shape}_"
                figures.update({p + "topk_first_ms": new, p + "full_sort_ms": old, p + "same": same,
                                p + "top_k_mass": float(mass.mean()), p + "rows_sorted_whole": float((mass <= a.top_p).float().mean())})
                print(f"[top_p]   {shape:<8} top-{K} mass {float(mass.mean()):.3f}: top-k first {new:7.1f} ms, "
                      f"full sort {old:7.1f} ms, same cut {same}", flush=True)
    result = {"benchmark": "top_p_cost", "figures": figures}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print("BENCH_RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
