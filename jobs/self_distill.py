"""Born-again self-distillation: `python -m jobs.self_distill CONFIG [--generations N] [--gen1 hard|teachers] [overrides]`.

Generation 1 is the config's student on hard labels (default; `--gen1 teachers`: distilled from
the config's teachers); each next generation is the same student distilled from the previous
generation's exported student, served as its only teacher through Serve. Each generation is an
ordinary `distill run` (runs/<run.name>_gen<g>/): a re-run skips finished generations and
resumes an unfinished one. The combined report is runs/<run.name>/self_distill.{json,md}.
How each generation's config is built: orchestrator/self_distill.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack

from orchestrator import metrics, pipeline
from orchestrator.config import load_config
from orchestrator.errors import DistillError
from orchestrator.self_distill import GEN1_MODES, check_self_distill, combined_report, finished, generation_config

log = logging.getLogger("distill")


def self_distill(config: str, overrides: list[str], generations: int, gen1: str = "hard", quiet: bool = False) -> dict:
    base = load_config(config, overrides)
    check_self_distill(base, generations)
    cfgs, ray_started = [], False
    with metrics.endpoint(base.metrics.port, base.metrics.linger_s), ExitStack() as stack:
        for g in range(1, generations + 1):
            cfg = generation_config(base, g, gen1, cfgs[-1] if cfgs else None)
            if finished(cfg):
                log.info("self-distill: generation %d (%s) is finished: skipped", g, cfg.run.name)
            else:
                source = "hard labels" if g == 1 and gen1 == "hard" else ", ".join(t.name for t in cfg.teachers)
                log.info("self-distill: generation %d (%s), learning from %s", g, cfg.run.name, source)
                if not ray_started:  # one Ray for every generation that runs; none when all are finished
                    stack.enter_context(pipeline.ray_session(base, quiet))
                    ray_started = True
                pipeline.run(cfg, quiet)
            cfgs.append(cfg)
    return combined_report(base, cfgs, gen1)


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.self_distill", description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config YAML (task classification)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--generations", default="2", help="how many students in the chain (default 2)")
    p.add_argument("--gen1", choices=GEN1_MODES, default="hard",
                   help="generation 1 learns from hard labels (default) or from the config's teachers")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and the result only")
    args, extra = p.parse_known_args(argv)
    if stray := [a for a in extra if a.startswith("-") or "=" not in a]:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides += extra  # overrides after a flag (argparse ends the positional list there)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(list(sys.argv[1:] if argv is None else argv))
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    logging.getLogger("distill").setLevel(level)
    try:
        try:
            generations = int(args.generations)
        except ValueError:
            raise DistillError(f"--generations: expected a whole number, got {args.generations!r}") from None
        out = self_distill(args.config, args.overrides, generations, args.gen1, args.quiet)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(out["table"])
    print(f"report: {out['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
