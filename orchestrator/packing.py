"""Causal-LM forward passes over LM rows: text windows, or packed instruction examples kept
apart by their position ids (see orchestrator/instruct.py). Pure torch (+ transformers): no Ray.
"""
from __future__ import annotations

import torch

from .errors import DistillError


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """LM rows as the labeler sends them -> (input ids [B, L], forward kwargs, selected [B, L-1]).

    Windows [B, L] (format text): every position is selected. Packed instruction rows
    [B, 3, L] (ids, position ids, loss mask, see orchestrator/instruct.py): the position ids go
    to the model, which then attends within each example only (models.check_packing), and the
    selected positions are those whose next token carries loss.
    """
    if rows.dim() == 2:
        return rows, {}, torch.ones(rows.shape[0], rows.shape[1] - 1, dtype=torch.bool, device=rows.device)
    # use_cache=False: transformers looks for packed sequences only when no cache is in play.
    return rows[:, 0], {"position_ids": rows[:, 1], "use_cache": False}, rows[:, 2, 1:].bool()


def check_packing(model, who: str) -> None:
    """Packed rows are right only if the model keeps examples apart given restarting position
    ids (transformers >= 5 does for models built on its masking utilities). Proved once per model
    on two short random examples: packed logits must equal each example's own."""
    if getattr(model, "_distill_packing_ok", False):
        return
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(dev) for n in (5, 7))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(dev)
    with torch.inference_mode():
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits.float()
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1).float()
    err, scale = (packed - alone).abs().max().item(), alone.abs().max().item()
    if not err <= 1e-2 * scale + 1e-3:
        raise DistillError(f"{who}: {type(model).__name__} attends across packed examples (logits differ by {err:.3g}); "
                           "set lm.packing: false (one example per window)")
    model._distill_packing_ok = True


def _head_is_plain(model) -> bool:
    """True when logits == output_embeddings(base_model(x)) (no soft-capping or scaling in the
    head): then a teacher applies its head to the selected positions only. Checked once."""
    ok = getattr(model, "_distill_plain_head", None)
    if ok is None:
        head, dev = model.get_output_embeddings(), next(model.parameters()).device
        x = torch.arange(6, device=dev)[None] % model.config.vocab_size
        try:
            with torch.inference_mode():
                ok = head is not None and torch.allclose(head(model.base_model(input_ids=x).last_hidden_state).float(),
                                                         model(input_ids=x).logits.float(), atol=1e-4, rtol=1e-3)
        except Exception:  # noqa: BLE001  (an unusual layout: use the full forward)
            ok = False
        model._distill_plain_head = ok
    return ok


# Logits a teacher holds at a time in `topk_at` (float32: 256 MiB): the N positions of a batch go
# through the head in chunks of CHUNK_ELEMENTS // V. Unchunked, the [N, V] logits and their
# log-softmax grow with the batch: a generate block's cross-score of 64 prompts x 4 samples x 128
# tokens is 32,768 positions, 2 x 20 GB at V = 151,936 (benchmarks/scale_lm_online.py).
CHUNK_ELEMENTS = 2**26


def topk_at(model, ids: torch.Tensor, kwargs: dict, sel: torch.Tensor, k: int,
            labels: torch.Tensor, keep: list[int] | None = None) -> tuple:
    """(inference) -> the top-k next-token ids [N, k] and log-probs [N, k] (float32, T=1) at the N
    selected positions, and the NLL [N] of `labels` [N] there, with at most CHUNK_ELEMENTS
    logits alive at a time (when the head is plain; else the model's [N, V] logits once).
    keep (teachers[].features): -> (those three, {index: hidden state [B, L, D]}) from the same pass."""
    hs = {"output_hidden_states": True} if keep else {}
    if _head_is_plain(model):
        out = model.base_model(input_ids=ids, **kwargs, **hs)
        hidden = out.last_hidden_state[:, :-1][sel]  # [N, H]
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0]
    else:
        out = model(input_ids=ids, **kwargs, **hs)
        hidden, head = out.logits[:, :-1][sel], (lambda h: h)
        vocab = hidden.shape[-1]
    states = {i: out.hidden_states[i] for i in keep} if keep else None
    del out  # the full hidden-state tuple: only the kept indices live on
    step, parts = max(1, CHUNK_ELEMENTS // vocab), []
    for a in range(0, len(hidden), step):
        logp = torch.log_softmax(head(hidden[a:a + step]).float(), dim=-1)
        top = logp.topk(k, dim=-1)
        parts.append((top.indices, top.values, -logp.gather(-1, labels[a:a + step, None])[:, 0]))
        del logp  # before the next chunk's logits exist: one chunk's [c, V] at a time
    if not parts:  # no selected position
        dev = hidden.device
        got = (torch.zeros((0, k), dtype=torch.long, device=dev), torch.zeros((0, k), device=dev),
               torch.zeros(0, device=dev))
    else:
        got = tuple(torch.cat(p) for p in zip(*parts))
    return (got, states) if keep else got


def logits_at(model, ids: torch.Tensor, kwargs: dict, sel: torch.Tensor) -> torch.Tensor:
    """Next-token logits [N, V] at the selected positions only (inference): the [B, L, V]
    logits of the unselected positions (prompts, padding) are never made when the head is plain."""
    if _head_is_plain(model):
        hidden = model.base_model(input_ids=ids, **kwargs).last_hidden_state[:, :-1]
        return model.get_output_embeddings()(hidden[sel])
    return model(input_ids=ids, **kwargs).logits[:, :-1][sel]