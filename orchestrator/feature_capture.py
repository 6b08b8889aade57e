"""Capturing a classifier teacher's intermediate features in its forward pass (``teachers[].features``).

- ``hf``: hidden-state indices into ``output_hidden_states`` (0 = the embeddings, i = after layer i;
  negative indices count from the last).
- ``torch``: module names (as ``named_modules()`` gives them), captured by forward hooks; only a
  ``module: pkg.mod:Class`` + state_dict teacher has hookable modules (TorchScript takes no hooks).
Token-level outputs [B, L, D] are pooled by ``pool``: ``cls`` (position 0), ``mean`` (over the
attention mask's tokens) or ``none`` (kept [B, L, D]); [B, D] outputs are kept as they are.
Pure torch: no Ray.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import DistillError


def pool_tokens(x: torch.Tensor, pool: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, D] -> [B, D] (cls, mean over mask) or [B, L, D] (none); [B, D] unchanged."""
    if x.dim() == 2 or pool == "none":
        return x
    if x.dim() != 3:
        raise ValueError(f"pool {pool} needs [batch, length, dim] features, got {list(x.shape)}")
    if pool == "cls":
        return x[:, 0]
    m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    return (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)


def check_layers(cfg: dict) -> None:
    """Before any deployment (in the driver, no weights loaded): every teachers[].features entry
    names a hidden state / module the teacher has. Raises a one-line DistillError."""
    name, layers = cfg["name"], cfg.get("features") or []
    if not layers:
        return
    if cfg["backend"] == "hf":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg["path"], local_files_only=True,
                                            trust_remote_code=bool(cfg.get("trust_remote_code")))
        n = getattr(config, "num_hidden_layers", None)
        _check_indices(name, layers, n)
        return
    import importlib

    mod, cls = cfg["module"].split(":")
    try:
        with torch.device("meta"):  # the module tree only: no memory for weights
            model = getattr(importlib.import_module(mod), cls)(**cfg.get("kwargs", {}))
    except Exception as e:  # noqa: BLE001  (the user's module: say which and why, on one line)
        raise DistillError(f"teacher '{name}': cannot build {cfg['module']} to check its features: "
                           f"{type(e).__name__}: {e}") from None
    _check_modules(name, layers, dict(model.named_modules()))


def _check_indices(name: str, layers: list, n: int | None) -> None:
    bad = [i for i in layers if n is not None and not -(n + 1) <= i <= n]
    if bad:
        raise DistillError(f"teacher '{name}': features index {bad[0]} out of range: the model has {n + 1} "
                           f"hidden states (0 = embeddings .. {n})")


def _check_modules(name: str, layers: list, modules: dict) -> None:
    for layer in layers:
        if layer not in modules:
            names = ", ".join(n for n in list(modules)[1:13] if n)
            raise DistillError(f"teacher '{name}': no module '{layer}' for features (modules: {names}, ...)")


class FeatureCapture:
    """Set up once per teacher; ``collect`` after each forward gives {layer: float32 numpy}."""

    def __init__(self, name: str, backend: str, model: nn.Module, layers: list, pool: str):
        self.name, self.backend, self.pool = name, backend, pool
        self.layers = list(layers)
        self._seen: dict[str, torch.Tensor] = {}
        if backend == "hf":
            _check_indices(name, self.layers, getattr(model.config, "num_hidden_layers", None))
            return
        if isinstance(model, torch.jit.ScriptModule):
            raise DistillError(f"teacher '{name}': features by module name need a `module: pkg.mod:Class` + state_dict "
                               "teacher (a TorchScript file takes no forward hooks)")
        modules = dict(model.named_modules())
        _check_modules(name, self.layers, modules)
        for layer in self.layers:
            modules[layer].register_forward_hook(self._hook(layer))

    def reset(self) -> None:
        self._seen = {}

    def _hook(self, layer: str):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self._seen[layer] = out.detach()
        return hook

    def collect(self, hidden_states=None, mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """The captured features of the last forward (hf: from its hidden_states), pooled."""
        if self.backend == "hf":
            raw = {str(i): hidden_states[i] for i in self.layers}
        else:
            missing = [layer for layer in self.layers if layer not in self._seen]
            if missing:
                raise DistillError(f"teacher '{self.name}': module '{missing[0]}' did not run in the forward pass; "
                                   "name a module the model calls")
            raw, self._seen = {layer: self._seen[layer] for layer in self.layers}, {}
        out = {}
        for layer, x in raw.items():
            try:
                out[layer] = pool_tokens(x.float(), self.pool, mask).cpu().numpy()
            except ValueError as e:
                raise DistillError(f"teacher '{self.name}' feature {layer}: {e}; use pool: none") from None
        return out
