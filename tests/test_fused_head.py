"""The LM train step's fused head + loss (orchestrator/fused_head.py) against the full-logits step it
replaces: same loss, same gradient on every parameter (float64), for every top-k loss, on packed
rows with a loss mask, tied and untied heads; heads that are not plain keep the full-logits step.
Pure torch + transformers (actors.student imports Ray but starts nothing)."""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from actors.student import _lm_step
from orchestrator.fused_head import FusedHead, fused_topk_loss, plan, why_not_fused
from orchestrator.losses import LOSSES, build_topk_loss

V, K = 97, 5


def _llama(tied: bool, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).double()
    if bias:  # a head with a bias is still plain: logits = h @ W.T + b
        model.lm_head = torch.nn.Linear(32, V, bias=True, dtype=torch.float64)
    with torch.no_grad():  # untrained Llama logits are near 0: make the head matter
        model.get_output_embeddings().weight.mul_(20)
    return model


def _packed_batch(seed: int = 1) -> dict:
    """Two rows of 12, each two packed examples (position ids restart), loss on the responses only;
    targets: k ids per selected position (a padded slot, id -1, in one) and their log-probs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (2, 12), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    sel = mask[:, 1:]
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(2 * 11)]).view(2, 11, K)
    ids[0, 2, -1] = -1
    lps = torch.log_softmax(torch.randn(2, 11, K + 1, generator=g), -1)[..., :K].float()  # a tail bucket left over
    return {"input_ids": x, "position_ids": pos, "sel": sel, "gaps": ids * sel[..., None], "codes": lps * sel[..., None]}


def _grads(model, loss_fn, batch, head) -> tuple[float, dict, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss, n = _lm_step(model, loss_fn, batch, {"k": K}, head=head)
    loss.backward()
    assert n == int(batch["sel"].sum())
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}, getattr(loss_fn, "last_soft", None)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", LOSSES)
def test_fused_step_equals_the_full_logits_step(name, tied):
    model = _llama(tied)
    assert why_not_fused(model) is None
    loss_fn = build_topk_loss(name, alpha=0.3, beta=0.4, temperature=2.0)
    loss_fn.chunk_size = 4  # several chunks over the 14 selected positions, the last one short
    batch = _packed_batch()
    want, want_g, want_soft = _grads(model, loss_fn, batch, None)
    got, got_g, got_soft = _grads(model, loss_fn, batch, FusedHead(model))
    assert got == pytest.approx(want, rel=1e-12) and want > 0.01
    assert got_g.keys() == want_g.keys()
    for k, g in want_g.items():
        assert g.abs().max() > 0, k  # every parameter, the head's weight included, has a gradient
        assert torch.allclose(got_g[k], g, rtol=1e-9, atol=1e-12), k
    if name == "kd":
        assert got_soft is not None and torch.allclose(got_soft, want_soft, rtol=1e-12)


def test_head_bias_gets_its_gradient_and_chunking_does_not_change_it():
    model = _llama(tied=False, bias=True)
    assert why_not_fused(model) is None
    loss_fn = build_topk_loss("kd", alpha=0.5, temperature=1.0)
    batch = _packed_batch(seed=2)
    want, want_g, _ = _grads(model, loss_fn, batch, None)
    for chunk in (1, 3, 1024):
        loss_fn.chunk_size = chunk
        got, got_g, _ = _grads(model, loss_fn, batch, FusedHead(model))
        assert got == pytest.approx(want, rel=1e-12)
        for k, g in want_g.items():
            assert torch.allclose(got_g[k], g, rtol=1e-9, atol=1e-12), (chunk, k)


def test_hand_computed_loss_and_no_selected_position():
    # One row, logits = h @ W.T: forward KL at T=1 against a target listing token 0 at p=1.
    h = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = fused_topk_loss(build_topk_loss("forward_kl"), h, w, None, torch.tensor([[0]]), torch.tensor([[0.0]]))
    want = -torch.log_softmax(torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), 0)[0]  # KL(1 || p) = -log p_0
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    loss.backward()
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), 0)
    assert torch.allclose(h.grad, (p - torch.tensor([1.0, 0, 0], dtype=torch.float64)) @ w.detach())
    empty = fused_topk_loss(build_topk_loss("kd"), h[:0], w, None, torch.zeros(0, 1, dtype=torch.long),
                            torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0


def test_backward_twice_is_refused():
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    loss = fused_topk_loss(build_topk_loss("reverse_kl"), h, w, None, torch.tensor([[0, 1]] * 3), torch.full((3, 2), -1.0))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagates once"):
        loss.backward()


def test_softcapped_scaled_and_wrapped_heads_keep_the_full_logits(capsys):
    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    gemma = Gemma2ForCausalLM(cfg)
    assert "final_logit_softcapping" in why_not_fused(gemma)
    assert plan(gemma, "ddp", False, say=True) is None
    line = capsys.readouterr().out.strip()
    assert line.startswith("train: LM head + loss not fused (config.final_logit_softcapping = 30.0")
    assert plan(gemma, "ddp", False, say=False) is None and capsys.readouterr().out == ""

    class Scaled(LlamaForCausalLM):  # a head op no config field names: the numeric check sees it
        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 1.5
            return out

    scaled = Scaled(_llama(tied=True).config)
    assert "differs from the model's logits" in why_not_fused(scaled)
    llama = _llama(tied=True)
    assert isinstance(plan(llama, "ddp", False, say=True), FusedHead) and capsys.readouterr().out == ""
    assert "fsdp" in why_not_fused(llama, strategy="fsdp")
    assert why_not_fused(llama, extra_terms=True) is None  # the terms read hidden states: fused too
    assert llama.training  # the check's eval() is undone


def test_ddp_sees_every_parameter_used_and_syncs_the_fused_gradients(tmp_path):
    """DDP (gloo, one process) with find_unused_parameters=False: a parameter without a gradient in
    one step is an error at the next forward. The fused step runs twice through the wrapper with
    the full-logits step's gradients; a loss that skips the head does trip the check."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for tied in (True, False):
            model = _llama(tied)
            loss_fn, batch, head = build_topk_loss("kd", alpha=0.5), _packed_batch(), FusedHead(model)
            _, want_g, _ = _grads(model, loss_fn, batch, None)
            ddp = DDP(model, find_unused_parameters=False)
            for _ in range(2):
                _, got_g, _ = _grads(ddp, loss_fn, batch, head)
                for k, g in want_g.items():
                    assert torch.allclose(got_g[f"module.{k}"], g, rtol=1e-9, atol=1e-12), k
        ddp = DDP(_llama(tied=False), find_unused_parameters=False)
        head = FusedHead(ddp.module)
        head.hidden(ddp, batch["input_ids"], {}, batch["sel"]).sum().backward()  # lm_head unused
        with pytest.raises(RuntimeError, match="finished reduction"):
            head.hidden(ddp, batch["input_ids"], {}, batch["sel"])
    finally:
        dist.destroy_process_group()


def _saved_bytes(model, loss_fn, batch, head) -> int:
    """Bytes autograd keeps for backward after one train step's forward (its activations)."""
    from benchmarks.common import activations_kept

    kept = {}
    with activations_kept(model, kept):
        loss, _ = _lm_step(model, loss_fn, batch, {"k": K}, head=head)
    assert kept["bytes"] > 0
    return kept["bytes"]


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_checkpointing_gives_the_same_step_and_keeps_fewer_activations(fused):
    """train.gradient_checkpointing (actors/student.py enables transformers' non-reentrant one): the
    step's loss and every gradient are those without it, in the fused and the full-logits step,
    and the forward keeps fewer bytes for backward."""
    model = _llama(tied=False)
    loss_fn = build_topk_loss("kd", alpha=0.3, temperature=2.0)
    batch = _packed_batch()
    head = FusedHead(model) if fused else None
    want, want_g, _ = _grads(model, loss_fn, batch, head)
    plain_bytes = _saved_bytes(model, loss_fn, batch, head)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing and model.training
    got, got_g, _ = _grads(model, loss_fn, batch, head)
    assert got == pytest.approx(want, rel=1e-12)
    for k, g in want_g.items():
        assert torch.allclose(got_g[k], g, rtol=1e-9, atol=1e-12), k
    kept = _saved_bytes(model, loss_fn, batch, head)
    assert kept < 0.8 * plain_bytes, (kept, plain_bytes)
