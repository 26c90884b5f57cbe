"""The ideal Fourier low-pass filter: identity at cutoff 1, kills a checkerboard, keeps constants,
matches a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from fiber_plugins.filters import lowpass, lowpass_mask


def test_cutoff_one_is_identity():
    x = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lowpass(x, 1.0), x)
    # documented jump: cutoff=1 also keeps the corner frequencies outside the Nyquist disc
    # (radius up to sqrt(2)), any cutoff < 1 is the disc itself; a stripe at exactly Nyquist
    # along one axis (radius 1) survives cutoff 1 and goes at 0.99
    stripe = (torch.arange(16) % 2).float().expand(1, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(lowpass(stripe, 1.0), stripe)
    torch.testing.assert_close(lowpass(stripe, 0.99), torch.zeros_like(stripe), atol=1e-6, rtol=0)


def test_checkerboard_is_removed_and_constant_kept():
    h = w = 16
    checker = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2).float() * 2 - 1
    x = 0.3 + 0.5 * checker.expand(1, 3, h, w)
    out = lowpass(x, 0.5)
    torch.testing.assert_close(out, torch.full_like(x, 0.3), atol=1e-6, rtol=0)
    const = torch.full((2, 1, 9, 7), -0.7)  # odd sizes too
    for cutoff in (0.05, 0.5, 0.9):
        torch.testing.assert_close(lowpass(const, cutoff), const, atol=1e-6, rtol=0)


def test_matches_a_hand_computation_on_a_1d_case():
    """Rows constant along H: x[w] = 1 + cos(2 pi w / 16) + 0.5 cos(2 pi 6 w / 16). Frequencies
    1/16 and 6/16 cycles/pixel sit at 0.125 and 0.75 of Nyquist: cutoff 0.5 keeps the first."""
    w = torch.arange(16, dtype=torch.float64)
    low = 1 + torch.cos(2 * math.pi * w / 16)
    high = 0.5 * torch.cos(2 * math.pi * 6 * w / 16)
    x = (low + high).expand(1, 1, 8, 16)
    torch.testing.assert_close(lowpass(x, 0.5), low.expand(1, 1, 8, 16))
    torch.testing.assert_close(lowpass(x, 0.8), x)  # 0.75 <= 0.8: both kept
    torch.testing.assert_close(lowpass(x, 0.1), torch.ones_like(x))  # only the mean
    assert lowpass(x, 0.5).dtype == torch.float64


def test_mask_counts_and_shape():
    m = lowpass_mask((16, 16), 0.5)
    assert m.shape == (16, 9)
    # full-spectrum count of the disc radius 4 bins: |k|^2 <= 16 lattice points = 49
    full = torch.cat([m, m[:, 1:-1].flip(1)], 1)
    assert int(full.sum()) == 49


def test_differentiable_dtype_and_errors():
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    lowpass(x, 0.5).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert lowpass(x.detach().bfloat16(), 0.5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"cutoff must be in \(0, 1\].*got 1.5"):
        lowpass(x, 1.5)
    with pytest.raises(ValueError, match="got 0"):
        lowpass(x, 0)
    with pytest.raises(TypeError, match="'half'"):
        lowpass(x, "half")
