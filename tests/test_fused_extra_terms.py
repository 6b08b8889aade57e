"""The fused LM head + loss (orchestrator/fused_head.py) with train.extra_losses
(orchestrator/lm_extra_terms.py) against the full-logits step: the terms read intermediate hidden
states of the same forward, so the fused step runs with them and must give the same loss and the
same gradient on every parameter, the hint projections' included (float64), while the head never
makes more than the one position's logits that logits_to_keep=1 keeps. No Ray."""
from __future__ import annotations

import pytest
import torch

from actors.student import _lm_step
from orchestrator.fused_head import FusedHead, why_not_fused
from orchestrator.lm_extra_terms import LMExtraTerms
from orchestrator.losses import build_topk_loss
from tests.test_fused_head import K, V, _llama, _packed_batch


def _term(kind: str, layer: int, parts: list[tuple[str, str, int]], **spec) -> dict:
    """One resolved term (as resolve_lm_terms gives it) on student hidden state ``layer`` (width 32);
    parts: (teacher, pool, teacher width)."""
    spec = {"kind": kind, "weight": 0.7, "teacher": "ensemble" if len(parts) > 1 else parts[0][0],
            "teacher_layer": 1, "student_layer": layer, **spec}
    return {"spec": spec, "student": {"kind": "hidden", "key": layer, "shape": [32]}, "label": f"{kind} {layer}",
            "parts": [{"teacher": t, "column": f"feat__{t}__1", "shape": [-1, d] if pool == "none" else [d],
                       "pool": pool, "student_dim": 32, "teacher_dim": d} for t, pool, d in parts]}


# per-token hint from two teachers (an ensemble: one projection each), a pooled cosine hint after
# the last layer, a relation term (similarity-preserving) over the batch's 2 rows on the embeddings (no projection)
RESOLVED = [_term("hint", 1, [("a", "none", 8), ("b", "none", 6)]),
            _term("hint", -1, [("c", "mean", 5)], distance="cosine"),
            _term("similarity", 0, [("c", "mean", 5)])]


def _features(batch: dict) -> dict:
    """Stored teacher features as LMBatch gives them: per token [B, L-1, Dt] (zero where unlabeled),
    pooled [B, Dt]; float16 as stored."""
    g, sel = torch.Generator().manual_seed(3), batch["sel"]
    out = {f"feat__{t}__1": torch.randn(*sel.shape, d, generator=g) * sel[..., None] for t, d in (("a", 8), ("b", 6))}
    out["feat__c__1"] = torch.randn(len(sel), 5, generator=g)
    return {k: v.half() for k, v in out.items()}


def _grads(model, terms, loss_fn, batch, head):
    model.zero_grad(set_to_none=True)
    terms.zero_grad(set_to_none=True)
    loss, n = _lm_step(model, loss_fn, batch, {"k": K}, terms, head)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in [*model.named_parameters(), *terms.named_parameters(prefix="terms")]}
    return loss.item(), grads, terms.pop_means()


@pytest.mark.parametrize("tied", [True, False])
def test_fused_step_with_extra_terms_equals_the_full_logits_step(tied):
    model = _llama(tied)
    assert why_not_fused(model, extra_terms=True) is None
    terms = LMExtraTerms(RESOLVED, model).double()
    loss_fn = build_topk_loss("kd", alpha=0.3, temperature=2.0)
    loss_fn.chunk_size = 4
    batch = {**_packed_batch(), **_features(_packed_batch())}
    shapes = []  # every output the head makes: the fused forward's must be the last position's only
    model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    want, want_g, want_terms = _grads(model, terms, loss_fn, batch, None)
    assert shapes == [(2, 12, V)]
    shapes.clear()
    got, got_g, got_terms = _grads(model, terms, loss_fn, batch, FusedHead(model))
    assert shapes == [(2, 1, V)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got_terms == pytest.approx(want_terms, rel=1e-12) and all(v > 1e-3 for v in want_terms.values())
    assert want > sum(want_terms.values()) + 0.01  # the top-k loss counts too
    assert got_g.keys() == want_g.keys() and sum(k.startswith("terms.") for k in want_g) == 6  # 3 projections
    for k, g in want_g.items():
        assert g.abs().max() > 0, k  # every parameter, the head's and the projections' included
        assert torch.allclose(got_g[k], g, rtol=1e-9, atol=1e-12), k


def test_a_head_that_is_not_plain_keeps_the_full_logits_with_terms_too(capsys):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from orchestrator.fused_head import plan

    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    assert plan(Gemma2ForCausalLM(cfg), "ddp", True, say=True) is None
    assert capsys.readouterr().out.startswith("train: LM head + loss not fused (config.final_logit_softcapping")
    assert plan(_llama(tied=True), "fsdp", True, say=False) is None
