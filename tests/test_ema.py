"""EMA: decay limits, warm-up formula, buffers, state round trip."""

import pytest
import torch
from torch import nn

from scripts.train_dit import EMA


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.normal_()
    return model


def test_copy_is_frozen_and_in_eval_mode():
    ema = EMA(make_model(0))
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_decay_zero_copies_and_decay_one_freezes():
    model, other = make_model(0), make_model(1)
    copying = EMA(model, decay=0.0, warmup=False)
    copying.update(other)
    for name, value in copying.model.state_dict().items():
        torch.testing.assert_close(value, other.state_dict()[name], msg=name)

    frozen = EMA(model, decay=1.0, warmup=False)
    frozen.update(other)
    for ema_p, p in zip(frozen.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(ema_p, p)
    # Buffers (BatchNorm statistics) are copied, not averaged.
    assert torch.equal(frozen.model[1].running_mean, other[1].running_mean)


def test_update_is_the_weighted_average():
    model, other = make_model(0), make_model(1)
    ema = EMA(model, decay=0.75, warmup=False)
    ema.update(other)
    torch.testing.assert_close(ema.model[0].weight, 0.75 * model[0].weight + 0.25 * other[0].weight)


def test_warmup_formula():
    model = make_model(0)
    ema = EMA(model, decay=0.9, warmup=True)
    decays = []
    for _ in range(100):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays[0] == pytest.approx(1 / 10)
    assert decays[5] == pytest.approx(6 / 15)
    assert decays[-1] == 0.9  # (1 + n) / (10 + n) passes 0.9 at n = 80
    assert ema.num_updates == 100
    assert EMA(model, decay=0.9, warmup=False).current_decay() == 0.9


def test_state_round_trip_copies_into_existing_tensors():
    ema = EMA(make_model(0), decay=0.99)
    for _ in range(3):
        ema.update(make_model(1))
    restored = EMA(make_model(2), decay=0.5, warmup=False)
    weight_before = restored.model[0].weight
    restored.load_state_dict(ema.state_dict())
    assert restored.model[0].weight is weight_before
    assert (restored.decay, restored.num_updates, restored.warmup) == (0.99, 3, True)
    for name, value in ema.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], value), name


def test_rejects_a_different_architecture():
    with pytest.raises(ValueError, match="pass it unwrapped"):
        EMA(make_model(0)).update(nn.Linear(3, 4))
