"""Scale check of the online LM paths on a ~100M-parameter Llama with a real vocabulary (49,152),
random weights, in one process (no Ray; benchmarks/scale_pipeline.py --on-policy runs them on
Ray): on-policy train steps, teacher_nll_of_samples, and `distill generate` with an hf teacher.

    python -m benchmarks.scale_lm_online [--vocab 49152] [--hidden 768] [--layers 12] [--batch 8]
        [--prompt 256] [--new 128] [--out benchmarks/results_scale_online.json --key vocab_49152] [--tiny]

Each phase runs the project's own functions; only what Serve / Ray would carry is replaced by a
direct call, as the replica / task would make it:
  on_policy    actors/on_policy.py OnPolicy.step (student samples with orchestrator/generation.py,
               the teacher's `score` of the completion rows as `score_batched` runs it on the
               replica, the sparse ensemble, the divergence), then backward + AdamW step; steps
               0 and 1 as the loop runs them, step 2 with the student's head over every position
               (the step before actors/on_policy.py sampled_logits), side by side;
  sample_eval  orchestrator/sample_eval.py: `_sample_task` (the Ray task's body: greedy decode
               with 1 torch thread, as in the task) + `score_samples` + `ensemble_nll_per_token`;
  generate     orchestrator/generation.py `generate_with` (what the deployment's `generate` runs)
               on one block, then generate.py's `_cross_score` and `_part_table`.
Per phase: seconds, tokens/s, the RSS at its start and its own peak (VmHWM, reset at the start
of each phase through /proc/self/clear_refs after malloc_trim; the on-policy steps also per part:
step call (sample + score + forward + loss), backward, AdamW), beside the size of one float32 logits tensor of
that phase (`_ref_logits_gib`: [B, L, V] of the step's rows; for the large cross-score [N, V] of
its N scored positions), to see whether more than one step's logits is ever held.
Prints `[scale_online] ...` lines and `BENCH_RESULT {json}`; writes the figures to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

GIB = 2**30


def _status(field: str) -> float:
    """VmRSS / VmHWM of this process in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise KeyError(field)


def _trim() -> None:
    """Give freed heap back to the kernel, then VmHWM := VmRSS (Linux >= 4.0): a phase's peak is
    its own, not the allocator's leftovers of the one before."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


class Phases:
    """Times each phase and its own peak RSS (the kernel's high-water mark, reset per phase)."""

    def __init__(self):
        self.figures, self.name, self.t0, self.rss0, self.peak = {}, None, 0.0, 0.0, 0.0

    def start(self, name: str) -> None:
        _trim()
        self.name, self.t0, self.rss0, self.peak = name, time.perf_counter(), _status("VmRSS"), 0.0

    def part(self, name: str) -> float:
        """The peak RSS since the phase's start or its last part, recorded as NAME_peak_rss_gib;
        then the high-water mark starts afresh (where within a phase the peak is)."""
        peak = _status("VmHWM")
        self.figures[f"{self.name}_{name}_peak_rss_gib"], self.peak = peak, max(self.peak, peak)
        _trim()
        return peak

    def end(self, tokens: int | None = None, logits_bytes: float | None = None) -> float:
        s, peak = time.perf_counter() - self.t0, max(self.peak, _status("VmHWM"))
        f = self.figures
        f[f"{self.name}_s"], f[f"{self.name}_rss_start_gib"], f[f"{self.name}_peak_rss_gib"] = s, self.rss0, peak
        line = f"[scale_online] {self.name}: {s:.1f} s, RSS {self.rss0:.2f} -> peak {peak:.2f} GiB"
        if tokens is not None:
            f[f"{self.name}_tokens"], f[f"{self.name}_tokens_per_s"] = tokens, tokens / s
            line += f", {tokens} tokens, {tokens / s:.0f} tokens/s"
        if logits_bytes is not None:
            f[f"{self.name}_ref_logits_gib"] = logits_bytes / GIB
            line += f"; reference logits {logits_bytes / GIB:.2f} GiB"
        print(line, flush=True)
        return s


def _answered(value):  # what a Serve handle's .remote() gives: .result() -> the answer
    return SimpleNamespace(result=lambda: value)


class LocalHandle:
    """A Serve handle's `score` answered in this process by the model the replica would load."""

    def __init__(self, teacher):
        self.score = SimpleNamespace(remote=lambda rows: _answered(teacher.score(rows)))


def local_on_policy(teacher, op: dict, k: int, name: str):
    """actors/on_policy.OnPolicy without Ray: `_score` calls the teacher's `score` in chunks of
    op["chunk"] rows, as `score_batched` does on the replica."""
    from actors.on_policy import OnPolicy
    from orchestrator.losses import build_topk_loss

    class Local(OnPolicy):
        def _score(self, rows):
            c = self.op["chunk"][name]
            return {name: tuple(np.concatenate(p) for p in zip(*(teacher.score(rows[i:i + c])
                                                                  for i in range(0, len(rows), c))))}

    o = Local.__new__(Local)
    o.op, o.ctx, o.counters, o.k, o.seed, o.rank, o.skeleton = op, None, OnPolicy.fresh(), k, 0, 0, None
    o.loss_fn = build_topk_loss(op["divergence"], beta=op["beta"], temperature=1.0)
    quiet = SimpleNamespace(set=lambda *_, **__: None, observe=lambda *_, **__: None, inc=lambda *_, **__: None)
    o.m, o.tags = {m: quiet for m in ("fraction", "score_latency", "sample_nll", "tokens")}, {}
    return o


def build(root: Path, a) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers_lm import corpus, make_tokenizer

    tok = make_tokenizer(root / "tok", corpus(6), vocab=300)  # ids < 300: only the files are needed
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                      num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=a.prompt + a.new + 1,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(root / "teacher"))
    tok.save_pretrained(str(root / "teacher"))
    return sum(p.numel() for p in model.parameters()) / 1e6


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="prompts per step / decode batch / generate block")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (the longest; others down to 3/4)")
    ap.add_argument("--new", type=int, default=128, help="max_new_tokens of every phase")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cross-rows", type=int, default=32, help="rows of the large cross-score (chunked vs not)")
    ap.add_argument("--tiny", action="store_true", help="smoke sizes (seconds): vocab 512, hidden 64, 2 layers")
    ap.add_argument("--out", default=None, help="write the figures here as JSON (default: nowhere)")
    ap.add_argument("--key", default=None, help="with --out: keep the file's other keys, put the figures under this one")
    a = ap.parse_args(argv)
    if a.tiny:
        a.vocab, a.hidden, a.layers, a.student_layers, a.batch, a.prompt, a.new, a.cross_rows = 512, 64, 2, 1, 2, 16, 8, 4
    torch.set_num_threads(a.threads)
    import tempfile

    from orchestrator.generate import _cross_score, _part_table
    from orchestrator.generation import generate_with
    from orchestrator.instruct import pack_examples
    from orchestrator.models import CausalLMTeacher
    from orchestrator.sample_eval import _sample_task, budgets, ensemble_nll_per_token, labels_of, score_samples
    from orchestrator.students import build_lm_student

    root, ph = Path(tempfile.mkdtemp(prefix="scale_online-")), Phases()
    max_len, B, V, eos, pad = a.prompt + a.new, a.batch, a.vocab, [2], 0
    ph.start("build_teacher")
    params = build(root, a)
    ph.end()
    ph.figures.update(teacher_params_m=params, vocab=V, batch=B, prompt_tokens=a.prompt, max_new_tokens=a.new,
                      max_len=max_len, k=a.k, threads=a.threads)
    rng = np.random.default_rng(0)
    lengths = rng.integers(a.prompt * 3 // 4, a.prompt + 1, size=B)
    prompts = [rng.integers(3, V, size=n).tolist() for n in lengths]
    answers = [rng.integers(3, V, size=a.new // 2) for _ in prompts]  # the stored (offline) answers
    examples = [(np.array([*p, *r]), np.r_[np.zeros(len(p), np.uint8), np.ones(len(r), np.uint8)])
                for p, r in zip(prompts, answers)]
    ids, pos, mask, _ = pack_examples(examples, max_len, pad, packing=False)  # one example per row
    teacher = CausalLMTeacher({"name": "t", "path": str(root / "teacher")}, a.k)
    every = np.linspace(0, a.layers - 1, a.student_layers).round().astype(int).tolist()
    student = build_lm_student({"init": "teacher", "path": str(root / "teacher"), "layers": every})
    ph.figures["student_params_m"] = sum(p.numel() for p in student.parameters()) / 1e6
    ph.figures["student_layers"] = len(every)

    # ---- on-policy: one step = the student samples, the teacher scores, loss, backward, AdamW ------
    op = {"divergence": "reverse_kl", "beta": 0.5, "temperature": 1.0, "max_new_tokens": a.new, "eos_ids": eos,
          "pad_id": pad, "max_len": max_len, "vocab_size": V, "chunk": {"t": B},
          "ensemble": {"mode": "mean_prob", "temperature": 1.0, "tau": 1.0, "weights": {"t": 1.0}}}
    onp = local_on_policy(teacher, op, a.k, "t")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batch = {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
             "sel": torch.from_numpy(mask[:, 1:].astype(bool))}
    import actors.on_policy as on_policy_mod

    sampled = {}

    def timed_sample(*args, **kw):  # the step's own sampler, timed
        t0 = time.perf_counter()
        out = on_policy_mod_sample(*args, **kw)
        sampled["s"] = time.perf_counter() - t0
        return out

    on_policy_mod_sample, on_policy_mod.sample = on_policy_mod.sample, timed_sample
    student.train()
    kept_head = on_policy_mod.sampled_logits

    def full_logits(model, _module, x, pos, sel):  # what the step did before sampled_logits: every position
        return model(input_ids=x, position_ids=pos, use_cache=False).logits[:, :-1][sel]

    # Steps 0 and 1: as the train loop runs them (the first pays one-off costs: packing check,
    # AdamW state, allocator growth); step 2, side by side: the head over every position.
    for step in range(3):
        on_policy_mod.sampled_logits = kept_head if step < 2 else full_logits
        ph.start(f"on_policy_step{step}")
        loss, n = onp.step(student, batch, epoch=0, index=step)
        ph.part("sample_score_forward")
        t_back = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        ph.part("backward")
        opt.step()
        ph.part("adamw")
        back = time.perf_counter() - t_back
        s = ph.end(tokens=n, logits_bytes=B * max_len * V * 4.0)
        ph.figures.update({f"on_policy_step{step}_sample_s": sampled["s"],
                           f"on_policy_step{step}_score_s": onp.counters["score_s"] - ph.figures.get("_score_done", 0.0),
                           f"on_policy_step{step}_backward_opt_s": back, f"on_policy_step{step}_loss": loss.item()})
        ph.figures["_score_done"] = onp.counters["score_s"]
        print("[scale_online]   peak RSS of its parts: " + ", ".join(
            f"{p} {ph.figures[f'on_policy_step{step}_{p}_peak_rss_gib']:.2f} GiB"
            for p in ("sample_score_forward", "backward", "adamw")), flush=True)
        print(f"[scale_online]   sample {sampled['s']:.1f} s, teacher score "
              f"{ph.figures[f'on_policy_step{step}_score_s']:.1f} s, backward + AdamW {back:.1f} s (of {s:.1f} s)",
              flush=True)
    ph.figures.pop("_score_done")
    on_policy_mod.sample, on_policy_mod.sampled_logits = on_policy_mod_sample, kept_head
    del opt, loss

    # ---- teacher_nll_of_samples: the student answers (Ray task body), the teacher scores ----------
    state = {"spec": {"arch": "causal_lm", "init": "teacher", "path": str(root / "teacher"), "layers": every},
             "model": {k: v.detach().clone() for k, v in student.state_dict().items()}}
    del student
    ph.start("sample_eval_decode")
    limits = budgets(prompts, a.new, max_len)
    samples = _sample_task(state, prompts, limits, eos, pad, 0.0, 0)  # greedy, 1 thread: as the Ray task runs it
    torch.set_num_threads(a.threads)
    labels = labels_of(samples)
    ph.end(tokens=len(labels))
    ph.start("sample_eval_score")
    scores = score_samples({"t": LocalHandle(teacher)}, prompts, samples, pad, a.k)
    nll, _ = ensemble_nll_per_token([scores["t"]], [1.0], "mean_prob", 1.0, labels, a.k, V)
    ph.end(tokens=len(labels), logits_bytes=8 * max_len * V * 4.0)  # score_samples sends 8 answers per call
    ph.figures["teacher_nll_of_samples"] = float(nll.mean())
    del state, samples, scores

    # ---- distill generate: one block through generate_with, cross-scored, one part table ------------
    ph.start("generate_decode")
    seeds = [[i] for i in range(B)]
    out = generate_with(teacher, prompts, seeds, {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": a.new,
                                                  "eos_ids": eos, "pad_id": pad})
    gen = [s for per in out for s in per]
    ph.end(tokens=sum(len(s["tokens"]) for s in gen), logits_bytes=B * max_len * V * 4.0)
    ph.start("generate_cross_score")
    block = [SimpleNamespace(id=str(i), row=i, ids=p) for i, p in enumerate(prompts)]
    cross = _cross_score({"t": LocalHandle(teacher)}, block, gen, 1, pad)
    table = _part_table(block, "t", 1, gen, cross)
    ph.end(tokens=sum(len(s["tokens"]) for s in gen), logits_bytes=B * max_len * V * 4.0)
    ph.figures["generate_part_rows"] = table.num_rows
    # A larger block (generate.block_size x generate.n rows in one `score`): the block's samples
    # tiled to --cross-rows rows, scored with the head chunked (packing.topk_at) and, side by side,
    # with every position's logits at once (CHUNK_ELEMENTS unbounded: what `score` did before).
    import orchestrator.packing as packing

    big_block = [block[i % B] for i in range(a.cross_rows)]
    big_gen = [gen[i % B] for i in range(a.cross_rows)]
    n_big = sum(len(s["tokens"]) for s in big_gen)
    chunked = packing.CHUNK_ELEMENTS
    for name, elements in (("cross_score_big_chunked", chunked), ("cross_score_big_unchunked", 2**62)):
        packing.CHUNK_ELEMENTS = elements
        ph.start(name)
        got = _cross_score({"t": LocalHandle(teacher)}, big_block, big_gen, 1, pad)
        ph.end(tokens=n_big, logits_bytes=n_big * V * 4.0)  # here: one [N, V] float32 of the N scored positions
        ph.figures[f"{name}_nll_sum"] = float(sum(x.sum() for x in got["t"]))
    packing.CHUNK_ELEMENTS = chunked
    ph.figures["cross_rows"] = a.cross_rows

    result = {"ratios": {}, "figures": ph.figures}
    if a.out:
        out_file = Path(a.out)
        value = ph.figures
        if a.key:
            value = {**(json.loads(out_file.read_text()) if out_file.exists() else {}), a.key: ph.figures}
        out_file.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
