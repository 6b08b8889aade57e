"""The LM example, end to end: `python -m jobs.lm_quickstart [overrides]`.

1. trains the two LM teachers and the tokenizer once and caches them (jobs.train_lm_teachers);
2. distills the ensemble into the student (examples/lm_quickstart.yaml), with the hard-label
   baseline at the same number of steps;
3. as a control, distills from the best single teacher alone with the same budget, and prints
   both students' held-out perplexity side by side.
"""
import json
import sys
from pathlib import Path

from orchestrator.cli import main

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "lm_quickstart.yaml"


def _perplexity(run: str, model: str) -> float:
    return json.loads((Path("runs") / run / "report.json").read_text())["models"][model]["perplexity"]


if __name__ == "__main__":
    from jobs.train_lm_teachers import ensure_lm_teachers

    meta = ensure_lm_teachers("artifacts/teachers/lm")
    best = min(meta["teachers"], key=lambda n: meta["teachers"][n]["held_out_ppl"])
    overrides = sys.argv[1:]
    if code := main(["run", str(CONFIG), *overrides]):
        sys.exit(code)
    teacher = {"name": best, "backend": "hf", "path": f"artifacts/teachers/lm/{best}", "max_batch_size": 32}
    single = [f"run.name=lm_quickstart_{best}_only", "eval.baseline=false", f"teachers={json.dumps([teacher])}"]
    if code := main(["run", str(CONFIG), *overrides, *single]):
        sys.exit(code)
    print(f"\nheld-out perplexity  KD from ensemble: {_perplexity('lm_quickstart', 'student'):.2f}  "
          f"KD from '{best}' only: {_perplexity(f'lm_quickstart_{best}_only', 'student'):.2f}  "
          f"hard labels: {_perplexity('lm_quickstart', 'student_hard'):.2f}")
