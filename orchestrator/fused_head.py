"""The offline LM train step's head + top-k loss, fused and chunked. Pure torch (+ transformers): no Ray.

Why: ``model(input_ids=x).logits[:, :-1][sel]`` makes the student's logits at every position of
the batch ([B, L, V], prompts and padding included), keeps them for backward and then makes
their gradient: at V = 151,936, B = 8 and L = 256 that is 1.2 GiB each in float32
(benchmarks/fused_lm_step.py). Here the student runs through the same (DDP-wrapped) forward,
so DDP's gradient sync is unchanged, but with ``logits_to_keep=1``; a forward hook on the base
model (the decoder, after its final norm) catches the hidden states, and only the N loss
positions' [N, H] go on. The head is then applied to chunks of those rows inside one autograd
Function that takes each chunk's gradients (w.r.t. the hidden rows and the head's weight / bias)
in the forward pass, as losses._ChunkedRows does: no [N, V] tensor exists at any time, none is
kept for backward, and nothing is recomputed. The head's weight gets its gradient through this
Function, so DDP (find_unused_parameters=False) sees it used; a weight tied to the embeddings
adds both uses up as autograd always does.

Only for a plain head: logits = hidden @ W.T (+ b). ``plan`` says when the fused step is used
and otherwise names why not (soft-capped or scaled logits, a head with extra ops, FSDP); the train
step then reads the model's full logits as before. train.extra_losses (orchestrator/lm_extra_terms.py)
read intermediate hidden states only: the fused forward also asks for output_hidden_states, so
they cost no [B, L, V] logits either (``FusedHead.run``).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .packing import CHUNK_ELEMENTS

# Config fields of transformers models whose head is not a plain Linear over the final hidden
# states (Gemma 2/3: tanh soft-capping; Cohere: logit_scale; Granite: logits_scaling; ...).
# Anything else in a head shows in why_not_fused's numeric check.
HEAD_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def why_not_fused(module, strategy: str = "ddp", extra_terms: bool = False) -> str | None:
    """None when the fused step computes exactly what ``module(...).logits`` feeds the loss, else
    the reason it does not (one phrase, for the log line). ``module``: the unwrapped causal LM,
    before DDP / FSDP wraps it. Runs one 6-token forward in eval mode (no dropout)."""
    if strategy == "fsdp":
        return "train.strategy fsdp: the head's weight is a shard outside FSDP's forward"
    config = getattr(module, "config", None)
    for key in HEAD_CONFIG_KEYS:  # (multimodal configs keep them in text_config)
        value = getattr(config, key, None)
        value = getattr(getattr(config, "text_config", None), key, None) if value is None else value
        if value not in (None, False, 0, 1, 1.0):
            return f"config.{key} = {value} (the logits are not hidden @ head.weight.T)"
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"the output head is {type(head).__name__}, not a plain torch.nn.Linear"
    if "logits_to_keep" not in inspect.signature(module.forward).parameters:
        return f"{type(module).__name__}.forward takes no logits_to_keep"
    dev = head.weight.device
    x = (torch.arange(6, device=dev)[None] * 7 + 3) % head.weight.shape[0]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want = module(input_ids=x, use_cache=False).logits.float()
            got = head(module.base_model(input_ids=x, use_cache=False).last_hidden_state).float()
            # train.extra_losses read hidden_states from the fused step's own forward (logits_to_keep=1)
            if extra_terms and module(input_ids=x, use_cache=False, logits_to_keep=1,
                                      output_hidden_states=True).hidden_states is None:
                return "train.extra_losses read hidden_states, which the forward with logits_to_keep does not give"
    except Exception as e:  # noqa: BLE001  (an unusual layout: keep the full forward)
        return f"the base model's output does not feed the head directly ({type(e).__name__})"
    finally:
        module.train(was_training)
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    if not err <= 1e-5 * scale + 1e-6:
        return f"head(base_model(x)) differs from the model's logits by {err:.3g} (the head has extra ops)"
    return None


class FusedHead:
    """The fused head + loss of one (unwrapped) causal LM; ``model`` in ``hidden`` may be its DDP
    wrapper, whose forward runs the same module.

    hidden(model, x [B, L], kwargs, sel [B, L-1] bool) -> [N, H]: the final hidden states at the
    N selected positions (those predicting a next token that carries loss), row-major.
    loss(loss_fn, hidden [N, H], target_ids [N, k], target_lps [N, k], labels [N]) -> scalar:
    what ``loss_fn(head(hidden), target_ids, target_lps, labels)`` gives, with its gradients.
    """

    def __init__(self, module):
        self.base, self.head = module.base_model, module.get_output_embeddings()

    def hidden(self, model, x: torch.Tensor, kwargs: dict, sel: torch.Tensor) -> torch.Tensor:
        return self.run(model, x, kwargs, sel)[0]

    def run(self, model, x: torch.Tensor, kwargs: dict, sel: torch.Tensor):
        """-> (the [N, H] rows ``hidden`` gives, the model's output: what else ``kwargs`` asked of the
        same forward, e.g. hidden_states with output_hidden_states=True for train.extra_losses)."""
        caught = []

        def catch(_module, _args, out):
            caught.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

        handle = self.base.register_forward_hook(catch)
        try:  # logits_to_keep=1: the head runs on the last position only ([B, 1, V], left unused)
            out = model(input_ids=x, logits_to_keep=1, **kwargs)
        finally:
            handle.remove()
        return caught[-1][:, :-1][sel], out

    def loss(self, loss_fn, hidden, target_ids, target_lps, labels) -> torch.Tensor:
        return fused_topk_loss(loss_fn, hidden, self.head.weight, self.head.bias, target_ids, target_lps, labels)


def fused_topk_loss(loss_fn, hidden, weight, bias, target_ids, target_lps, labels=None,
                    chunk: int | None = None) -> torch.Tensor:
    """A top-k loss (orchestrator/losses.py ``build_topk_loss``) of logits = hidden @ weight.T + bias,
    the mean over the N rows as ``loss_fn`` returns it (and its ``last_soft``: the loss's own
    ``mean_over_rows`` does both), computed chunk by chunk. Shapes: hidden [N, H], weight [V, H],
    bias [V] or None, target_ids / target_lps [N, k], labels [N] long (or None where the loss reads none). chunk: rows at a time (default: the loss's
    chunk_size, at most CHUNK_ELEMENTS // V: one chunk's float32 logits are <= 256 MiB)."""
    n = hidden.shape[0]
    if chunk is None:
        chunk = max(1, min(loss_fn.chunk_size or n, CHUNK_ELEMENTS // weight.shape[0]))
    return loss_fn.mean_over_rows(
        lambda rows: _FusedHeadRows.apply(hidden, weight, bias, rows, chunk, target_ids, target_lps, labels),
        labels, n, max(n, 1))


class _FusedHeadRows(torch.autograd.Function):
    """sum over rows of fn(hidden[rows] @ weight.T + bias, *rest[rows]), in chunks of ``chunk`` rows.

    Each chunk's gradients w.r.t. its hidden rows, the weight and the bias are taken in the
    forward pass (one forward + backward of that chunk's logits, then they are freed) and summed
    into buffers of the inputs' own sizes; backward scales them by the incoming scalar gradient.
    The other inputs get no gradient; backward runs once (no retain_graph re-use).

    Shapes: hidden [N, H], weight [V, H], bias [V] or None, rest: tensors [N, ...] or None -> [].
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, chunk, *rest):
        need = ctx.needs_input_grad[:3]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grads = [torch.zeros_like(t) if t is not None and want else None for t, want in zip((hidden, weight, bias), need)]
        for start in range(0, hidden.shape[0], chunk):
            args = [None if a is None else a[start:start + chunk] for a in rest]
            with torch.enable_grad():
                ins = [None if t is None else t.detach().requires_grad_(want)
                       for t, want in zip((hidden[start:start + chunk], weight, bias), need)]
                v = fn(F.linear(*ins), *args).sum()  # [c, V] logits live only inside this chunk
                wrt = [(g, t) for g, t in zip(grads, ins) if g is not None]
                if wrt:
                    got = torch.autograd.grad(v, [t for _, t in wrt])
                    for (g, _), d in zip(wrt, got):
                        (g[start:start + chunk] if g is grads[0] else g).add_(d)
            total += v.detach()
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fused head loss backpropagates once; recompute the loss to do it again")
        out = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]  # in place: no second buffer
        return (*out, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


def plan(module, strategy: str, extra_terms: bool, say: bool) -> FusedHead | None:
    """The train loop's choice, once per worker before wrapping: the fused step, or None (the
    full-logits step) with one line naming why when ``say`` (rank 0)."""
    why = why_not_fused(module, strategy, extra_terms)
    if why is None:
        return FusedHead(module)
    if say:
        print(f"train: LM head + loss not fused ({why}); the loss reads the model's full [B, L, V] logits", flush=True)
    return None
