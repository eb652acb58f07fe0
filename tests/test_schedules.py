import pytest
import torch

from dalle.training.ema import EMA
from dalle.training.schedules import cosine, learning_rate, linear, schedule_steps


def test_cosine_endpoints_and_monotone():
    values = [cosine(s, 100, 1.0, 1 / 16) for s in range(0, 130)]
    assert values[0] == 1.0 and values[100] == 1 / 16 and values[-1] == 1 / 16
    assert values[50] == pytest.approx((1 + 1 / 16) / 2)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert cosine(5, 0, 1.0, 0.25) == 0.25  # a zero-length schedule is at its end value


def test_linear_ramp():
    values = [linear(s, 5000, 0.0, 6.6) for s in range(0, 6000, 100)]
    assert values[0] == 0.0 and linear(2500, 5000, 0.0, 6.6) == pytest.approx(3.3)
    assert linear(5000, 5000, 0.0, 6.6) == 6.6 and values[-1] == 6.6
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_learning_rate_paper_endpoints_and_warmup():
    total = 1000
    assert learning_rate(0, total, 1e-4, 1.25e-6) == 1e-4
    assert learning_rate(total, total, 1e-4, 1.25e-6) == 1.25e-6
    lrs = [learning_rate(s, total, 1e-4, 1.25e-6, warmup_steps=100) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[99] == pytest.approx(1e-4) and lrs[100] == pytest.approx(1e-4)
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:101]))
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))
    assert lrs[-1] == pytest.approx(1.25e-6)


def test_schedule_steps_scale_with_the_run():
    assert schedule_steps(None, 0.05, 3_000_000) == 150_000  # the paper's τ annealing
    assert schedule_steps(None, 0.5, 3000) == 1500
    assert schedule_steps(5000, 0.5, 3000) == 5000  # an explicit length wins
    assert schedule_steps(None, 0.0, 3000) == 0


def test_ema_decay_warms_up_to_the_configured_value():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.999)
    decays = []
    for n in (0, 80, 890, 20_000):
        ema.updates = n
        decays.append(ema.current_decay())
    assert decays == [pytest.approx(0.1), pytest.approx(0.9), pytest.approx(0.99), 0.999]
    assert EMA(torch.nn.Linear(2, 2), decay=0.9, warmup=False).current_decay() == 0.9


def test_ema_update_formula_and_buffers():
    model = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    ema.update(model)
    assert torch.allclose(ema.model_ema.weight, torch.full((3,), 2.0))  # 0.5·1 + 0.5·3
    assert torch.equal(ema.model_ema.running_mean, torch.full((3,), 7.0))  # buffers are copied
    assert not ema.model_ema.training and not ema.model_ema.weight.requires_grad
    state, updates = ema.state_dict(), ema.updates
    other = EMA(torch.nn.BatchNorm1d(3), decay=0.5)
    other.load_state_dict(state, updates)
    assert torch.equal(other.model_ema.weight, ema.model_ema.weight) and other.updates == 1
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
