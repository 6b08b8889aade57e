"""On-policy distillation (train.on_policy), the pure part: which batches are on-policy, the
prompts of a batch, the rows the teachers score, and the ensemble of their scores. No Ray:
actors/on_policy.py runs it on the train workers against the Serve teachers.

A batch of packed instruction rows (input_ids, position_ids, loss_mask [B, L], see
orchestrator/instruct.py) holds whole examples: each starts where its position ids restart at
0, and its prompt is the tokens before its first loss token (for chat: the conversation up to
the first assistant turn's text, its generation prompt included). The student continues every
prompt; prompt + sample are packed again as instruction rows of the same length L, the sample's
tokens carrying loss, so the teachers' `score_batched` and the student see the layout they see
in offline training (and Serve can batch rows of every worker together: one L).
"""
from __future__ import annotations

import hashlib
import random

import numpy as np

from .curation import mixture_nll
from .ensemble import ensemble_topk
from .instruct import pack_examples, targets


def is_on_policy(seed: int, epoch: int, batch: int, fraction: float, every: int) -> bool:
    """Batch `batch` (0-based, within its epoch) of `epoch` is on-policy: only every `every`-th
    batch is considered, each with probability `fraction`. A function of its arguments alone
    (Python's Random seeded by a string is the same in every process), so every rank makes the
    same choice and a resumed run makes the choices the uninterrupted run made."""
    if batch % every or fraction <= 0:
        return False
    return random.Random(f"on_policy:{seed}:{epoch}:{batch}").random() < fraction


def sample_seed(seed: int, epoch: int, batch: int, rank: int, i: int) -> int:
    """The RNG seed of one student sample: batch `batch` of `epoch`, worker `rank`, prompt i."""
    digest = hashlib.sha256(f"on_policy_sample:{seed}:{epoch}:{batch}:{rank}:{i}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2^63: torch.Generator.manual_seed takes it


def prompts_of(input_ids: np.ndarray, position_ids: np.ndarray, loss_mask: np.ndarray) -> list[list[int]]:
    """Packed rows [B, L] -> each example's prompt (token ids before its first loss token), in
    row order. Segments without a loss token (padding) have no prompt and are skipped."""
    prompts = []
    for ids, pos, mask in zip(input_ids, position_ids, loss_mask):
        starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            first = np.flatnonzero(mask[a:b])
            if len(first):
                prompts.append([int(t) for t in ids[a:a + first[0]]])
    return prompts


def completion_rows(prompts: list[list[int]], samples: list[np.ndarray], max_len: int, pad_id: int) -> np.ndarray:
    """prompt + sample per example, packed as instruction rows [W, 3, max_len] (ids, position
    ids, loss mask: 1 on the sample's tokens). A sample that does not fit is cut at max_len
    (a prompt from the store is at most max_len - 1 tokens: one sampled token always fits)."""
    examples = [(np.array([*p, *s], np.int64), np.r_[np.zeros(len(p), np.uint8), np.ones(len(s), np.uint8)])
                for p, s in zip(prompts, samples)]
    ids, pos, mask, _ = pack_examples(examples, max_len, pad_id)
    return np.stack([ids, pos, mask.astype(np.int64)], axis=1)


def sampled_tokens(rows: np.ndarray) -> np.ndarray:
    """[N] the sampled token at each position that carries loss (the teachers' answer order)."""
    return rows[:, 0, 1:][targets(rows)]


def ensemble_scores(scores: dict[str, tuple], ensemble: dict, k: int, vocab_size: int,
                    tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The teachers' scores of N sampled positions -> the ensemble's top-k target and the
    mixture's NLL per token of the sampled tokens.

    Args:
        scores: per teacher name, (top-k ids [N, k], log-probs [N, k] at T=1, NLL of the
            sampled token [N]); taken in the order of ensemble["weights"] (the store's).
        ensemble: the store manifest's ensemble settings (mode, temperature, tau, weights):
            the target is built exactly as labeling builds a stored one (ensemble.ensemble_topk).
        tokens: [N] the sampled tokens (the labels of the modes that need them).
    Returns:
        (ids [N, k] int64, logprobs [N, k] float32 softened at the ensemble temperature,
        tail [N] float32, mean NLL per token of the weighted mixture at T=1: curation.mixture_nll).
    """
    names = list(ensemble["weights"])
    weights = [ensemble["weights"][n] for n in names]
    ids = np.stack([np.asarray(scores[n][0]).reshape(-1, k) for n in names])
    lps = np.stack([np.asarray(scores[n][1], np.float32).reshape(-1, k) for n in names])
    s_ids, s_lps, tail = ensemble_topk(ids, lps, k_out=k, vocab_size=vocab_size, mode=ensemble["mode"],
                                       temperature=ensemble["temperature"], weights=weights, tau=ensemble["tau"],
                                       labels=tokens)
    nll = mixture_nll(np.stack([np.asarray(scores[n][2], np.float64) for n in names]), weights)
    return s_ids, s_lps, tail, nll
