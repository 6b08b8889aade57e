"""A teacher that logs every call (to count teacher work across runs) and can be slowed down
(so a fault can be injected while labeling is under way)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from tests.helpers import train_tiny


class CountingTeacher(nn.Module):
    """A linear digits classifier; each forward appends "<tag> <rows> <pid>" to ``log``."""

    def __init__(self, log: str, tag: str, delay: float = 0.0):
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.log, self.tag, self.delay = log, tag, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{self.tag} {x.shape[0]} {os.getpid()}\n".encode())  # one small O_APPEND write: atomic
        os.close(fd)
        return self.net(x / 16.0)


def counting_teachers(root: Path, log: Path, delay: float) -> list[dict]:
    """Two counting teachers (different weights) as teachers[] entries."""
    out = []
    root.mkdir(parents=True, exist_ok=True)
    for name, seed in (("a", 1), ("b", 2)):
        path = root / f"{name}.pt"
        if not path.exists():
            torch.save({f"net.{k}": v for k, v in train_tiny(0, seed=seed).net.state_dict().items()}, path)
        out.append({"name": name, "backend": "torch", "path": str(path), "module": "tests.helpers_faults:CountingTeacher",
                    "kwargs": {"log": str(log), "tag": name, "delay": delay}, "num_cpus": 0.25, "max_batch_size": 50})
    return out


def teacher_calls(log: Path) -> list[tuple[str, int, int]]:
    """(teacher, rows, pid) per call, in call order."""
    lines = log.read_text().split("\n") if log.exists() else []
    return [(t, int(r), int(p)) for t, r, p in (ln.split() for ln in lines if ln)]
