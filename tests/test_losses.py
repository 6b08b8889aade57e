"""Distillation losses pinned against hand-computed 2-class values.

Student logits [0, ln 3] give p_s = [1/4, 3/4] at T=1; [0, ln 9] give the same p_s at
T=2 (and [1/10, 9/10] at T=1, used for the hard-label CE).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.losses import JSD, LOSSES, ForwardKL, KDLoss, ReverseKL, build_loss

LN3, LN9 = math.log(3), math.log(9)
PS = (0.25, 0.75)  # student at its temperature
PT = (0.5, 0.5)  # target


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def check(value, expected, tol=1e-10):
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, abs=tol)


LABELS = torch.tensor([1])


def test_kd_alpha_one_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64)
    target = torch.softmax(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = KDLoss(alpha=1.0, temperature=3.0)(logits, target, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_kd_alpha_zero_is_t2_forward_kl():
    check(KDLoss(alpha=0.0, temperature=1.0)(t([0.0, LN3]), t(PT), LABELS), kl(PT, PS))
    check(KDLoss(alpha=0.0, temperature=2.0)(t([0.0, LN9]), t(PT), LABELS), 4 * kl(PT, PS))


def test_kd_mixes_hard_ce_at_t1_with_soft_term_at_t():
    # hard CE uses T=1: softmax([0, ln9]) = [1/10, 9/10], label 1 -> -ln(0.9)
    loss = KDLoss(alpha=0.3, temperature=2.0)(t([0.0, LN9]), t(PT), LABELS)
    check(loss, 0.3 * -math.log(0.9) + 0.7 * 4 * kl(PT, PS))


def test_forward_kl_hand_value_and_t2_scaling():
    at_t1 = ForwardKL(temperature=1.0)(t([0.0, LN3]), t(PT))
    at_t2 = ForwardKL(temperature=2.0)(t([0.0, LN9]), t(PT))  # same p_s at T=2
    check(at_t1, kl(PT, PS))
    check(at_t2, 4 * kl(PT, PS))


def test_forward_kl_zero_when_student_matches_target():
    torch.manual_seed(1)
    logits = torch.randn(5, 7, dtype=torch.float64)
    for temperature in (1.0, 4.0):
        target = torch.softmax(logits / temperature, dim=-1)
        check(ForwardKL(temperature)(logits, target), 0.0, tol=1e-12)


def test_reverse_kl_hand_value_and_batch_mean():
    check(ReverseKL(1.0)(t([0.0, LN3]), t(PT)), kl(PS, PT))
    check(ReverseKL(2.0)(t([0.0, LN9]), t(PT)), 4 * kl(PS, PT))
    # second row matches its target exactly, so the batch mean halves the loss
    check(ReverseKL(1.0)(t([0.0, LN3], [0.0, 0.0]), t(PT, PT)), kl(PS, PT) / 2)
    assert kl(PS, PT) != pytest.approx(kl(PT, PS))  # the two directions really differ here


def test_jsd_hand_values():
    m = (0.375, 0.625)  # (p_t + p_s) / 2
    check(JSD(0.5, 1.0)(t([0.0, LN3]), t(PT)), 0.5 * kl(PT, m) + 0.5 * kl(PS, m))
    m = (0.3, 0.7)  # 0.2 p_t + 0.8 p_s
    check(JSD(0.2, 2.0)(t([0.0, LN9]), t(PT)), 4 * (0.2 * kl(PT, m) + 0.8 * kl(PS, m)))


def test_jsd_symmetric_at_half():
    torch.manual_seed(2)
    s_logits = torch.randn(4, 5, dtype=torch.float64)
    target = torch.softmax(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    loss = JSD(0.5, 1.0)(s_logits, target)
    swapped = JSD(0.5, 1.0)(target.log(), torch.softmax(s_logits, dim=-1))
    torch.testing.assert_close(loss, swapped)
    assert loss.item() > 0.01
    # beta=0.2 is not symmetric
    skewed = JSD(0.2, 1.0)
    assert skewed(s_logits, target).item() != pytest.approx(skewed(target.log(), s_logits.softmax(-1)).item())


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_degenerates_to_zero_at_the_ends(beta):
    # m equals p_s (beta=0) or p_t (beta=1), and the other term has weight 0
    check(JSD(beta, 1.0)(t([0.0, LN3]), t(PT)), 0.0)


def test_forward_kl_with_zero_target_probability():
    # target [1, 0]: KL = ln(1 / (1/4)) = ln 4; the zero class adds nothing
    check(ForwardKL(1.0)(t([0.0, LN3]), t([1.0, 0.0])), math.log(4))


@pytest.mark.parametrize("name", LOSSES)
def test_zero_target_probabilities_give_finite_loss_and_grads(name):
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    loss = build_loss(name, temperature=2.0)(logits, target, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_reverse_kl_penalises_mass_on_impossible_classes():
    # the student puts 3/4 on a class the target rules out: large but finite
    loss = ReverseKL(1.0)(t([0.0, LN3]), t([1.0, 0.0]))
    assert math.isfinite(loss.item()) and loss.item() > 15.0


def test_low_precision_logits_are_upcast():
    loss = ForwardKL(2.0)(t([0.0, LN9]).to(torch.bfloat16), t(PT).to(torch.bfloat16))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(4 * kl(PT, PS), abs=0.02)  # bf16 rounds ln 9


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must both be"):
        ForwardKL(1.0)(torch.zeros(2, 3), torch.full((2, 4), 0.25))


def test_build_loss_returns_configured_modules():
    kd = build_loss("kd", alpha=0.25, temperature=3.0)
    assert isinstance(kd, KDLoss) and kd.alpha == 0.25 and kd.soft.temperature == 3.0
    jsd = build_loss("jsd", beta=0.1, temperature=2.0)
    assert isinstance(jsd, JSD) and jsd.beta == 0.1 and jsd.temperature == 2.0
    assert isinstance(build_loss("forward_kl"), ForwardKL)
    assert isinstance(build_loss("reverse_kl"), ReverseKL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mse"), "unknown loss 'mse'.*kd, forward_kl, reverse_kl, jsd"),
    (dict(name="kd", alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(name="jsd", beta=-0.1), r"beta must be in \[0, 1\]"),
    (dict(name="forward_kl", temperature=0.0), "temperature must be > 0"),
    (dict(name="reverse_kl", temperature=-1.0), "temperature must be > 0"),
])
def test_build_loss_validation(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_loss(name, **kwargs)


def test_constructors_validate_too():
    with pytest.raises(ValueError, match="alpha"):
        KDLoss(alpha=-0.5)
    with pytest.raises(ValueError, match="temperature"):
        JSD(0.5, temperature=0)
