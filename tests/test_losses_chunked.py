"""Chunked top-k losses: the same values and gradients as all positions at once, for any chunk size,
and the loss mask ([B, L-1], prompt and padding False) honoured by every top-k loss."""
import pytest
import torch

from orchestrator.losses import LOSSES, build_topk_loss

B, L, V, K = 3, 9, 40, 5


def case(seed=0, dtype=torch.float64):
    """Model-shaped inputs: logits [B, L, V] sliced to [:, :-1] (a strided view, as in training),
    targets [B, L-1, k] with some padded slots, labels [B, L-1], a prompt/padding mask [B, L-1]."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, L, V, generator=g, dtype=dtype)
    ids = torch.argsort(torch.rand(B, L - 1, V, generator=g), dim=-1)[..., :K]
    ids[0, 2, 3:] = -1  # padded target slots
    probs = torch.distributions.Dirichlet(torch.ones(K + 1, dtype=torch.float64)).sample((B, L - 1))[..., :K]
    lps = torch.where(ids >= 0, probs.log(), -1e4).to(torch.float32)
    labels = torch.randint(0, V, (B, L - 1), generator=g)
    mask = torch.ones(B, L - 1, dtype=torch.bool)
    mask[0, :3] = False  # a prompt
    mask[2, 5:] = False  # padding
    return full, ids, lps, labels, mask


def run(name, chunk, full, ids, lps, labels, mask, **kw):
    full = full.detach().clone().requires_grad_(True)
    loss_fn = build_topk_loss(name, alpha=0.3, beta=0.3, temperature=2.0, chunk_size=chunk, **kw)
    loss = loss_fn(full[:, :-1], ids, lps, labels, mask)
    loss.backward()
    return loss.detach(), full.grad, getattr(loss_fn, "last_soft", None)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("chunk", [1, 4, 7, 24, 1000])
def test_chunked_equals_unchunked(name, chunk):
    inputs = case()
    ref_loss, ref_grad, ref_soft = run(name, None, *inputs)
    loss, grad, soft = run(name, chunk, *inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    assert ref_grad[:, -1].abs().sum() == 0 and ref_grad.abs().sum() > 0
    if name == "kd":
        torch.testing.assert_close(soft, ref_soft, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_chunked_bf16_logits(name):
    full, *rest = case(1, torch.float32)
    ref_loss, ref_grad, _ = run(name, None, full.bfloat16(), *rest)
    loss, grad, _ = run(name, 5, full.bfloat16(), *rest)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("name", LOSSES)
def test_mask_is_honoured(name, chunk):
    full, ids, lps, labels, mask = case(2)
    loss, grad, _ = run(name, chunk, full, ids, lps, labels, mask)
    # the mean of the per-position losses at masked-in positions only
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    m = mask.reshape(-1)
    alone = build_topk_loss(name, alpha=0.3, beta=0.3, temperature=2.0, chunk_size=chunk)(
        flat(full[:, :-1])[m], flat(ids)[m], flat(lps)[m], labels.reshape(-1)[m])
    torch.testing.assert_close(loss, alone, rtol=0, atol=1e-12)
    # masked positions get no gradient; NaN logits or junk labels there change nothing
    assert (grad[:, :-1][~mask].abs().sum() == 0) and grad[:, :-1][mask].abs().sum() > 0
    junk = full.clone()
    junk[:, :-1][~mask] = float("nan")
    loss2, grad2, _ = run(name, chunk, junk, ids, lps, torch.where(mask, labels, -100), mask)
    if chunk is not None:  # chunked: masked rows are never read
        torch.testing.assert_close(loss2, loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad2, grad, rtol=0, atol=1e-12)
    else:  # all at once: the value is still clean (their gradient is NaN*0 there, as before)
        torch.testing.assert_close(loss2, loss, rtol=0, atol=1e-12)


def test_no_grad_and_backward_once():
    full, ids, lps, labels, mask = case(3)
    loss_fn = build_topk_loss("forward_kl", chunk_size=4)
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(full[:, :-1], ids, lps, labels, mask),
                                   build_topk_loss("forward_kl", chunk_size=None)(full[:, :-1], ids, lps, labels, mask))
    x = full.clone().requires_grad_(True)
    loss = loss_fn(x[:, :-1], ids, lps, labels, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagates once"):
        loss.backward()


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        build_topk_loss("kd", chunk_size=0)
