"""Sampling responses from a causal-LM teacher (backend hf). Pure torch: no Ray.

``sample(model, prompts, seeds, ...)``: prompts [P] token-id lists, seeds [P][n] -> P x n
samples, each {tokens [T] int32, finished bool, topk_ids [T, k] int32, topk_logprobs [T, k]
float32, nll [T] float32}: the generated tokens (the end-of-sequence token included when one
ended the sample), whether one did, and the teacher's own top-k log-probs (T=1, before the
sampling temperature / top-p) and NLL at every generated position.

Why a decode loop of our own instead of ``model.generate``: every sample draws from its own
``torch.Generator`` seeded by (generate.seed, prompt id, teacher, sample index), so a sample's
tokens do not depend on which other prompts shared its batch or on the RNG state of the
process; ``generate`` draws a whole batch from the global RNG. The loop is the usual one:
left-padded prompts, one forward pass over them, then one token per step with the KV cache.
"""
from __future__ import annotations

import numpy as np
import torch


# The nucleus is looked for among the top _NUCLEUS_K tokens first: a full sort of [B, V] costs
# ~0.4 s per decode step on CPU at B 32, V 151,936 (benchmarks/top_p_cost.py), top-k a fraction
# of it. Rows whose top _NUCLEUS_K do not hold more than top_p (flat distributions) are sorted
# whole, so the cut is the same as the full sort's.
_NUCLEUS_K = 1024


def _nucleus(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, K] probabilities, descending -> the same with the tokens wholly after the top-p nucleus zeroed."""
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # the first token is always kept
    return sorted_p.masked_fill(drop, 0.0)


def _filtered(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] logits -> [B, V] sampling probabilities at `temperature`, cut to the top-p nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.topk(min(_NUCLEUS_K, probs.shape[-1]), dim=-1)
    out = torch.zeros_like(probs).scatter(-1, order, _nucleus(sorted_p, top_p))
    if (flat := sorted_p.sum(-1) <= top_p).any():  # the nucleus may reach past the top _NUCLEUS_K: sort whole
        sorted_p, order = probs[flat].sort(dim=-1, descending=True)
        out[flat] = torch.zeros_like(sorted_p).scatter(-1, order, _nucleus(sorted_p, top_p))
    return out


@torch.inference_mode()
def sample(model, prompts: list[list[int]], seeds: list[list[int]], *, temperature: float, top_p: float,
           max_new_tokens: int, eos_ids: list[int], k: int, pad_id: int, device=None,
           vocab_limit: int | None = None) -> list[list[dict]]:
    """-> per prompt, its n samples (n = len(seeds[p])). temperature 0: greedy (seeds unused).
    vocab_limit: only ids below it are written (the tokenizer's tokens: a head wider than the
    tokenizer has padding rows, which a narrower teacher could not read); top-k and NLL stay the model's."""
    device = device or next(model.parameters()).device
    rows = [p for p, s in zip(prompts, seeds) for _ in s]  # B = P x n rows, prompt-major
    gens = [torch.Generator().manual_seed(int(x)) for s in seeds for x in s]
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's last prompt token at position L-1
        ids[i, L - len(r):], mask[i, L - len(r):] = torch.tensor(r), 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, top_ids, top_lps, nll = [], [], [], []  # per step: [B], [B, k], [B, k], [B]
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = _filtered(logits, temperature, top_p).cpu()
            nxt = torch.stack([torch.multinomial(probs[i], 1, generator=gens[i])[0] for i in range(B)]).to(device)
        top = logp.topk(k, dim=-1)
        tokens.append(nxt)
        top_ids.append(top.indices)
        top_lps.append(top.values)
        nll.append(-logp.gather(-1, nxt[:, None])[:, 0])
        done_before = done.clone()
        done |= torch.isin(nxt, eos)
        tokens[-1] = torch.where(done_before, -1, nxt)  # -1: past this row's end
        if done.all():
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                    use_cache=True)
    tok = torch.stack(tokens, 1).cpu().numpy()
    ti, tl = torch.stack(top_ids, 1).int().cpu().numpy(), torch.stack(top_lps, 1).cpu().numpy()
    nl = torch.stack(nll, 1).cpu().numpy()
    eos_set, samples = set(eos_ids), []
    for i in range(B):
        t = int((tok[i] >= 0).sum())
        samples.append({"tokens": tok[i, :t].astype(np.int32), "finished": bool(t and int(tok[i, t - 1]) in eos_set),
                        "topk_ids": ti[i, :t], "topk_logprobs": tl[i, :t].astype(np.float32),
                        "nll": nl[i, :t].astype(np.float32)})
    n = [len(s) for s in seeds]
    cuts = np.cumsum(n)[:-1]
    return [list(part) for part in np.split(np.array(samples, dtype=object), cuts)]


def generate_with(teacher, prompts: list[list[int]], seeds: list[list[int]], options: dict) -> list[list[dict]]:
    """What a teacher deployment runs for `distill generate`: a loaded LM teacher (models.load_teacher)
    -> `sample`'s answer. options: temperature, top_p, max_new_tokens, eos_ids, pad_id. A backend
    with its own sampler (a `generate` method of the same contract) is asked directly."""
    if hasattr(teacher, "generate"):
        return teacher.generate(prompts, seeds, options)
    if not hasattr(teacher, "model") or not hasattr(teacher, "k"):
        from .errors import DistillError

        raise DistillError(f"teacher '{getattr(teacher, 'name', '?')}': generation needs a causal-LM teacher (task lm)")
    return sample(teacher.model, prompts, seeds, k=teacher.k, device=teacher.device, **options)
