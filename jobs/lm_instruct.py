"""The instruction example, end to end: `python -m jobs.lm_instruct [overrides]`.

1. builds the chat teachers and the instruction pairs once and caches them
   (jobs.train_instruct_teachers);
2. distills the ensemble into a student made of the large teacher's layers
   (examples/lm_instruct.yaml: init teacher), with the same student on hard labels at the same
   steps (student_hard);
3. as a control, distills into a from-scratch student of the same shape (student.init scratch,
   student.config = the teacher-initialised student's config.json) with the same budget, reusing
   the run's label store;
4. prints the held-out response perplexities of the teachers, the ensemble and the three students.

Overrides apply to every run (e.g. `train.seed=1 run.name=lm_instruct_s1`).
"""
import json
import sys
from pathlib import Path

from orchestrator.cli import main

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "lm_instruct.yaml"


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())["models"]


def _override(overrides: list[str], key: str, default: str) -> str:
    vals = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return vals[-1] if vals else default


if __name__ == "__main__":
    from jobs.train_instruct_teachers import ensure_instruct_teachers

    ensure_instruct_teachers()
    overrides = sys.argv[1:]
    if code := main(["run", str(CONFIG), *overrides]):
        sys.exit(code)
    name = _override(overrides, "run.name", "lm_instruct")
    run_dir = Path(_override(overrides, "output_dir", "runs")) / name
    store = _override(overrides, "store.path", str(run_dir / "store"))
    # The control: the exported KD student's own config.json, trained from random weights.
    scratch_cfg = run_dir / "student_scratch_config.json"
    scratch_cfg.write_text((run_dir / "students" / "student" / "config.json").read_text())
    control = [f"run.name={name}_scratch", "student.init=scratch", f"student.config={scratch_cfg}",
               "student.teacher=null", "student.layers=null", "eval.baseline=false", f"store.path={store}"]
    if code := main(["run", str(CONFIG), *overrides, *control]):
        sys.exit(code)

    models, scratch = _report(run_dir), _report(run_dir.parent / f"{name}_scratch")
    def label(n: str, m: dict) -> str:
        if n != "ensemble":
            return f"teacher {n}"
        return f"ensemble ({'approximate' if 'approximation' in m else 'exact'}, {m['mode']})"

    rows = [(label(n, m), m) for n, m in models.items() if n not in ("student", "student_hard")]
    rows += [("student (KD, init teacher)", models["student"]), ("student_hard (hard labels, init teacher)",
                                                                 models["student_hard"]),
             ("student_scratch (KD, init scratch)", scratch["student"])]
    print(f"\nheld-out response perplexity ({name}):")
    for label, m in rows:
        print(f"  {label:<42} {m['perplexity']:>9.2f}")
