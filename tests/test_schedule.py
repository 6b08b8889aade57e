"""lr_lambda pinned to hand-computed values, and driven through LambdaLR."""
import functools

import pytest
import torch

from orchestrator.schedule import lr_lambda


def test_warmup_is_linear_and_starts_above_zero():
    assert [lr_lambda(s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("step, cosine, linear", [
    # warmup 10, total 110: 100 decay steps; p = (step - 10) / 100
    (10, 1.0, 1.0),
    (35, 0.1 + 0.9 * (1 + 0.5 ** 0.5) / 2, 0.1 + 0.9 * 0.75),  # p = 1/4: cos(pi/4) = sqrt(2)/2
    (60, 0.55, 0.55),  # p = 1/2: cos = 0 -> halfway to min_ratio
    (110, 0.1, 0.1),
    (500, 0.1, 0.1),  # stays at the floor
])
def test_decay_hand_values(step, cosine, linear):
    assert lr_lambda(step, 10, 110, "cosine", 0.1) == pytest.approx(cosine, abs=1e-12)
    assert lr_lambda(step, 10, 110, "linear", 0.1) == pytest.approx(linear, abs=1e-12)
    assert lr_lambda(step, 10, 110, "constant", 0.1) == 1.0


def test_no_warmup_and_zero_floor():
    assert lr_lambda(0, 0, 4, "linear", 0.0) == 1.0
    assert [lr_lambda(s, 0, 4, "linear", 0.0) for s in range(1, 5)] == [0.75, 0.5, 0.25, 0.0]


def test_with_lambdalr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_lambda, warmup_steps=2, total_steps=4,
                                                                     schedule="linear", min_ratio=0.0))
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [1.0, 2.0, 2.0, 1.0, 0.0]  # warmup 1/2, 2/2; then p = 0, 1/2, 1


@pytest.mark.parametrize("kwargs", [dict(schedule="step"), dict(min_ratio=1.5), dict(total_steps=0)])
def test_bad_settings(kwargs):
    args = dict(step=0, warmup_steps=1, total_steps=10) | kwargs
    with pytest.raises(ValueError):
        lr_lambda(**args)
