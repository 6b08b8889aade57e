"""train.gradient_checkpointing at a real size: one LM train step (actors.student._lm_step, the fused
head + kd loss, as the workers run it) of a ~100M student (Llama-shaped, vocabulary 49,152, random
weights from a config) on B x L tokens, with and without transformers' non-reentrant gradient
checkpointing, side by side. Each setting runs in its own process so that its peak RSS is its own.

Measured per setting: the bytes autograd keeps for backward at the end of the forward (the
activations; benchmarks.common.activations_kept), the process's peak RSS, and the mean time of a train step (forward +
backward, after one warm-up step). Also asserted: the same loss and gradients either way.

    python -m benchmarks.scale_gradient_checkpointing [--batch 4] [--len 512] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import activations_kept

K = 16
CONFIG = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 640, "intermediate_size": 2048,
          "num_hidden_layers": 12, "num_attention_heads": 10, "num_key_value_heads": 2, "max_position_embeddings": 2048,
          "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


def one_setting(checkpointing: bool, batch: int, length: int, steps: int, grads_out: str) -> dict:
    from actors.student import _lm_step
    from orchestrator.fused_head import FusedHead
    from orchestrator.losses import build_topk_loss
    from orchestrator.students import build_lm_student

    torch.manual_seed(0)
    model = build_lm_student({"init": "scratch", "config": CONFIG}).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, CONFIG["vocab_size"], (batch, length), generator=g)
    sel = torch.ones(batch, length - 1, dtype=torch.bool)
    ids = torch.stack([torch.randperm(CONFIG["vocab_size"], generator=g)[:K] for _ in range(batch * (length - 1))])
    lps = torch.log_softmax(torch.randn(batch * (length - 1), K + 1, generator=g), -1)[:, :K]
    data = {"input_ids": x, "sel": sel, "gaps": ids.view(batch, length - 1, K), "codes": lps.view(batch, length - 1, K)}
    loss_fn, head = build_topk_loss("kd", alpha=0.5, temperature=2.0), FusedHead(model)

    kept, times = {}, []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if i == 0:
            with activations_kept(model, kept):
                loss, _ = _lm_step(model, loss_fn, data, {"k": K}, head=head)
        else:
            loss, _ = _lm_step(model, loss_fn, data, {"k": K}, head=head)
        loss.backward()
        if i:  # the first step is a warm-up (and the one whose saved bytes are counted)
            times.append(time.perf_counter() - t0)
    torch.save({n: p.grad for n, p in model.named_parameters()}, grads_out)
    return {"gradient_checkpointing": checkpointing, "loss": loss.item(), "saved_for_backward_gib": kept["bytes"] / 2**30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "step_s": sum(times) / len(times), "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process: one setting
    ap.add_argument("--grads", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results_gradient_checkpointing.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print("RESULT " + json.dumps(one_setting(args.one == "on", args.batch, args.len, args.steps, args.grads)))
        return
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    rows = {}
    for setting in ("off", "on"):
        cmd = [sys.executable, "-m", "benchmarks.scale_gradient_checkpointing", "--one", setting, "--batch",
               str(args.batch), "--len", str(args.len), "--steps", str(args.steps), "--grads", str(tmp / setting)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[setting] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        print(setting, rows[setting], flush=True)
    off, on = (torch.load(tmp / s) for s in ("off", "on"))
    worst = max(((off[n] - on[n]).abs().max() / off[n].abs().max().clamp_min(1e-12)).item() for n in off)
    assert abs(rows["on"]["loss"] - rows["off"]["loss"]) < 1e-5 * abs(rows["off"]["loss"]) and worst < 1e-4, worst
    result = {"config": CONFIG, "batch": args.batch, "len": args.len, "k": K, "settings": rows,
              "max_relative_grad_diff": worst,
              "saved_ratio": rows["on"]["saved_for_backward_gib"] / rows["off"]["saved_for_backward_gib"],
              "peak_rss_saved_gib": rows["off"]["peak_rss_gib"] - rows["on"]["peak_rss_gib"],
              "step_time_ratio": rows["on"]["step_s"] / rows["off"]["step_s"]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
