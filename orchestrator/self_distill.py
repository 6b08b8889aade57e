"""Born-again self-distillation (Furlanello et al., 2018): generation g+1 is a student of the same
shape, distilled from generation g's trained student, which is served as a teacher through the
same Serve path as any other. No Ray here: this module builds each generation's ordinary run
config and the combined report; jobs/self_distill.py runs the generations with pipeline.run.

  generation 1   gen1="hard" (default, as in born-again networks): the config's student on hard
                 labels (train.loss kd with alpha 1, which is plain cross-entropy; no baseline).
                 The config's teachers still label its store (the pipeline trains from a store)
                 and are scored in its report. gen1="teachers": the config as written.
  generation g   the config with teachers: [{name: gen{g-1}, the exported student of g-1}],
                 eval.baseline off; loss, alpha, temperature, budget and seed as written.
Each generation is its own run, `<run.name>_gen<g>`, so a re-run skips finished generations.

How a student is served: `student.arch: hf` as its save_pretrained dir (backend hf);
`student.arch: mlp` as orchestrator.models:MLPStudent + its state_dict (backend torch).
Every generation starts as the config says: scratch and pretrained students as written; an
`init: teacher` student (kept layers of a teacher that generation 2 no longer has) from the same
weights, written once as a save_pretrained dir (`<run.name>/student_init/`) and loaded from there.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

from .config import DistillConfig, config_from_dict
from .errors import DistillError

GEN1_MODES = ("hard", "teachers")
MLP_MODULE = "orchestrator.models:MLPStudent"


def check_self_distill(cfg: DistillConfig, generations: int) -> None:
    """Refuse, before any work, what self-distillation cannot run."""
    if generations < 1:
        raise DistillError(f"--generations: must be 1 or more (got {generations}); generation 1 is the first student")
    if cfg.task != "classification":
        raise DistillError(f"task: self-distillation serves each generation's student as the next one's teacher, which "
                           f"it does for task classification students (student.arch mlp or hf), not task {cfg.task}; "
                           "use `distill run` for this config")
    if cfg.train.extra_losses:
        raise DistillError("train.extra_losses: generations 2+ learn from one served student that captures no "
                           "teacher features; remove train.extra_losses to self-distil")


def run_name(name: str, g: int) -> str:
    return f"{name}_gen{g}"


def generation_config(base: DistillConfig, g: int, gen1: str = "hard", prev: DistillConfig | None = None) -> DistillConfig:
    """Generation g's ordinary run config (prev: generation g-1's, trained, for g >= 2)."""
    if gen1 not in GEN1_MODES:
        raise DistillError(f"--gen1: {gen1!r} is not one of {', '.join(GEN1_MODES)}")
    tree = copy.deepcopy(base.model_dump(mode="json", exclude_unset=True))  # what the user wrote (+ overrides)
    tree.setdefault("run", {})["name"] = run_name(base.run.name, g)
    if tree.get("store", {}).get("path"):  # one store per generation: each has other teachers
        path, sep, query = tree["store"]["path"].partition("?")
        tree["store"]["path"] = f"{path.rstrip('/')}_gen{g}{sep}{query}"
    if g == 1:
        if gen1 == "hard":
            tree.setdefault("train", {}).update(loss="kd", alpha=1.0)
            tree.setdefault("eval", {})["baseline"] = False  # it would be the same student again
        return config_from_dict(tree, source=f"generation {g}")
    if prev is None:
        raise ValueError("generation_config: generation g >= 2 needs generation g-1's config")
    tree["teachers"] = [served_teacher(prev, f"gen{g - 1}", base.teachers[0])]
    tree.setdefault("eval", {})["baseline"] = False
    if base.student.arch == "hf" and base.student.init == "teacher":
        student = tree["student"]
        student.pop("teacher", None), student.pop("layers", None)
        student.update(init="pretrained", path=str(student_init_dir(base)))
    return config_from_dict(tree, source=f"generation {g}")


def served_teacher(prev: DistillConfig, name: str, like) -> dict:
    """The teacher entry that serves `prev`'s trained student (placed like the config's first teacher, `like`)."""
    students = prev.run_dir / "students"
    placement = {"num_cpus": like.num_cpus, "num_gpus": like.num_gpus, "resources": dict(like.resources)}
    if prev.student.arch == "hf":
        return {"name": name, "backend": "hf", "path": str((students / "student").resolve()), **placement}
    import torch

    state = torch.load(students / "student.pt", map_location="cpu", weights_only=False)
    spec = state["spec"]
    weights = students / "student.state_dict.pt"  # the torch backend loads a bare state_dict
    buf = io.BytesIO()
    torch.save(state["model"], buf)
    if not weights.exists() or weights.read_bytes() != buf.getvalue():  # unchanged bytes: same fingerprint
        tmp = weights.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(weights)
    # mean / std are buffers in the state_dict: the kwargs give only the shape.
    kwargs = {"in_dim": spec["in_dim"], "num_classes": spec["num_classes"], "hidden": list(spec["hidden"])}
    return {"name": name, "backend": "torch", "module": MLP_MODULE, "kwargs": kwargs,
            "path": str(weights.resolve()), **placement}


def student_init_dir(base: DistillConfig) -> Path:
    """An `init: teacher` student's starting weights (embeddings, kept layers, head: all copied,
    nothing random) as a save_pretrained dir, so later generations start where generation 1 did."""
    from .cls_students import build_cls_student, export_cls_student

    spec = {"arch": "hf", **base.student_spec_source}
    out = base.run_dir / "student_init"
    export_cls_student(build_cls_student(spec), spec, out)  # rewritten each time: its teacher may have changed
    return out.resolve()


def finished(cfg: DistillConfig) -> bool:
    """A generation whose report was written for this very config and these very teachers
    (a retrained generation g-1 changes generation g's teacher fingerprint)."""
    from .prepare import teacher_identities

    path = cfg.run_dir / "report.json"
    if not path.is_file() or not (cfg.run_dir / "students" / "student.pt").is_file():
        return False
    report = json.loads(path.read_text())
    stored = [(t["name"], t["fingerprint"]) for t in (report.get("store") or {}).get("teachers", [])]
    return report.get("config") == cfg.model_dump(mode="json") and stored == [
        (t["name"], t["fingerprint"]) for t in teacher_identities(cfg)]


def combined_report(base: DistillConfig, cfgs: list[DistillConfig], gen1: str) -> dict:
    """Every generation's held-out scores beside generation 1's teachers (and ensemble, baseline):
    `<output_dir>/<run.name>/self_distill.json` and `self_distill.md`."""
    reports = [json.loads((c.run_dir / "report.json").read_text()) for c in cfgs]
    first = "hard labels" if gen1 == "hard" else "teachers " + ", ".join(t.name for t in base.teachers)
    rows = []
    for g, (c, r) in enumerate(zip(cfgs, reports), 1):
        m = r["models"]["student"]
        rows.append({"model": f"gen{g}", "kind": "student", "learned_from": first if g == 1 else f"gen{g - 1}",
                     "run": c.run.name, "accuracy": m["accuracy"], "nll": m["nll"], "params": m["params"],
                     "student": str(c.run_dir / "students" / ("student" if c.student.arch == "hf" else "student.pt"))})
    others = [{"model": n, "kind": m.get("kind", ""), "learned_from": "hard labels" if n == "student_hard" else "",
               "run": cfgs[0].run.name, "accuracy": m["accuracy"], "nll": m["nll"], "params": m["params"]}
              for n, m in reports[0]["models"].items() if n != "student"]
    out = {"run": base.run.name, "gen1": gen1, "generations": rows, "generation1_others": others,
           "test_rows": reports[0]["test_rows"]}
    lines = [f"# Self-distillation: {base.run.name}", "",
             f"Held-out rows: {out['test_rows']}. Generation g+1 learned from generation g's student, served "
             "as its only teacher; the rows below the generations are generation 1's run.", "",
             "| model | kind | learned from | accuracy | nll | params |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['kind']} | {r['learned_from']} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['params']:,} |"
              for r in rows + others]
    out["table"] = "\n".join(lines[4:])
    base.run_dir.mkdir(parents=True, exist_ok=True)
    (base.run_dir / "self_distill.json").write_text(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=2))
    (base.run_dir / "self_distill.md").write_text("\n".join(lines) + "\n")
    out["report"] = str(base.run_dir / "self_distill.json")
    return out
