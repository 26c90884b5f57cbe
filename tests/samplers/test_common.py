"""RowOptimiser: the one per-row SGD / Adam of the samplers (NDTM, pixel inversion, noise
optimisation, refinement): its numbers, its frozen rows and its failure causes."""

from __future__ import annotations

import pytest
import torch

from fiber_plugins.samplers._common import RowOptimiser


def _adam_by_hand(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """NDTM's hand-written Adam before RowOptimiser owned it (the formulas its samples use)."""
    u = torch.zeros_like(grads[0])
    m, v = torch.zeros_like(u), torch.zeros_like(u)
    for k, g in enumerate(grads, start=1):
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        u = u - lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
    return u


def test_adam_is_bit_identical_to_the_hand_written_loop():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 2, 5, 7, generator=gen) * 10 ** (i - 2) for i in range(5)]
    opt = RowOptimiser("adam", 0.07)
    u = torch.zeros_like(grads[0])
    rows = torch.ones(3, dtype=torch.bool)
    for g in grads:
        u, bad = opt.step(0, u, g, rows)
        assert not bad.any()
    assert torch.equal(u, _adam_by_hand(grads, 0.07))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_rows_left_out_keep_their_value_and_moments(kind):
    gen = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    opt = RowOptimiser(kind, 0.1)
    p0 = torch.zeros(2, 4)
    p1, _ = opt.step(0, p0, g1, torch.tensor([True, False]))
    assert torch.equal(p1[1], p0[1]) and not torch.equal(p1[0], p0[0])
    p2, _ = opt.step(0, p1, g2, torch.tensor([True, True]))
    # row 1 moves as if g2 were its first gradient (Adam step 2 bias-corrects its zero moment
    # from step 1, so compare with a fresh optimiser only for SGD)
    if kind == "sgd":
        assert torch.equal(p2[1], p0[1] - 0.1 * g2[1])
    assert torch.isfinite(p2).all()


def test_failure_causes_are_told_apart_and_frozen():
    opt = RowOptimiser("adam", 1e38)
    grad = torch.tensor([[1.0, 1.0], [float("nan"), 0.0], [1e22, 1.0], [1.0, 1.0], [1.0, 1.0]])
    rows = torch.tensor([True, True, True, True, False])
    param = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [-3e38, 0.0], [0.0, 0.0]])
    out = opt.update(0, param, grad, rows)
    assert out.bad_gradient.tolist() == [False, True, False, False, False]
    # 1e-3 * (1e22)^2 overflows float32
    assert out.bad_moment.tolist() == [False, False, True, False, False]
    assert out.bad_update.tolist() == [False, False, False, True, False]  # -3e38 - 1e38 = -inf
    assert out.bad.tolist() == [False, True, True, True, False]
    assert torch.equal(out.param[1:], param[1:])  # failed and left-out rows do not move
    assert torch.isfinite(out.param[0]).all() and (out.param[0] < 0).all()
    # step() is the same update, reduced to (param, any cause)
    p, bad = RowOptimiser("adam", 1e38).step(0, param, grad, rows)
    assert torch.equal(p, out.param) and torch.equal(bad, out.bad)
