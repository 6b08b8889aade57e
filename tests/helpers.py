"""Tiny real teachers and configs for tests: trained in about a second on bundled digits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from orchestrator.datasets import features_of, load_dataset, split_indices


class _Scaled(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 16.0)


class NaNTeacher(nn.Module):
    """Returns NaN for rows whose pixel 5 is > 12 (a teacher gone wrong on part of the data)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.num_classes)
        out[x[:, 5] > 12] = float("nan")
        return out


def train_tiny(hidden: int, seed: int, num_classes: int = 10, steps: int = 150, limit: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    table = load_dataset("sklearn:digits", limit=limit)
    x, y = features_of(table), table.column("label").to_numpy()
    tr, _ = split_indices(len(x), 0.3, 0)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr]) % num_classes
    net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)) if hidden else nn.Linear(64, num_classes)
    model = _Scaled(net)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_script(model: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def make_teachers(root: Path) -> dict[str, Path]:
    """Two diverse tiny teachers (a linear model and an MLP), as TorchScript files."""
    return {
        "linear": save_script(train_tiny(0, seed=1), root / "linear.pt"),
        "mlp": save_script(train_tiny(32, seed=2), root / "mlp.pt"),
    }


def tiny_config(tmp: Path, teachers: dict[str, Path], **sections) -> dict:
    """A small but real run config as a dict (two teachers, two train workers)."""
    cfg = {
        "run": {"name": "tiny"},
        "output_dir": str(tmp / "runs"),
        "dataset": {"source": "sklearn:digits", "test_fraction": 0.3, "seed": 0},
        "teachers": [{"name": n, "backend": "torch", "path": str(p), "num_cpus": 0.25} for n, p in teachers.items()],
        "ensemble": {"mode": "mean_prob", "temperature": 2.0},
        "store": {"shard_size": 200},
        "student": {"hidden": [16]},
        "train": {"workers": 2, "cpus_per_worker": 0.5, "epochs": 4, "batch_size": 64, "lr": 0.01},
        "eval": {"baseline": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


class InfTeacher(nn.Module):
    """Returns +Inf logits for rows whose pixel 5 is > 12 (a teacher that overflows)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.num_classes)
        out[x[:, 5] > 12] = float("inf")
        return out


class TinyMLP(nn.Module):
    """train_tiny's MLP as a `module: tests.helpers:TinyMLP` + state_dict teacher (hookable
    modules: net.0, net.1, net.2), for teachers[].features."""

    def __init__(self, in_dim: int = 64, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 16.0)


def save_state_teacher(path: Path, hidden: int = 32, seed: int = 2) -> Path:
    """A trained TinyMLP saved as a state_dict (train_tiny's keys are TinyMLP's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(train_tiny(hidden, seed=seed).state_dict(), path)
    return path
