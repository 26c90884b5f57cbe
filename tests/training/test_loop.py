"""The one training loop: schedule, record, gradients only into the trained parameters,
non-finite losses refused, EMA."""

from __future__ import annotations

import math

import pytest
import torch

from fiber_plugins.training import TrainingRecord, cosine_lr, train_loop


def test_cosine_lr_warms_up_then_decays_to_zero():
    assert cosine_lr(0, 1000, 1.0) == pytest.approx(0.01)
    assert cosine_lr(99, 1000, 1.0) == pytest.approx(1.0)
    assert cosine_lr(100, 1000, 1.0) == pytest.approx(1.0)
    assert cosine_lr(550, 1000, 1.0) == pytest.approx(0.5)
    assert cosine_lr(1000, 1000, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_the_loop_minimises_and_records_every_step():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    made, seen_lr = [], []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def step(i):
        seen_lr.append(made[0].param_groups[0]["lr"])
        loss = w.pow(2).sum()
        out = {"loss": loss}
        if i % 2 == 0:
            out["even"] = loss * 0 + i  # returned on some steps only
        return out

    record = train_loop(
        [w], step, steps=50, lr=0.1, optimizer=Recording,
        lr_schedule=lambda i, total, lr: lr * (total - i) / total, progress=False,
    )
    assert isinstance(record, TrainingRecord) and record.wall_time_s > 0
    assert len(record.logs["loss"]) == 50 and record.logs["loss"][-1] < 0.1 * record.logs["loss"][0]
    assert record.logs["even"] == [float(i) for i in range(0, 50, 2)]
    assert record.mean_last("even", 2) == 47.0 and record.mean_last("missing") is None
    assert seen_lr[:2] == [pytest.approx(0.1), pytest.approx(0.098)]
    assert w.grad is None  # gradients are cleared after every step


def test_gradients_reach_only_the_trained_parameters():
    frozen = torch.nn.Linear(2, 2)  # a subject inside the loss, with requires_grad left on
    w = torch.nn.Parameter(torch.ones(2))
    before = [p.detach().clone() for p in frozen.parameters()]
    train_loop(
        [w], lambda i: {"loss": frozen(w).pow(2).sum()}, steps=3, lr=0.1, progress=False
    )
    assert all(p.grad is None for p in frozen.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))


def test_a_non_finite_loss_is_refused_with_the_hint():
    w = torch.nn.Parameter(torch.ones(1))

    def step(i):
        return {"loss": w.sum() * (math.inf if i == 2 else 1.0)}

    with pytest.raises(FloatingPointError, match=r"inf at step 2; lower lr \(now 0.5\) or beta"):
        train_loop([w], step, steps=5, lr=0.5, nonfinite_hint="beta", progress=False)


def test_ema_weights_are_copied_in_at_the_end():
    pytest.importorskip("diffusers")

    def run(ema_decay):
        w = torch.nn.Parameter(torch.tensor([4.0]))
        train_loop(
            [w], lambda i: {"loss": w.pow(2).sum()}, steps=30, lr=0.2, lr_schedule=None,
            optimizer=torch.optim.SGD, ema_decay=ema_decay, progress=False,
        )
        return float(w.detach())

    plain, averaged = run(None), run(0.9)
    assert abs(plain) < abs(averaged) < 4.0  # the average lags behind the last iterate
