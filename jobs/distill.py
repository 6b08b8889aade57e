"""`ray job submit -- python -m jobs.distill CONFIG [overrides]`: the same as `distill run`."""
import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
