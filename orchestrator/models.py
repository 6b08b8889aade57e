"""Loading teachers (backends ``torch`` and ``hf``) and building students. Pure torch: no Ray.

A teacher is a callable ``features [B, D] float32 -> logits [B, C] float32`` at T=1. The Serve
deployment (actors/teacher.py) and the evaluation both load teachers through here, so what is
served is exactly what is evaluated.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import DistillError


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def check_teacher_files(cfg: dict) -> None:
    """Cheap driver-side checks, so a wrong path or file fails in one line before any deploy."""
    path, who = Path(cfg["path"]), f"teacher '{cfg['name']}'"
    if not path.exists():
        raise DistillError(f"{who}: path not found: {path}")
    if cfg["backend"] == "hf":
        try:
            json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise DistillError(f"{who}: {path} is not a from_pretrained directory (config.json: {e})") from None
        return
    if path.is_dir() or not zipfile.is_zipfile(path):
        raise DistillError(f"{who}: {path} is not a TorchScript or torch.save file; "
                           "save it with torch.jit.save, or torch.save(state_dict) plus `module`")


def teacher_fingerprint(cfg: dict) -> str:
    """Hash of the teacher's config (what shapes its outputs) and every weights/tokenizer file."""
    check_teacher_files(cfg)
    path = Path(cfg["path"])
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in ("backend", "module", "kwargs")}, sort_keys=True).encode())
    for f in _files(path):
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class ClassifierTeacher:
    """Loads a teacher from its config dict and runs it on feature batches."""

    def __init__(self, cfg: dict):
        self.name = cfg["name"]
        self.backend = cfg["backend"]
        path = Path(cfg["path"])
        if not path.exists():
            raise DistillError(f"teacher '{self.name}': path not found: {path}")
        try:
            self.model = self._load(cfg, path).eval()
        except DistillError:
            raise
        except Exception as e:  # a bad file is the user's input: say which teacher and why
            raise DistillError(f"teacher '{self.name}': cannot load {path}: {type(e).__name__}: {e}") from None
        self.vocab_size = getattr(getattr(self.model, "config", None), "vocab_size", None)

    def _load(self, cfg: dict, path: Path) -> nn.Module:
        if self.backend == "hf":
            from transformers import AutoModelForSequenceClassification

            return AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        if cfg.get("module"):
            mod, cls = cfg["module"].split(":")
            model = getattr(importlib.import_module(mod), cls)(**cfg.get("kwargs", {}))
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model
        return torch.jit.load(str(path), map_location="cpu")

    @torch.inference_mode()
    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: Arrow buffers are read-only
        if self.backend == "hf":
            # Sequence classifiers read integer token ids: feature values are used as ids.
            ids = x.round().long()
            if not torch.equal(ids.float(), x) or ids.min() < 0 or (self.vocab_size and ids.max() >= self.vocab_size):
                raise DistillError(
                    f"teacher '{self.name}': hf backend needs integer features in [0, {self.vocab_size}) as token ids"
                )
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        else:
            out = self.model(x)
        return out.float().numpy()


class MLPStudent(nn.Module):
    """features [B, D] -> logits [B, C]; inputs standardised by stats fixed at build time."""

    def __init__(self, in_dim: int, num_classes: int, hidden: list[int], mean=None, std=None):
        super().__init__()
        dims = [in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], num_classes))
        # Buffers, so the checkpoint carries the normalisation the student was trained with.
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else np.zeros(in_dim), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std if std is not None else np.ones(in_dim), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_student(spec: dict) -> nn.Module:
    """spec: {arch, in_dim, num_classes, hidden, mean, std} (all plain data, so it pickles)."""
    if spec["arch"] != "mlp":
        raise DistillError(f"student.arch: unknown '{spec['arch']}' (allowed: mlp)")
    return MLPStudent(spec["in_dim"], spec["num_classes"], spec["hidden"], spec.get("mean"), spec.get("std"))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
