"""Train and cache three diverse teacher classifiers on scikit-learn's digits dataset.

    python -m jobs.train_teachers [--out artifacts/teachers/digits] [--force]

The distillation pipeline needs teachers to distil from; this job makes them locally,
without downloads, in well under a minute on 2 CPU cores. Teachers see only the train
part of ``split_indices(n, test_fraction=0.3, seed=0)`` (the split the pipeline uses);
a slice of it is held back for early stopping. Held-out accuracy is measured on the
test split, after reloading each file exactly the way the pipeline will.

Outputs (under ``--out``), all fed RAW digits features (values 0..16) and returning
class logits [B, 10]:

* ``mlp.pt``  TorchScript MLP (seed 1); float32 [B, 64] in.
    backend: torch, path: OUT/mlp.pt
* ``cnn.pt``  state_dict of :class:`DigitsCNN` (seed 2); float32 [B, 64] in.
    backend: torch, module: "jobs.train_teachers:DigitsCNN", kwargs: {channels: 16, num_classes: 10}
* ``bert/``   tiny HF ``BertForSequenceClassification`` (seed 3); int64 input_ids = pixels.
    backend: hf, path: OUT/bert
* ``meta.json`` written last; a run is "cached" only if it exists, matches
  ``VERSION`` and the split, and every teacher file is present.

Importing this module is cheap (torch only; no training, no ray, no transformers).
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

VERSION = 1
SPLIT = {"test_fraction": 0.3, "seed": 0}
DEFAULT_OUT = "artifacts/teachers/digits"
FILES = {"mlp": "mlp.pt", "cnn": "cnn.pt", "bert": "bert"}
CNN_KWARGS = {"channels": 16, "num_classes": 10}


class DigitsMLP(nn.Module):
    """64 -> 256 -> 256 -> 10 MLP on raw pixels (normalised inside forward)."""

    def __init__(self, hidden: int = 256, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 16.0)  # raw pixels are 0..16


class DigitsCNN(nn.Module):
    """Small CNN over the 64 raw pixels seen as a 1x8x8 image; returns logits [B, num_classes]."""

    def __init__(self, channels: int = 16, num_classes: int = 10):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * c * 16, 64), nn.ReLU(), nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.float().reshape(-1, 1, 8, 8) / 16.0))


class _BertLogits(nn.Module):
    """Training adapter: pixels -> input_ids (0..16), all-ones mask -> BERT logits."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        return self.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _build_bert(seed: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, type_vocab_size=1, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.1,  # BERT's 0.02 learns ~5x slower on pixel tokens from scratch
    )
    return BertForSequenceClassification(config)


@contextmanager
def _quiet_hf():
    """Hide transformers' save/load progress bars, restoring the previous setting."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _accuracy(fn, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((fn(x).argmax(-1) == y).float().mean())


def _fit(model: nn.Module, data, *, seed: int, epochs: int, lr: float, batch: int = 64, patience: int = 15) -> nn.Module:
    """AdamW, one-cycle LR (warm-up then cosine); keeps the weights with the best validation accuracy."""
    xtr, ytr, xval, yval = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xtr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    best, best_state, since = -1.0, None, 0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(batch):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc = _accuracy(model, xval, yval)
        if acc >= best:  # ties: prefer the later (better-fitted) weights
            best, since = acc, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    return model.eval()


def _load_split():
    from orchestrator.datasets import features_of, load_dataset, split_indices

    table = load_dataset("sklearn:digits")
    x, y = features_of(table), table.column("label").to_numpy()
    train_idx, test_idx = split_indices(len(x), **SPLIT)
    return torch.tensor(x), torch.tensor(y), train_idx, test_idx


def _present(path: Path) -> bool:
    """A teacher file, or an HF folder holding its weights."""
    return path.is_file() or (path / "model.safetensors").is_file()


def _cached(out: Path) -> dict | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    ok = (meta.get("version") == VERSION and meta.get("split") == SPLIT
          and set(meta.get("teachers", {})) == set(FILES)
          and all(_present(out / t["file"]) for t in meta["teachers"].values()))
    return meta if ok else None


def _reload(name: str, out: Path):
    """Load a saved teacher exactly as the pipeline does; returns raw-features -> logits."""
    if name == "mlp":
        return torch.jit.load(str(out / FILES["mlp"])).eval()
    if name == "cnn":
        import importlib

        m = getattr(importlib.import_module("jobs.train_teachers"), "DigitsCNN")(**CNN_KWARGS)
        m.load_state_dict(torch.load(out / FILES["cnn"]))
        return m.eval()
    from transformers import AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(str(out / FILES["bert"]), local_files_only=True)
    return _BertLogits(bert.eval()).eval()


def ensure_teachers(out: str | Path = DEFAULT_OUT, force: bool = False) -> dict:
    """Train (or reuse cached) mlp/cnn/bert teachers under ``out``; returns the meta dict."""
    out = Path(out)
    meta = None if force else _cached(out)
    if meta is not None:
        print(f"cached: teachers in {out} (" + ", ".join(
            f"{n} acc={t['accuracy']:.4f}" for n, t in meta["teachers"].items()) + ")")
        return meta
    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a crash from here on leaves no "cached" marker

    x, y, train_idx, test_idx = _load_split()
    rng = np.random.default_rng(0)
    val_idx = rng.choice(train_idx, size=len(train_idx) // 10, replace=False)
    fit_idx = np.setdiff1d(train_idx, val_idx)
    data = (x[fit_idx], y[fit_idx], x[val_idx], y[val_idx])

    plans = {  # name: (seed, build, fit kwargs, save)
        "mlp": (1, DigitsMLP, dict(epochs=80, lr=2e-3),
                lambda m: torch.jit.save(torch.jit.script(m), str(out / FILES["mlp"]))),
        "cnn": (2, lambda: DigitsCNN(**CNN_KWARGS), dict(epochs=60, lr=3e-3),
                lambda m: torch.save(m.state_dict(), out / FILES["cnn"])),
        "bert": (3, None, dict(epochs=20, lr=3e-3, batch=64, patience=8),
                 lambda m: m.bert.save_pretrained(str(out / FILES["bert"]))),
    }
    teachers = {}
    for name, (seed, build, fit_kw, save) in plans.items():
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = _BertLogits(_build_bert(seed)) if name == "bert" else build()
        model = _fit(model, data, seed=seed, **fit_kw)
        with _quiet_hf():
            save(model)
            secs = time.perf_counter() - t0
            acc = _accuracy(_reload(name, out), x[test_idx], y[test_idx])
        params = sum(p.numel() for p in model.parameters())
        teachers[name] = {"accuracy": round(acc, 4), "params": params, "file": FILES[name],
                          "seed": seed, "train_seconds": round(secs, 1)}
        print(f"teacher {name:<4}  params={params:>7,}  train={secs:5.1f}s  held-out acc={acc:.4f}", flush=True)

    meta = {"version": VERSION, "split": SPLIT, "teachers": teachers}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / "meta.json")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="retrain even if cached outputs match")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ensure_teachers(args.out, force=args.force)
    print(f"done in {time.perf_counter() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
