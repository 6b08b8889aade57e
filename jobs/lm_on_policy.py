"""On-policy vs off-policy KD on the instruction example, side by side: `python -m jobs.lm_on_policy [overrides]`.

1. examples/lm_instruct.yaml without its hard-label baseline: the off-policy KD student;
2. examples/lm_on_policy.yaml (fraction 0.5) on the same label store, same seed, same steps;
3. for both students: the held-out reference perplexity (report.json) and the teachers' mixture
   NLL per token of the student's own greedy responses to the held-out prompts (max_new_tokens
   64, the teachers loaded in this process; orchestrator/curation.mixture_nll, the ensemble NLL
   that `distill generate` curates by), written to runs/<name>/on_policy_comparison.json.

Overrides apply to both runs (e.g. `train.seed=1`).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from orchestrator.cli import main
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 64


def teacher_nll_of_samples(cfg, student_dir: Path) -> dict:
    """Greedy responses of the exported student to the held-out prompts, scored by every teacher."""
    from transformers import AutoModelForCausalLM

    from orchestrator.curation import mixture_nll
    from orchestrator.generation import sample
    from orchestrator.models import load_teacher, load_tokenizer
    from orchestrator.on_policy import completion_rows
    from orchestrator.prompts import eos_ids, load_prompts

    tok = load_tokenizer(cfg.teachers[0].path)
    held_out = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"source": cfg.dataset.test_source})})
    prompts = [p.ids for p in load_prompts(held_out, tok)]
    eos = sorted({i for t in cfg.teachers for i in eos_ids(t.name, Path(t.path), tok)})
    model = AutoModelForCausalLM.from_pretrained(str(student_dir), local_files_only=True).eval()
    tokens = []
    for i in range(0, len(prompts), 16):
        out = sample(model, prompts[i:i + 16], [[0]] * len(prompts[i:i + 16]), temperature=0.0, top_p=1.0,
                     max_new_tokens=MAX_NEW, eos_ids=eos, k=1, pad_id=tok.pad_token_id)
        tokens += [s[0]["tokens"] for s in out]
    rows = completion_rows(prompts, tokens, cfg.lm.max_len, tok.pad_token_id)
    nll = [load_teacher(t.model_dump(), "lm", cfg.lm.k).score(rows)[2] for t in cfg.teachers]
    return {"teacher_nll_of_samples": mixture_nll(np.stack(nll), [t.weight for t in cfg.teachers]),
            "tokens": int(sum(len(t) for t in tokens)), "finished": float(np.mean([int(t[-1]) in eos for t in tokens])),
            "prompts": len(prompts)}


if __name__ == "__main__":
    from jobs.train_instruct_teachers import ensure_instruct_teachers

    ensure_instruct_teachers()
    torch.set_num_threads(2)
    overrides = sys.argv[1:]
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.name=")), "lm_on_policy_cmp")
    out = ROOT / "runs" / name
    store = f"store.path={out / 'store'}"
    runs = {"off_policy_kd": ("lm_instruct.yaml", f"{name}_kd"), "on_policy": ("lm_on_policy.yaml", f"{name}_on")}
    result = {}
    for label, (example, run) in runs.items():
        args = [str(ROOT / "examples" / example), *overrides, f"run.name={run}", "eval.baseline=false", store]
        if code := main(["run", *args]):
            sys.exit(code)
        cfg = load_config(args[0], args[1:])
        report = json.loads((cfg.run_dir / "report.json").read_text())["models"]["student"]
        history = torch.load(cfg.run_dir / "students" / "student.pt", weights_only=False)["history"]
        result[label] = {"perplexity": report["perplexity"], "steps": sum(h["steps"] for h in history),
                         **teacher_nll_of_samples(cfg, cfg.run_dir / "students" / "student"),
                         "on_policy_history": [{k: v for k, v in h.items() if k.startswith("on_policy")}
                                               for h in history if "on_policy_fraction" in h]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "on_policy_comparison.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'student':<16} {'steps':>6} {'reference ppl':>14} {'teacher NLL of greedy samples':>30}")
    for label, r in result.items():
        print(f"{label:<16} {r['steps']:>6} {r['perplexity']:>14.2f} {r['teacher_nll_of_samples']:>30.4f}")
