"""The on-policy samplers side by side on a ~100M-parameter Llama student with a real vocabulary
(random weights), in one process: `train.on_policy.sampler` hf (orchestrator/generation.py, the
training student's own decode loop) against vllm (orchestrator/vllm_sampler.py).

    python -m benchmarks.scale_vllm_sampler [--vocab 49152] [--hidden 768] [--layers 8] [--batch 8]
        [--prompt 256] [--new 128] [--vocab-limit N] [--out benchmarks/results_scale_vllm_sampler.json --key K] [--tiny]

Per sampler: seconds to sample one on-policy batch (B prompts, temperature 1, one seed each) and
tokens/s; for vllm also the engine's build (once per worker) and the weight copy (every on-policy
batch), and the RSS the engine adds (its KV cache is 1 GiB on CPU). Greedy: the share of
samples whose tokens are the same under both (random weights have near-ties, so not always 1).
--vocab-limit: a head wider than the tokenizer (Qwen: 151,936 rows, 151,665 tokens): both
samplers then draw only ids below it (vllm: allowed_token_ids) and the figures say what it costs.
Prints `[scale_vllm_sampler] ...` lines and `BENCH_RESULT {json}`; writes the figures to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

GIB = 2**30


def _rss() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    raise KeyError("VmRSS")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (the longest; others down to 3/4)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--vocab-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke sizes (seconds)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--key", default=None, help="with --out: keep the file's other keys, put the figures under this one")
    a = ap.parse_args(argv)
    if a.tiny:
        a.vocab, a.hidden, a.layers, a.batch, a.prompt, a.new = 512, 64, 2, 2, 16, 8
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.generation import sample
    from orchestrator.vllm_sampler import VLLMSampler, check_student

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                      num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=a.prompt + a.new + 1,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    student = LlamaForCausalLM(cfg).eval()
    check_student(student.config)
    fig = {"student_params_m": sum(p.numel() for p in student.parameters()) / 1e6, "vocab": a.vocab,
           "vocab_limit": a.vocab_limit, "batch": a.batch, "prompt_tokens": a.prompt, "max_new_tokens": a.new,
           "threads": a.threads}
    rng = np.random.default_rng(0)
    limit = a.vocab_limit or a.vocab
    prompts = [rng.integers(3, limit, size=n).tolist() for n in rng.integers(a.prompt * 3 // 4, a.prompt + 1, size=a.batch)]
    seeds = [[i] for i in range(a.batch)]
    common = {"max_new_tokens": a.new, "eos_ids": [2], "vocab_limit": a.vocab_limit}

    def say(msg: str) -> None:
        print(f"[scale_vllm_sampler] {msg}", flush=True)

    say(f"student {fig['student_params_m']:.1f}M params, V {a.vocab}, batch {a.batch}, prompts <= {a.prompt}, new {a.new}")
    out = {}
    for temperature, tag in ((1.0, "sampled"), (0.0, "greedy")):
        t0 = time.perf_counter()
        out[f"hf_{tag}"] = sample(student, prompts, seeds, temperature=temperature, top_p=1.0, k=1, pad_id=0, **common)
        s = time.perf_counter() - t0
        n = sum(len(x[0]["tokens"]) for x in out[f"hf_{tag}"])
        fig.update({f"hf_{tag}_s": s, f"hf_{tag}_tokens": n, f"hf_{tag}_tokens_per_s": n / s})
        say(f"hf   {tag}: {s:.1f} s, {n} tokens, {n / s:.0f} tokens/s")

    rss0, t0 = _rss(), time.perf_counter()
    vllm = VLLMSampler(student.config, max_len=a.prompt, max_new_tokens=a.new, engine=None)
    fig.update(vllm_build_s=time.perf_counter() - t0, vllm_engine_rss_gib=_rss() - rss0)
    syncs = []
    for _ in range(3):  # every on-policy batch copies the weights in: the first call, then two more
        t0 = time.perf_counter()
        vllm.sync(student.state_dict().items())
        syncs.append(time.perf_counter() - t0)
    fig.update(vllm_sync_first_s=syncs[0], vllm_sync_s=float(np.mean(syncs[1:])))
    say(f"vllm engine built in {fig['vllm_build_s']:.1f} s (+{fig['vllm_engine_rss_gib']:.2f} GiB RSS); weight copy "
        f"{syncs[0]:.2f} s first, {fig['vllm_sync_s']:.2f} s after")
    for temperature, tag in ((1.0, "sampled"), (0.0, "greedy")):
        for attempt in ("first", "second"):  # the first generate call warms vLLM up
            t0 = time.perf_counter()
            got = vllm.sample(prompts, seeds, temperature=temperature, **common)
            s = time.perf_counter() - t0
        n = sum(len(x[0]["tokens"]) for x in got)
        out[f"vllm_{tag}"] = got
        fig.update({f"vllm_{tag}_s": s, f"vllm_{tag}_tokens": n, f"vllm_{tag}_tokens_per_s": n / s})
        say(f"vllm {tag}: {s:.1f} s, {n} tokens, {n / s:.0f} tokens/s (second call)")
    same = [x[0]["tokens"].tolist() == y[0]["tokens"].tolist() for x, y in zip(out["hf_greedy"], out["vllm_greedy"])]
    prefix = [int(np.argmax(np.r_[np.asarray(x[0]["tokens"][:a.new]) != np.asarray(y[0]["tokens"][:a.new]), True]))
              for x, y in zip(out["hf_greedy"], out["vllm_greedy"])]
    drawn = np.concatenate([x[0]["tokens"] for x in out["vllm_sampled"]])
    fig.update(greedy_same_share=float(np.mean(same)), greedy_common_prefix_mean=float(np.mean(prefix)),
               vllm_max_id_drawn=int(drawn.max()), speedup_sampled=fig["hf_sampled_s"] / fig["vllm_sampled_s"],
               sync_share_of_vllm_batch=fig["vllm_sync_s"] / (fig["vllm_sync_s"] + fig["vllm_sampled_s"]))
    say(f"greedy: {np.mean(same):.2f} of samples the same, common prefix {np.mean(prefix):.1f} tokens on average; "
        f"vllm / hf speed (sampled) {fig['speedup_sampled']:.2f}x; largest id drawn {drawn.max()} (limit {limit})")
    vllm.close()
    if a.out:
        path = Path(a.out)
        value = {**(json.loads(path.read_text()) if path.exists() else {}), a.key: fig} if a.key else fig
        path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    result = {"ratios": {"vllm_over_hf_speed_sampled": fig["speedup_sampled"]}, "figures": fig}
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
