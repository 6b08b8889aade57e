"""train.strategy fsdp against ddp at ~100M parameters on CPU: a plain LM train step, on-policy
sampling, and a train step with an LM hint term, per rank, in --ranks processes (default 2; spawned, gloo), with
no Ray (the numbers are those of the train workers' own code; Ray Train only starts them).

    python -m benchmarks.scale_fsdp [--vocab 49152] [--hidden 768] [--layers 12] [--batch 4]
        [--length 256] [--prompt 256] [--new 32] [--steps 2] [--threads 1] [--ranks 2]
        [--out benchmarks/results_scale_fsdp.json] [--tiny]

The student: a Llama built from a config (random weights, tied embeddings; hidden 768, 12 layers,
vocab 49,152: 122.7M parameters, the scale of benchmarks/scale_lm_online.py), the same on both
ranks (seeded). Wrapped as actors/train_state.py ``prepare`` wraps it:
  fsdp  ``fsdp_on_cpu`` (the project's own function: FSDP over gloo, one unit per decoder layer,
        use_orig_params), after ``skeleton`` (actors/fsdp_sampling.py) as the train loop makes it;
  ddp   torch's DistributedDataParallel(model): what Ray Train's ``prepare_model`` does on CPU
        (it needs a Ray Train context; replicated here, not called).
Then the optimiser(s), LR schedule and fused-head choice as actors/student.py ``train_loop`` makes
them (ddp: the head + loss fused, orchestrator/fused_head.py; fsdp: full logits). Per strategy,
each rank runs, each phase between barriers:
  train_step{i}  actors/student.py ``_lm_step`` (random stored top-k targets, loss kd) on
                 [batch, length] tokens, backward, ``_optimiser_step`` (grad_clip 1.0);
                 --steps of them: the first also makes AdamW's state;
  sample         actors/fsdp_sampling.py ``whole_student`` (fsdp: summon_full_params + the
                 skeleton; ddp: the module) + orchestrator/generation.py ``sample`` for --new
                 tokens on --batch prompts, as actors/on_policy.py OnPolicy.step calls them;
                 parts: ``gather`` (the block entered) and ``decode``;
  hint_step{i}   the same train step with one train.extra_losses hint term (LMExtraTerms, as
                 resolve_lm_terms gives it: student hidden state 6 [hidden] -> a random per-token
                 teacher feature of width --teacher-width, mse); fsdp: the projection's own
                 TermsOptimiser and the combined clip norm (actors/fsdp_terms.py).
Per phase and rank: seconds and peak RSS (VmHWM, reset at the phase's start through
/proc/self/clear_refs after malloc_trim, as benchmarks/scale_lm_online.py), the RSS at its start;
train / hint steps also per part (forward, backward, optimiser). Prints `[scale_fsdp] ...` lines
and `BENCH_RESULT {json}` ({"ratios": fsdp/ddp peak per phase and rank, "figures"}); --out: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks.scale_lm_online import GIB, _status
from benchmarks.scale_lm_online import Phases as OnlinePhases

STRATEGIES = ("ddp", "fsdp")
HINT_LAYER = 6  # the student's hidden state the hint reads (after decoder layer 6; clipped to the depth)


class Phases(OnlinePhases):
    """scale_lm_online's phases (seconds, RSS at the start, own peak, per part), per rank: both
    ranks start each phase together, names carry `prefix` (the strategy), and the end line lists
    the parts' peaks and any extra figures."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.prefix = rank, ""

    def start(self, name: str) -> None:
        torch.distributed.barrier()  # both ranks start together: a collective inside waits for neither
        super().start(f"{self.prefix}{name}")
        self.parts = []

    def part(self, name: str) -> float:
        peak = super().part(name)
        self.parts.append(f"{name} {peak:.2f}")
        return peak

    def end(self, **extra) -> None:
        s, peak = time.perf_counter() - self.t0, max(self.peak, _status("VmHWM"))
        f = self.figures
        f[f"{self.name}_s"], f[f"{self.name}_rss_start_gib"], f[f"{self.name}_peak_rss_gib"] = s, self.rss0, peak
        f.update({f"{self.name}_{k}": v for k, v in extra.items()})
        parts = f" (parts: {', '.join(self.parts)})" if self.parts else ""
        print(f"[scale_fsdp] rank {self.rank} {self.name}: {s:.1f} s, RSS {self.rss0:.2f} -> peak {peak:.2f} GiB{parts}"
              + "".join(f", {k} {v}" for k, v in extra.items()), flush=True)


def _llama(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same initial weights on every rank (FSDP / DDP do not broadcast them here)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                      num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=max(a.length, a.prompt + a.new) + 1,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).train()


def _hint_terms(a):
    """One hint term as orchestrator/lm_extra_terms.py resolve_lm_terms resolves it (teacher 't',
    per-token feature of width --teacher-width, student hidden state HINT_LAYER)."""
    from orchestrator.extra_terms import describe
    from orchestrator.features import feature_column

    layer = min(HINT_LAYER, a.layers)
    spec = {"kind": "hint", "weight": 1.0, "teacher": "t", "teacher_layer": 12, "student_layer": layer, "distance": "mse"}
    s_out = {"kind": "hidden", "key": layer, "shape": [a.hidden]}
    parts = [{"teacher": "t", "column": feature_column("t", 12), "shape": [a.teacher_width], "pool": "none",
              "student_dim": a.hidden, "teacher_dim": a.teacher_width}]
    return [{"spec": spec, "student": s_out, "parts": parts, "label": describe({**spec}, s_out, parts)}]


def _batch(a, rank: int, step: int, resolved: list[dict] | None) -> dict:
    """A train batch as LMBatch gives it: ids [B, L], sel [B, L-1] (every position: text windows),
    the stored top-k (gaps: ids, codes: log-probs; schema version 1 layout) [B, L-1, k], and the
    hint's teacher feature [B, L-1, Dt] float16."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    B, L, k = a.batch, a.length, a.k
    ids = torch.randint(3, a.vocab, (B, L), generator=g)
    top = torch.randint(0, a.vocab, (B, L - 1, k), generator=g)
    lps = torch.log_softmax(torch.randn(B, L - 1, k, generator=g), -1).sort(-1, descending=True).values
    batch = {"input_ids": ids, "sel": torch.ones(B, L - 1, dtype=torch.bool), "gaps": top, "codes": lps}
    for r in resolved or []:
        for p in r["parts"]:
            batch[p["column"]] = torch.randn(B, L - 1, p["teacher_dim"], generator=g).half()
    return batch


def release_flat_grads(model) -> None:
    """--release-grads: free each FSDP unit's sharded flat gradient right after the step. With
    use_orig_params, zero_grad(set_to_none=True) drops the original parameters' grads but not the
    flat one they view; FSDP frees it itself (``_reset_flat_param_grad_info_if_needed``) at the next
    forward, summon_full_params or state_dict call, so it is held only between those: the "at rest"
    RSS here. The train loop leaves it to FSDP (no peak changes); this measures what it holds."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for unit in FullyShardedDataParallel.fsdp_modules(model):
        if unit._handle is not None:
            unit._handle._reset_flat_param_grad_info_if_needed()


def _train_step(ph, name, model, loss_fn, batch, config, terms, head, opt, sched, terms_opt) -> None:
    from actors.student import _lm_step, _optimiser_step

    ph.start(name)
    loss, n = _lm_step(model, loss_fn, batch, config, terms, head)
    ph.part("forward")
    loss.backward()
    ph.part("backward")
    _optimiser_step(model, opt, sched, config["grad_clip"], terms, terms_opt)
    if config.get("release_grads"):
        release_flat_grads(model)
    ph.part("optimiser")
    ph.end(tokens=n, loss=round(float(loss.detach()), 4))


def _strategy(rank: int, strategy: str, a, ph: Phases) -> None:
    import functools

    from actors import fsdp_sampling, fsdp_terms
    from actors.train_state import fsdp_on_cpu
    from orchestrator.fused_head import plan as plan_fused_head
    from orchestrator.generation import sample
    from orchestrator.lm_extra_terms import LMExtraTerms
    from orchestrator.losses import build_topk_loss
    from orchestrator.schedule import lr_lambda

    ph.prefix = f"{strategy}_"
    ph.start("build")
    model = _llama(a)
    full = sum(p.numel() for p in model.parameters())
    resolved = _hint_terms(a)
    terms = LMExtraTerms(resolved, model)  # built on the unwrapped student, as train_loop does
    head = plan_fused_head(model, strategy, False, rank == 0)  # the plain step's (a run without terms)
    head_hint = plan_fused_head(model, strategy, True, rank == 0)
    skeleton = fsdp_sampling.skeleton(model) if strategy == "fsdp" else None
    if strategy == "fsdp":
        model = fsdp_on_cpu(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)  # = ray.train.torch.prepare_model on CPU
    own = fsdp_terms.is_fsdp(model)
    config = {"k": a.k, "lr": 1e-5, "weight_decay": 0.01, "grad_clip": 1.0, "release_grads": a.release_grads}
    opt = torch.optim.AdamW([*model.parameters(), *(terms.parameters() if not own else [])], lr=config["lr"],
                            weight_decay=config["weight_decay"])
    schedule = functools.partial(lr_lambda, warmup_steps=1, total_steps=100, schedule="cosine", min_ratio=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    terms_opt = fsdp_terms.TermsOptimiser(terms, config, schedule) if own else None
    held = sum(p.numel() for p in model.parameters())  # this rank's (FSDP: its shards')
    ph.end(params=full, params_held=held, fused_head=head is not None, fused_head_hint=head_hint is not None)

    loss_fn = build_topk_loss("kd", alpha=0.5, temperature=1.0)
    for i in range(a.steps):
        _train_step(ph, f"train_step{i}", model, loss_fn, _batch(a, rank, i, None), config, None, head, opt, sched, None)

    g = torch.Generator().manual_seed(rank)  # each rank samples for its own prompts, as on-policy does
    lengths = torch.randint(a.prompt * 3 // 4, a.prompt + 1, (a.batch,), generator=g).tolist()
    prompts = [torch.randint(3, a.vocab, (n,), generator=g).tolist() for n in lengths]
    seeds = [[100 * rank + i] for i in range(a.batch)]
    ph.start("sample")
    with fsdp_sampling.whole_student(model, skeleton) as student:  # fsdp: a collective, every rank alike
        ph.part("gather")
        out = sample(student, prompts, seeds, temperature=1.0, top_p=1.0, max_new_tokens=a.new, eos_ids=[2], k=1,
                     pad_id=0)
        ph.part("decode")
    ph.end(tokens=sum(len(s[0]["tokens"]) for s in out))

    for i in range(a.steps):
        _train_step(ph, f"hint_step{i}", model, loss_fn, _batch(a, rank, 100 + i, resolved), config, terms, head_hint,
                    opt, sched, terms_opt)
    ph.figures[f"{strategy}_hint_term"] = terms.pop_means()[resolved[0]["label"]]
    del model, opt, sched, terms, terms_opt, skeleton, head, head_hint


def _worker(rank: int, init: str, a, out: str) -> None:
    torch.set_num_threads(a.threads)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=a.ranks)
    try:
        ph = Phases(rank)
        for strategy in a.strategies:
            _strategy(rank, strategy, a, ph)
            import gc

            gc.collect()
        Path(f"{out}.{rank}").write_text(json.dumps(ph.figures))
    finally:
        torch.distributed.destroy_process_group()


PHASES = ("build", "train_step", "sample", "sample_gather", "sample_decode", "hint_step")


def _peak(f: dict, strategy: str, phase: str, steps: int) -> float:
    """A phase's peak RSS; train / hint steps: the highest over their steps."""
    if phase in ("train_step", "hint_step"):
        return max(f[f"{strategy}_{phase}{i}_peak_rss_gib"] for i in range(steps))
    if phase.startswith("sample_"):
        return f[f"{strategy}_sample_{phase[7:]}_peak_rss_gib"]
    return f[f"{strategy}_{phase}_peak_rss_gib"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4, help="rows per train step; prompts per sampling")
    ap.add_argument("--length", type=int, default=256, help="tokens per train row")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (the longest; others down to 3/4)")
    ap.add_argument("--new", type=int, default=32, help="max_new_tokens of the sampling")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--teacher-width", type=int, default=1024, help="the hint's teacher feature width")
    ap.add_argument("--steps", type=int, default=2, help="train steps and hint steps each (the first makes AdamW's state)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--ranks", type=int, default=2, help="processes (world size): fsdp's shards are 1/ranks each")
    ap.add_argument("--release-grads", action="store_true", help="free FSDP's sharded flat gradients after each step")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--tiny", action="store_true", help="smoke sizes (seconds): vocab 512, hidden 64, 2 layers")
    ap.add_argument("--out", default=None, help="write the result as JSON here (default: nowhere)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.vocab, a.hidden, a.layers, a.batch, a.length, a.prompt, a.new, a.k, a.teacher_width, a.steps = \
            512, 64, 2, 2, 16, 12, 4, 4, 48, 1
    a.strategies = tuple(s for s in a.strategies.split(",") if s)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scale_fsdp-") as d:
        out = os.path.join(d, "figures")
        # spawn, not fork (tests/test_fsdp_sampling.py: a forked child hung in its first sdpa kernel)
        mp.start_processes(_worker, args=(f"file://{d}/rendezvous", a, out), nprocs=a.ranks, start_method="spawn")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(a.ranks)]
    s0 = ranks[0][f"{a.strategies[0]}_build_params"]
    figures = {"params": s0, "weights_f32_gib": s0 * 4 / GIB, "vocab": a.vocab, "hidden": a.hidden, "layers": a.layers,
               "batch": a.batch, "length": a.length, "prompt_tokens": a.prompt, "max_new_tokens": a.new, "k": a.k,
               "teacher_width": a.teacher_width, "steps": a.steps, "threads_per_rank": a.threads, "ranks": a.ranks, "release_grads": a.release_grads,
               "wall_s": time.perf_counter() - t0,
               **{f"rank{r}_{k}": v for r, f in enumerate(ranks) for k, v in f.items()}}
    ratios = {}
    print(f"[scale_fsdp] {s0 / 1e6:.1f}M parameters, float32 weights {s0 * 4 / GIB:.2f} GiB; peak RSS per rank (GiB):",
          flush=True)
    for phase in PHASES:
        cells = []
        for r, f in enumerate(ranks):
            peaks = {s: _peak(f, s, phase, a.steps) for s in a.strategies}
            cells.append(" ".join(f"{s} {v:.2f}" for s, v in peaks.items()))
            if set(STRATEGIES) <= set(a.strategies):
                ratios[f"rank{r}_{phase}_peak_fsdp_vs_ddp"] = peaks["fsdp"] / peaks["ddp"]
                cells[-1] += f" (fsdp/ddp {peaks['fsdp'] / peaks['ddp']:.2f})"
        print(f"[scale_fsdp]   {phase}: " + "; ".join(f"rank {r}: {c}" for r, c in enumerate(cells)), flush=True)
    result = {"ratios": ratios, "figures": figures}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
