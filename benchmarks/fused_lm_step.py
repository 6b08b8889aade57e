"""The offline LM train step with the student's full logits vs with the fused, chunked head + loss
(orchestrator/fused_head.py), side by side in one process on a ~100M-parameter Llama (random
weights) at real vocabularies. No Ray: the step is actors/student.py ``_lm_step`` itself, called
as the train loop calls it (``head=None``: the full-logits step; ``head=FusedHead``: fused).

    python -m benchmarks.fused_lm_step [--vocab 49152 151936] [--hidden 768] [--layers 12]
        [--batch 8] [--len 256] [--steps 2] [--layouts all response hint] [--hint-dim 1024]
        [--out benchmarks/results_fused_lm_step.json] [--tiny]

Per vocabulary and loss-position layout (``all``: text windows, every position carries loss;
``response``: one example per row, loss on its second half only, position ids as packed rows
carry them; ``hint``: as ``all``, plus one train.extra_losses term, a per-token hint (mse, weight
1) from the middle hidden state to a stored teacher feature of width ``--hint-dim``, so that the
full path is LMExtraTerms' own full-logits forward and the fused path reads the same hidden states
from its logits_to_keep=1 forward), each path runs one warm-up step and then ``--steps`` measured
steps, the two paths alternating. A step is forward + loss + backward (no optimiser: the same for both paths). Per
path: seconds per step (mean) and the step's own peak RSS above its start (VmHWM reset before
each step, see benchmarks/scale_lm_online.py Phases), beside the size of one float32 [B, L, V]
logits tensor, and both paths' loss on the same batch (they must agree).
Prints `[fused_lm_step] ...` lines; writes the figures to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.scale_lm_online import GIB, _status, _trim


def _hint(a) -> list[dict]:
    """The ``hint`` layout's term, resolved as orchestrator/lm_extra_terms.py resolve_lm_terms gives it."""
    layer = a.layers // 2
    return [{"spec": {"kind": "hint", "weight": 1.0, "teacher": "t", "teacher_layer": 1, "student_layer": layer},
             "student": {"kind": "hidden", "key": layer, "shape": [a.hidden]}, "label": "hint",
             "parts": [{"teacher": "t", "column": "feat__t__1", "shape": [-1, a.hint_dim], "pool": "none",
                        "student_dim": a.hidden, "teacher_dim": a.hint_dim}]}]


def _batch(a, layout: str, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    B, L, k = a.batch, a.len, a.k
    x = torch.randint(3, vocab, (B, L), generator=g)
    sel = torch.ones(B, L - 1, dtype=torch.bool)
    out = {"input_ids": x}
    if layout == "response":  # the prompt (first half) carries no loss
        sel[:, : L // 2 - 1] = False
        out["position_ids"] = torch.arange(L).expand(B, L).clone()
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(B * (L - 1))]).view(B, L - 1, k)
    lps = torch.log_softmax(torch.randn(B, L - 1, k + 1, generator=g), -1)[..., :k]
    if layout == "hint":  # the stored teacher feature per labeled token, float16 as LMBatch gives it
        out["feat__t__1"] = (torch.randn(B, L - 1, a.hint_dim, generator=g) * sel[..., None]).half()
    return {**out, "sel": sel, "gaps": ids * sel[..., None], "codes": lps * sel[..., None]}


def _step(model, loss_fn, batch, k: int, head, terms=None) -> tuple[float, float, float]:
    """One forward + loss + backward -> (seconds, peak RSS above the start in GiB, loss)."""
    from actors.student import _lm_step

    model.zero_grad(set_to_none=True)
    _trim()
    rss0, t0 = _status("VmRSS"), time.perf_counter()
    loss, _ = _lm_step(model, loss_fn, batch, {"k": k}, terms, head)
    loss.backward()
    s = time.perf_counter() - t0
    return s, _status("VmHWM") - rss0, loss.item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--layouts", nargs="+", default=["all", "response"], choices=["all", "response", "hint"])
    ap.add_argument("--hint-dim", type=int, default=1024, help="teacher feature width of the hint layout's term")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per path (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke sizes (seconds): vocab 512, hidden 64, 2 layers")
    ap.add_argument("--out", default=None, help="write the figures here as JSON (default: nowhere)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.vocab, a.hidden, a.layers, a.batch, a.len, a.k, a.steps = [512], 64, 2, 2, 32, 4, 1
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.fused_head import FusedHead, why_not_fused
    from orchestrator.lm_extra_terms import LMExtraTerms
    from orchestrator.losses import build_topk_loss

    figures = {"hidden": a.hidden, "layers": a.layers, "batch": a.batch, "len": a.len, "k": a.k,
               "threads": a.threads, "steps": a.steps, "loss": "kd", "alpha": 0.5, "runs": {}}
    for vocab in a.vocab:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                          num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                          num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=a.len,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        model.train()
        assert why_not_fused(model) is None
        params = sum(p.numel() for p in model.parameters()) / 1e6
        head, loss_fn = FusedHead(model), build_topk_loss("kd", alpha=0.5)
        for layout in a.layouts:
            batch = _batch(a, layout, vocab)
            terms = LMExtraTerms(_hint(a), model) if layout == "hint" else None
            paths = {"full": None, "fused": head}
            got = {p: {"s": [], "peak_gib": [], "loss": None} for p in paths}
            for i in range(a.steps + 1):  # step 0: warm-up (not reported); the paths alternate
                for p, h in paths.items():
                    s, peak, loss = _step(model, loss_fn, batch, a.k, h, terms)
                    got[p]["loss"] = loss
                    if i:
                        got[p]["s"].append(s)
                        got[p]["peak_gib"].append(peak)
            run = {"vocab": vocab, "params_m": params, "layout": layout, "positions": int(batch["sel"].sum()),
                   **({"hint_layer": a.layers // 2, "hint_dim": a.hint_dim} if terms is not None else {}),
                   "logits_gib": a.batch * a.len * vocab * 4 / GIB}
            for p in paths:
                run[f"{p}_s_per_step"] = sum(got[p]["s"]) / a.steps
                run[f"{p}_peak_rss_above_start_gib"] = max(got[p]["peak_gib"])
                run[f"{p}_loss"] = got[p]["loss"]
            figures["runs"][f"vocab_{vocab}_{layout}"] = run
            print(f"[fused_lm_step] V={vocab} ({params:.0f}M params) {layout} ({run['positions']} loss positions): "
                  f"full {run['full_s_per_step']:.1f} s/step, peak +{run['full_peak_rss_above_start_gib']:.2f} GiB; "
                  f"fused {run['fused_s_per_step']:.1f} s/step, peak +{run['fused_peak_rss_above_start_gib']:.2f} GiB; "
                  f"[B, L, V] float32 {run['logits_gib']:.2f} GiB; loss {run['full_loss']:.6f} vs {run['fused_loss']:.6f}",
                  flush=True)
        del model, head
    if a.out:
        Path(a.out).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
