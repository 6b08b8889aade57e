"""On-policy vs off-policy KD on the instruction example, side by side: `python -m jobs.lm_on_policy [overrides]`.

1. examples/lm_instruct.yaml without its hard-label baseline: the off-policy KD student;
2. examples/lm_on_policy.yaml (fraction 0.5) on the same label store, same seed, same steps;
3. for both students, from their report.json: the held-out reference perplexity and
   `teacher_nll_of_samples`, the teacher ensemble's NLL per token of the student's own greedy
   responses to the held-out prompts (eval.sample_max_new_tokens 64; orchestrator/sample_eval.py,
   scored through the Serve teachers at evaluation), written to runs/<name>/on_policy_comparison.json.

Overrides apply to both runs (e.g. `train.seed=1`).
"""
import json
import sys
from pathlib import Path

import torch

from orchestrator.cli import main
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 64


def samples_summary(report: dict) -> dict:
    """A student's teacher_nll_of_samples and its answers' figures, as evaluation reported them."""
    samples = report["samples"]
    return {"teacher_nll_of_samples": report["teacher_nll_of_samples"], "tokens": samples["tokens"],
            "finished": samples["finished"], "prompts": samples["prompts"]}


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
        args = [str(ROOT / "examples" / example), f"eval.sample_max_new_tokens={MAX_NEW}", *overrides, f"run.name={run}",
                "eval.baseline=false", store]
        if code := main(["run", *args]):
            sys.exit(code)
        cfg = load_config(args[0], args[1:])
        report = json.loads((cfg.run_dir / "report.json").read_text())["models"]["student"]
        history = torch.load(cfg.run_dir / "students" / "student.pt", weights_only=False)["history"]
        result[label] = {"perplexity": report["perplexity"], "steps": sum(h["steps"] for h in history),
                         **samples_summary(report),
                         "on_policy_history": [{k: v for k, v in h.items() if k.startswith("on_policy")}
                                               for h in history if "on_policy_fraction" in h]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "on_policy_comparison.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'student':<16} {'steps':>6} {'reference ppl':>14} {'teacher NLL of greedy samples':>30}")
    for label, r in result.items():
        print(f"{label:<16} {r['steps']:>6} {r['perplexity']:>14.2f} {r['teacher_nll_of_samples']:>30.4f}")
