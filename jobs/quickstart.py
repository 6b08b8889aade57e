"""The quickstart, end to end on this machine: `python -m jobs.quickstart [overrides]`.

1. trains three diverse digits teachers once (MLP, CNN, tiny BERT) and caches them;
2. runs `distill run examples/quickstart.yaml`: label -> train KD student + hard baseline -> report.
"""
import sys
from pathlib import Path

from orchestrator.cli import main

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"

if __name__ == "__main__":
    from jobs.train_teachers import ensure_teachers

    ensure_teachers("artifacts/teachers/digits")
    sys.exit(main(["run", str(CONFIG), *sys.argv[1:]]))
