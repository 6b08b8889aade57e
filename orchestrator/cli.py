"""`distill` command line: run | label | train | eval | inspect.

Every user error (config, data, teacher, store) ends as one line `error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import DistillError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Multi-teacher knowledge distillation on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "all stages: label, train, evaluate, report"),
                        ("label", "label the dataset with the teachers into the store"),
                        ("train", "train the student (and the hard-label baseline) on the store"),
                        ("eval", "evaluate teachers, ensemble and students; write the report")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="run config YAML")
        s.add_argument("overrides", nargs="*", help="section.key=value overrides")
        s.add_argument("-q", "--quiet", action="store_true", help="warnings and the result only")
        if name == "label":
            s.add_argument("--reensemble", action="store_true",
                           help="recompute the soft labels from stored teacher outputs (no teacher calls)")
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


def _run(args) -> None:
    from . import metrics
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    with metrics.endpoint(cfg.metrics.port, cfg.metrics.linger_s):
        _command(args, cfg)


def _command(args, cfg) -> None:
    from . import pipeline

    if args.command == "run":
        out = pipeline.run(cfg)
        print(out["table"])
        print(f"report: {out['report']}")
        return
    prep = pipeline.prepare(cfg)
    if args.command == "eval":
        out = pipeline.evaluate_and_report(cfg, prep)
    elif args.command == "label":
        with pipeline.ray_session(cfg):
            store = pipeline.label(cfg, prep, reensemble=args.reensemble)
        _inspect(store.uri, as_json=False)
        return
    else:  # train: a missing or damaged store is refused before Ray starts
        store = pipeline.open_complete_store(cfg, prep)
        with pipeline.ray_session(cfg):
            pipeline.train_students(cfg, prep, store)
        print(f"trained students in {cfg.run_dir / 'students'}")
        return
    print(out["table"])
    print(f"report: {out['report']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s")
    if quiet:
        os.environ["DISTILL_QUIET"] = "1"
    try:
        if args.command == "inspect":
            _inspect(args.store, args.json)
        else:
            _run(args)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        os.environ.pop("DISTILL_QUIET", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
