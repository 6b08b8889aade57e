"""Teacher-generated data (SeqKD) on the instruction example: `python -m jobs.lm_generate [overrides]`.

1. builds/caches the chat teachers and the instruction pairs (jobs.train_instruct_teachers);
2. `distill generate examples/lm_generate.yaml generate.include_reference=true`: both teachers
   answer every train prompt, the answers are curated, and the file keeps the reference answers
   beside them (column origin); the job splits it into generated.parquet (teacher answers only)
   and mixed.parquet (both);
3. one `distill run` per training set, each with the same student, the same train.max_steps, and
   its hard-label twin (student_hard, eval.baseline):
     reference   the dataset's own answers   student: KD        student_hard: hard labels
     generated   the teachers' answers       student: SeqKD+KD  student_hard: SeqKD (hard CE)
     mixed       both                        student: KD        student_hard: hard labels
4. prints each student's held-out reference perplexity and teacher_nll_of_samples.

Overrides apply to every command (e.g. `train.seed=1 run.name=lm_generate_s1`). The generated
data and the label stores live under <output_dir>/lm_generate_data and are shared by every seed
(they do not depend on train.seed): a second seed only trains and evaluates. `--variants a,b`
runs only those training sets (`--variants none`: generate only); the table shows every
variant whose report is there. `--generated-fraction F` (0 < F <= 1) puts the teachers' answers
to only a fraction F of the prompts into the mixed set (all references stay; the prompts are
chosen by a hash of their id, so every seed gets the same ones): a smaller dose of generated data.
"""
import hashlib
import json
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.cli import main

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "lm_generate.yaml"
VARIANTS = ("reference", "generated", "mixed")


def _override(overrides: list[str], key: str, default: str) -> str:
    vals = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return vals[-1] if vals else default


def _chosen(prompt_id: str, fraction: float) -> bool:
    """Stable across runs and seeds: sha1 of the prompt id, read as a number in [0, 1)."""
    return int(hashlib.sha1(prompt_id.encode()).hexdigest(), 16) / 16 ** 40 < fraction


def _suffix(fraction: float) -> str:
    """The mixed set's name part (its file and its store alike) when it keeps a fraction below 1."""
    return "" if fraction == 1.0 else f"_f{fraction:g}"


def _split(curated: Path, fraction: float = 1.0) -> dict[str, Path]:
    """The curated file (teacher answers + reference answers) -> the two training sets; the mixed
    set keeps every reference and the teachers' answers to a `fraction` of the prompts."""
    table = pq.read_table(curated)
    teacher = pc.equal(table.column("origin"), "teacher")
    out = {"generated": curated.with_name("generated_only.parquet"), "mixed": curated.with_name(f"mixed{_suffix(fraction)}.parquet")}
    pq.write_table(table.filter(teacher), out["generated"])
    keep = [not t or _chosen(p, fraction) for t, p in zip(teacher.to_pylist(), table.column("prompt_id").to_pylist())]
    pq.write_table(table.filter(keep), out["mixed"])
    return out


def _refuse(message: str) -> None:
    """Bad input to this job: one `error:` line and exit 2, as the distill commands do."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def steps(report: dict, student: str) -> int:
    return sum(h["steps"] for h in report["curves"][student])


if __name__ == "__main__":
    from jobs.train_instruct_teachers import ensure_instruct_teachers

    ensure_instruct_teachers()
    args = sys.argv[1:]
    chosen = VARIANTS
    if "--variants" in args:
        at = args.index("--variants")
        chosen = [v for v in args[at + 1].split(",") if v != "none"]
        args = args[:at] + args[at + 2:]
        if unknown := [v for v in chosen if v not in VARIANTS]:
            _refuse(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)}, or none)")
    fraction = 1.0
    if "--generated-fraction" in args:
        at = args.index("--generated-fraction")
        try:
            fraction = float(args[at + 1])
        except (IndexError, ValueError):
            fraction = -1.0
        if not 0 < fraction <= 1:
            _refuse("--generated-fraction: give a number in (0, 1], e.g. --generated-fraction 0.33")
        args = args[:at] + args[at + 2:]
    overrides = args
    name, root = _override(overrides, "run.name", "lm_generate"), Path(_override(overrides, "output_dir", "runs"))
    data = Path(_override(overrides, "generate.output", str(root / "lm_generate_data")))
    if code := main(["generate", str(CONFIG), *overrides, f"generate.output={data}", "generate.include_reference=true"]):
        sys.exit(code)
    sources = {"reference": _override(overrides, "dataset.source", "artifacts/teachers/instruct/data/train.parquet"),
               **{k: str(v) for k, v in _split(data / "generated.parquet", fraction).items()}}
    for v in chosen:
        store = "store_" + v + (_suffix(fraction) if v == "mixed" else "")
        run = [f"run.name={name}_{v}", f"dataset.source={sources[v]}", f"store.path={data / store}"]
        if code := main(["run", str(CONFIG), *overrides, *run]):
            sys.exit(code)
    reports = {v: json.loads(p.read_text()) for v in VARIANTS if (p := root / f"{name}_{v}" / "report.json").exists()}

    labels = {("reference", "student"): "KD on reference", ("reference", "student_hard"): "hard labels on reference",
              ("generated", "student"): "SeqKD + KD on generated", ("generated", "student_hard"): "SeqKD (hard CE) on generated",
              ("mixed", "student"): "KD on generated + reference", ("mixed", "student_hard"): "hard labels on generated + reference"}
    gen = json.loads((data / "generate.json").read_text())
    print(f"\ngenerated: {gen['curation']['kept']} of {gen['curation']['total']} teacher answers kept; "
          + ", ".join(f"{t} {r['tokens_per_s']:.0f} tokens/s" for t, r in gen.get("throughput", {}).items()))
    print(f"{'student (' + name + ')':<44} {'steps':>6} {'ref ppl':>9} {'teacher NLL of samples':>23}")
    ens = next(iter(reports.values()))["models"]["ensemble"] if reports else None
    if ens:
        print(f"{'teacher ensemble':<44} {'':>6} {ens['perplexity']:>9.2f}")
    for (v, s), label in labels.items():
        if v not in reports:
            continue
        m = reports[v]["models"][s]
        print(f"{label:<44} {steps(reports[v], s):>6} {m['perplexity']:>9.2f} {m.get('teacher_nll_of_samples', float('nan')):>23.3f}")
