"""The run report: report.json (read by tools), report.md (read by people), PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = {
    "classification": ("accuracy", "nll", "params", "latency_ms", "agreement_with_ensemble"),
    "lm": ("perplexity", "teacher_nll_of_samples", "nll", "accuracy", "params", "latency_ms", "agreement_with_ensemble"),
}
OPTIONAL = ("teacher_nll_of_samples",)  # a column only when some model has it (eval.sample_max_new_tokens)
HEADLINE = {"classification": "accuracy", "lm": "perplexity"}


def table(models: dict, task: str = "classification") -> str:
    """The report table as GitHub markdown (also what the CLI prints)."""
    cols = [c for c in COLUMNS[task] if c not in OPTIONAL or any(c in m for m in models.values())]
    lines = ["| model | kind | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for name, m in models.items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append("" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4f}")
        lines.append(f"| {name} | {m.get('kind', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(run_dir: Path, models: dict, curves: dict[str, list[dict]], metric: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        ax.scatter(m["params"], m[metric], s=40, label=name)
        ax.annotate(name, (m["params"], m[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xscale="log", xlabel="parameters (log)", ylabel=f"held-out {metric}", title=f"{metric.capitalize()} vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / f"{metric}_vs_params.png", dpi=120)
    plt.close(fig)
    out = [f"{metric}_vs_params.png"]

    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, hist in curves.items():
            ax.plot([h["epoch"] + 1 for h in hist], [h["loss"] for h in hist], marker=".", label=name)
        ax.set(xlabel="epoch", ylabel="training loss (own objective, log)", yscale="log", title="Training curves")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "training_curves.png", dpi=120)
        plt.close(fig)
        out.append("training_curves.png")
    return out


def write_report(run_dir: Path, run: str, task: str, results: dict, curves: dict, extra: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(run_dir, results["models"], curves, HEADLINE[task])
    report = {"run": run, "task": task, **results, "curves": curves, "plots": plots, **extra}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False))
    md = [
        f"# Distillation report: {run}",
        "",
        f"Held-out rows: {results['test_rows']}. Ensemble scored as `{results['ensemble_eval_mode']}` at T=1; "
        "latency is the median of single-sample calls on one thread (the ensemble's is the sum of its teachers').",
        *([f"LM: perplexity over {results['test_tokens']} held-out next tokens; `accuracy` is top-1 next-token "
           "accuracy. The ensemble's perplexity is "
           + (f"approximate: {results['models']['ensemble']['approximation']}."
              if "approximation" in results["models"]["ensemble"] else
              "exact (each teacher's own probability of the true token, mixed by the ensemble's weights).")]
          if task == "lm" else []),
        *([f"`teacher_nll_of_samples`: the teacher ensemble's NLL per token of each student's own answers to the "
           f"held-out prompts (eval.sample_max_new_tokens {sampled['max_new_tokens']}, temperature "
           f"{sampled['temperature']}; lower: the teachers would have written it)."]
          if (sampled := next((m["samples"] for m in results["models"].values() if "samples" in m), None)) else []),
        "",
        table(results["models"], task),
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(md))
    return run_dir / "report.json"
