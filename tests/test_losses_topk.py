"""Top-k (sparse target) losses pinned against hand values and the dense losses.

Hand example, V=3, k=1: student logits [ln 2, 0, 0] give p_s = [1/2, 1/4, 1/4] at T=1
(and [2 ln 2, 0, 0] give the same p_s at T=2). A target listing token 0 with 0.8 has the
buckets [0.8 | 0.2]; the student's buckets are then [1/2 | 1/2].
"""
import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.ensemble import PAD_ID, PAD_LOGPROB
from orchestrator.losses import (JSD, LOSSES, ForwardKL, KDLoss, ReverseKL, TopKForwardKL, TopKJSD, TopKKDLoss,
                                 TopKReverseKL, build_topk_loss)

LN2 = math.log(2)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def check(value, expected, tol=1e-10):
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, abs=tol)


def t(*rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# two positions: target lists token 0 (position 0) / token 1 (position 1) with 0.8
STUDENT = t([LN2, 0.0, 0.0], [LN2, 0.0, 0.0])
IDS = torch.tensor([[0], [1]])
LOGPROBS = t([math.log(0.8)], [math.log(0.8)])
PT = (0.8, 0.2)
PS = ((0.5, 0.5), (0.25, 0.75))  # student buckets per position


def test_forward_kl_hand_value_with_tail_bucket():
    loss = TopKForwardKL(1.0)(STUDENT, IDS, LOGPROBS)
    check(loss, (kl(PT, PS[0]) + kl(PT, PS[1])) / 2)
    # T=2 on doubled logits: same student buckets, times T^2
    check(TopKForwardKL(2.0)(2 * STUDENT, IDS, LOGPROBS), 4 * (kl(PT, PS[0]) + kl(PT, PS[1])) / 2)


def test_reverse_kl_and_jsd_hand_values():
    check(TopKReverseKL(1.0)(STUDENT[:1], IDS[:1], LOGPROBS[:1]), kl(PS[0], PT))
    check(TopKReverseKL(2.0)(2 * STUDENT[:1], IDS[:1], LOGPROBS[:1]), 4 * kl(PS[0], PT))
    m = (0.65, 0.35)  # (p_t + p_s) / 2 over the two buckets
    check(TopKJSD(0.5, 1.0)(STUDENT[:1], IDS[:1], LOGPROBS[:1]), 0.5 * kl(PT, m) + 0.5 * kl(PS[0], m))


def test_kd_hand_value_ce_at_t1_soft_at_t():
    # at T=1 softmax([2 ln2, 0, 0]) = [4, 1, 1] / 6: label 2 -> CE = ln 6
    loss = TopKKDLoss(alpha=0.3, temperature=2.0)(2 * STUDENT[:1], IDS[:1], LOGPROBS[:1], torch.tensor([2]))
    check(loss, 0.3 * math.log(6) + 0.7 * 4 * kl(PT, PS[0]))


def full_listing(seed, n=6, v=5):
    """Student logits, and a target that lists every token (tail 0) in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    target = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64), dim=-1)
    ids = torch.argsort(torch.rand(n, v, generator=g), dim=-1)
    labels = torch.randint(0, v, (n,), generator=g)
    return logits, target, ids, target.gather(-1, ids).log(), labels


@pytest.mark.parametrize("sparse, dense", [
    (TopKForwardKL(2.0), ForwardKL(2.0)),
    (TopKReverseKL(2.0), ReverseKL(2.0)),
    (TopKJSD(0.3, 2.0), JSD(0.3, 2.0)),
    (TopKKDLoss(0.4, 2.0), KDLoss(0.4, 2.0)),
])
def test_listing_every_token_equals_the_dense_loss(sparse, dense):
    logits, target, ids, logprobs, labels = full_listing(0)
    # the target is meant at T: the dense losses take it as is, so must the sparse ones
    mask = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(sparse(logits, ids, logprobs, labels, mask), dense(logits, target, labels))


def masked_case(seed=3, n=6, v=8, k=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    ids = torch.argsort(torch.rand(n, v, generator=g), dim=-1)[:, :k]
    probs = torch.distributions.Dirichlet(torch.ones(k + 1, dtype=torch.float64)).sample((n,))[:, :k]
    labels = torch.randint(0, v, (n,), generator=g)
    mask = torch.tensor([True, False, True, True, False, True])
    return logits, ids, probs.log(), labels, mask


def test_kd_alpha_one_is_cross_entropy_on_unmasked_positions():
    torch.manual_seed(0)
    logits, ids, logprobs, labels, mask = masked_case()
    labels = torch.where(mask, labels, -100)  # masked labels are never read
    loss = TopKKDLoss(alpha=1.0, temperature=3.0)(logits, ids, logprobs, labels, mask)
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask], labels[mask]))


@pytest.mark.parametrize("name", LOSSES)
def test_mask_excludes_positions(name):
    torch.manual_seed(0)
    logits, ids, logprobs, labels, mask = masked_case()
    loss_fn = build_topk_loss(name, alpha=0.5, temperature=2.0)
    loss = loss_fn(logits, ids, logprobs, labels, mask)
    # equal to the same loss over the unmasked positions only
    torch.testing.assert_close(loss, loss_fn(logits[mask], ids[mask], logprobs[mask], labels[mask]))
    # a masked position's logits and target do not matter ...
    changed = logits.clone()
    changed[1] = 50.0 * torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(loss_fn(changed, ids, logprobs, labels, mask), loss)
    # ... an unmasked one does
    changed[0] += 5.0 * torch.arange(8, dtype=torch.float64)
    assert abs(loss_fn(changed, ids, logprobs, labels, mask).item() - loss.item()) > 1e-3


@pytest.mark.parametrize("name", LOSSES)
def test_all_masked_gives_zero_not_nan(name):
    logits, ids, logprobs, labels, _ = masked_case()
    logits.requires_grad_(True)
    loss = build_topk_loss(name)(logits, ids, logprobs, labels, torch.zeros(6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


@pytest.mark.parametrize("name", LOSSES)
def test_padded_ids_add_nothing_and_grads_stay_finite(name):
    # [0 | pad] equals [0] alone; the pad (-1) must not be read as a token
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], requires_grad=True)
    ids = torch.tensor([[0, PAD_ID], [PAD_ID, PAD_ID]])
    logprobs = torch.tensor([[math.log(0.8), PAD_LOGPROB], [PAD_LOGPROB, PAD_LOGPROB]])
    labels = torch.tensor([0, 1])
    loss_fn = build_topk_loss(name, temperature=2.0)
    loss = loss_fn(logits, ids, logprobs, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # row 1 is all padding: both sides are one tail bucket of 1, so only kd's CE is left
    unpadded = loss_fn(logits[:1], ids[:1, :1], logprobs[:1, :1], labels[:1])
    alone = loss_fn(logits[1:], ids[1:], logprobs[1:], labels[1:])
    hard = 0.5 * F.cross_entropy(logits[1:], labels[1:]) if name == "kd" else torch.tensor(0.0)
    torch.testing.assert_close(alone, hard)
    torch.testing.assert_close(loss, (unpadded + alone) / 2)


@pytest.mark.parametrize("name", LOSSES)
def test_batch_by_length_inputs_are_flattened(name):
    logits, ids, logprobs, labels, mask = masked_case()
    loss_fn = build_topk_loss(name, temperature=1.5)
    flat = loss_fn(logits, ids, logprobs, labels, mask)
    shaped = loss_fn(logits.view(2, 3, 8), ids.view(2, 3, 3), logprobs.view(2, 3, 3), labels.view(2, 3),
                     mask.view(2, 3))
    torch.testing.assert_close(shaped, flat)


def test_low_precision_logits_are_upcast():
    loss = TopKForwardKL(1.0)(STUDENT.to(torch.bfloat16), IDS, LOGPROBS.to(torch.float16))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((kl(PT, PS[0]) + kl(PT, PS[1])) / 2, abs=0.01)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 3), IDS[:1], LOGPROBS[:1]), "same leading positions"),
    ((torch.zeros(2, 3), IDS, LOGPROBS[:, :0]), "same leading positions"),
    ((torch.zeros(3), IDS[0], LOGPROBS[0]), "same leading positions"),
    ((STUDENT, IDS, LOGPROBS, None, torch.ones(3, dtype=torch.bool)), "one flag per position"),
])
def test_shape_errors(args, match):
    with pytest.raises(ValueError, match=match):
        TopKForwardKL(1.0)(*args)


def test_kd_needs_labels():
    with pytest.raises(ValueError, match="kd needs one label per position"):
        TopKKDLoss(0.5)(STUDENT, IDS, LOGPROBS)


def test_build_topk_loss_returns_configured_modules():
    kd = build_topk_loss("kd", alpha=0.25, temperature=3.0)
    assert isinstance(kd, TopKKDLoss) and kd.alpha == 0.25 and kd.temperature == 3.0
    jsd = build_topk_loss("jsd", beta=0.1, temperature=2.0)
    assert isinstance(jsd, TopKJSD) and jsd.beta == 0.1 and jsd.temperature == 2.0
    assert isinstance(build_topk_loss("forward_kl"), TopKForwardKL)
    assert isinstance(build_topk_loss("reverse_kl"), TopKReverseKL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mse"), "unknown loss 'mse'.*kd, forward_kl, reverse_kl, jsd"),
    (dict(name="kd", alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(name="jsd", beta=-0.1), r"beta must be in \[0, 1\]"),
    (dict(name="forward_kl", temperature=0.0), "temperature must be > 0"),
    (dict(name="reverse_kl", temperature=-1.0), "temperature must be > 0"),
])
def test_build_topk_loss_validation(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_topk_loss(name, **kwargs)


def test_constructors_validate_too():
    with pytest.raises(ValueError, match="alpha"):
        TopKKDLoss(alpha=-0.5)
    with pytest.raises(ValueError, match="temperature"):
        TopKJSD(0.5, temperature=0)
