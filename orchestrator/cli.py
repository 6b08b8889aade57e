"""`distill` command line: run | label | train | eval | export | inspect | generate.

Every user error (config, data, teacher, store) ends as one line `error: ...` and exit 2.
`-q` / `--quiet` may stand anywhere: before or after the command, between overrides.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import DistillError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Multi-teacher knowledge distillation on Ray.")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and the result only (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "all stages: label, train, evaluate, report"),
                        ("label", "label the dataset with the teachers into the store"),
                        ("train", "train the student (and the hard-label baseline) on the store"),
                        ("eval", "evaluate teachers, ensemble and students; write the report")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="run config YAML")
        s.add_argument("overrides", nargs="*", help="section.key=value overrides")
        if name == "label":
            s.add_argument("--reensemble", action="store_true",
                           help="recompute the soft labels from stored teacher outputs (no teacher calls)")
    s = sub.add_parser("export", help="task lm or student.arch hf: a student checkpoint as a save_pretrained dir (transformers, vLLM)")
    s.add_argument("config", help="run config YAML")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s.add_argument("--checkpoint", help="a Ray Train checkpoint dir or state file (default: the run's final student)")
    s.add_argument("--name", default="student", help="which student: student or student_hard")
    s.add_argument("--out", help="output dir (default: output_dir/run/students/NAME)")
    s = sub.add_parser("generate", help="task lm: teachers write responses to the prompts; curated into a dataset")
    s.add_argument("config", help="run config YAML (its generate: section)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s = sub.add_parser("inspect", help="describe a label store")
    s.add_argument("store", help="store folder or URI")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _inspect(store_uri: str, as_json: bool) -> None:
    from .store import LabelStore

    store = LabelStore(store_uri)
    if not store.exists():
        raise DistillError(f"no label store at {store_uri} (manifest.json not found)")
    info = store.summary()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"store:      {info['store']}")
    print(f"rows:       {info['rows']} of {info['expected_rows']} (shards {info['shards']})")
    print(f"bytes:      {info['bytes']:,}")
    print(f"labels:     {info['label_kind']}, {info['num_classes']} classes")
    print(f"ensemble:   {info['ensemble']}")
    for t in info["teachers"]:
        print(f"teacher:    {t['name']} ({t['backend']}) fingerprint {t['fingerprint']}")
    for c in info["columns"]:
        print(f"column:     {c}")
    for c, b in (info.get("feature_bytes_per_sample") or {}).items():  # teachers[].features
        per_token = (info.get("feature_bytes_per_token") or {}).get(c)  # task lm: per labeled token too
        print(f"features:   {c}: {b:,.1f} bytes per sample" + (f", {per_token:,.1f} per token" if per_token else ""))


def _run(args, quiet: bool) -> None:
    from . import metrics
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    with metrics.endpoint(cfg.metrics.port, cfg.metrics.linger_s):
        _command(args, cfg, quiet)


def _command(args, cfg, quiet: bool) -> None:
    from . import pipeline, resources

    if args.command == "generate":  # orchestrator/generate.py
        from .generate import generate

        out = generate(cfg, quiet)
        print(f"generated: {out['total']} responses, {out['kept']} kept "
              f"(dropped: {', '.join(f'{k} {v}' for k, v in out['dropped'].items())})")
        print(f"kept per teacher: {', '.join(f'{t} {n}' for t, n in out['per_teacher'].items())}"
              + (f"; reference answers {out['references']}" if out["references"] else ""))
        if out["throughput"]:
            rates = ", ".join(f"{t} {r['tokens_per_s']:.0f}" for t, r in out["throughput"].items())
            print(f"generated tokens/s: {rates}")
        print(f"dataset: {out['dataset']}")
        print(f"next: distill run {args.config} dataset.source={out['dataset']}  (labels it with every teacher)")
        return
    if args.command == "run":
        out = pipeline.run(cfg, quiet)
    elif args.command == "eval":
        out = pipeline.evaluate_and_report(cfg, pipeline.prepare(cfg), quiet=quiet)
    elif args.command == "label":
        prep = pipeline.prepare(cfg)
        if args.reensemble:  # stored teacher outputs only: no teacher, no Ray
            store = pipeline.label(cfg, prep, reensemble=True)
        else:
            with pipeline.ray_session(cfg, quiet):
                resources.check(cfg, ("label",))
                store = pipeline.label(cfg, prep)
        _inspect(store.uri, as_json=False)
        return
    elif args.command == "export":
        from .training import export_checkpoint

        print(f"exported: {export_checkpoint(cfg, pipeline.prepare(cfg), args.checkpoint, args.name, args.out)}")
        return
    else:  # train: a missing or damaged store is refused before Ray starts
        prep = pipeline.prepare(cfg)
        store = pipeline.open_complete_store(cfg, prep)
        with pipeline.ray_session(cfg, quiet):
            resources.check(cfg, ("train",))
            pipeline.train_students(cfg, prep, store)
        print(f"trained students in {cfg.run_dir / 'students'}")
        return
    print(out["table"])
    print(f"report: {out['report']}")


QUIET_FLAGS = ("-q", "--quiet")


def _parse(argv: list[str]) -> argparse.Namespace:
    """Flags may stand between overrides (`label C --reensemble ensemble.mode=entropy`): argparse
    ends a positional list at the first flag and leaves the overrides after it unrecognised, so
    those are appended to the overrides, in order."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse only takes a flag before the subcommand or before the overrides start: take -q
    # out wherever it stands (an override always has '=', so none is ever mistaken for it).
    quiet = any(a in QUIET_FLAGS for a in argv)
    args = _parse([a for a in argv if a not in QUIET_FLAGS])
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    logging.getLogger("distill").setLevel(level)  # per call: basicConfig configures a process once
    try:
        if args.command == "inspect":
            _inspect(args.store, args.json)
        else:
            _run(args, quiet)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
