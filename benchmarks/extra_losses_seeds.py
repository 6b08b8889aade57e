"""Response-only KD against response + feature (+ relation) KD (train.extra_losses) for the small
transformer student of examples/cls_features.yaml, over train.seed 0, 1, 2 at the same budget.

One Ray session: the store (soft labels + the teachers' features) is labeled once; per seed the
students train side by side, each on the same steps: the response loss only, plus the config's
feature terms (hint / attention), plus all its terms (feature + relation); each exported
and scored on the held-out split (539 digits) from its save_pretrained dir, as the report scores it.
Writes benchmarks/results_extra_losses.json: per-seed accuracies, mean and population SD per variant.

    flock /tmp/ray-tests.lock python -m benchmarks.extra_losses_seeds [--seeds 0 1 2] [--config ...]
        [--set KEY=VALUE ...] [--name xl] [--out FILE]   (--set: config overrides for every run, e.g. the student)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

OUT = Path(__file__).with_name("results_extra_losses.json")


def accuracy(export_dir: str, test) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification

    from orchestrator.cls_students import cls_logits
    from orchestrator.datasets import features_of

    model = AutoModelForSequenceClassification.from_pretrained(export_dir, local_files_only=True).eval()
    with torch.no_grad():
        pred = cls_logits(model, torch.from_numpy(features_of(test))).argmax(1).numpy()
    return float((pred == test.column("label").to_numpy()).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="examples/cls_features.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (section.key=value) for every run")
    ap.add_argument("--name", default="xl", help="run.name prefix of the students' run dirs")
    args = ap.parse_args()

    from orchestrator.config import load_config
    from orchestrator.pipeline import label, prepare, ray_session, train

    base = load_config(args.config, args.set)
    terms = base.train.extra_losses
    prep = prepare(base)
    variants = {"response": [], "response+feature": [t for t in terms if t["kind"] in ("hint", "attention")],
                "response+feature+relation": terms}
    rows: dict[str, dict[int, float]] = {k: {} for k in variants}
    seconds: dict[str, list[float]] = {k: [] for k in rows}
    with ray_session(base, quiet=True):
        store = label(base, prep)
        for seed in args.seeds:
            for variant, extra in variants.items():
                cfg = load_config(args.config, [*args.set, f"train.seed={seed}", f"run.name={args.name}_{seed}_{len(extra)}",
                                                f"store.path={base.store_path}"])
                cfg.train.extra_losses = extra
                t0 = time.perf_counter()
                state = train(cfg, prep, store, "student", cfg.train.loss, cfg.train.alpha, extra_losses=extra)
                seconds[variant].append(time.perf_counter() - t0)
                rows[variant][seed] = accuracy(state["export"], prep.test)
                print(f"seed {seed} {variant}: {rows[variant][seed]:.4f} ({seconds[variant][-1]:.0f} s)", flush=True)
    result = {"config": args.config, "overrides": args.set, "seeds": args.seeds, "extra_losses": terms, "test_rows": prep.test.num_rows,
              "accuracy": rows, "train_seconds": seconds,
              "mean": {k: statistics.fmean(v.values()) for k, v in rows.items()},
              "population_sd": {k: statistics.pstdev(v.values()) for k, v in rows.items()}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("mean", "population_sd")}))


if __name__ == "__main__":
    main()
