"""The offline demo: fibers of Color-MNIST test digits under the shipped subject and prior.

``fiber-plugins demo`` (and ``make demo``) runs this: NDTM samples of a few held-out digits whose
encoder features phi(x) = E(decolorize(x)) match the reference, a PNG grid, and ``report.html``
with per-sample fiber losses against the nearest-neighbour baseline and the background colours
the samples chose, against the known colour mixture.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import torch

from . import zoo
from ._utils import median
from .color_mnist_bench import BENCH_NDTM, consistency
from .data import color_mnist as cm
from .evaluation.metrics import NearestNeighbourBaseline
from .objectives import FiberObjective
from .reporting.html import Page
from .samplers import NDTMConfig, NDTMSampler
from .samplers.run_folder import check_out_dir

# the benchmark's NDTM settings with stochastic DDIM updates (eta 0.5): the same colour
# consistency and about 1.4x the fiber loss, with less pixel noise in the samples
# (benchmarks/color_mnist_settings.py: neighbour-pixel noise 0.056 vs 0.082 at eta 0)
DEMO_NDTM = {**BENCH_NDTM, "eta": 0.5}


def run_demo(
    out: str | Path,
    n: int = 4,
    steps: int = 25,
    seed: int = 0,
    device: str = "cpu",
    digits: tuple[int, ...] = (0, 1, 2, 3),
    overwrite: bool = False,
) -> Path:
    out = Path(out)
    check_out_dir(out, overwrite=overwrite, can_resume=False)  # before any model is loaded
    out.mkdir(parents=True, exist_ok=True)
    prior = zoo.load("color-mnist-prior", device=device)
    subject = zoo.load("color-mnist-subject", device=device)
    objective = FiberObjective(subject, name="E(decolorize(x))")

    g_test, y_test = cm.load_digits("test")
    pick = [int((y_test == d).nonzero()[0]) for d in digits]
    refs, _ = cm.make_colored(g_test[pick], torch.Generator().manual_seed(seed))

    t0 = time.perf_counter()
    sampler = NDTMSampler(prior, objective, NDTMConfig(num_steps=steps, **DEMO_NDTM))
    result = sampler.sample(references=refs, n=n, seed=seed)
    result.save(out, overwrite=overwrite)
    sample_time = time.perf_counter() - t0

    g_train, _ = cm.load_digits("train")
    pool, _ = cm.make_colored(g_train, torch.Generator().manual_seed(99))
    targets = cast(torch.Tensor, result.targets)  # one objective: a (R, K) tensor
    nn_loss, _ = NearestNeighbourBaseline(objective, pool)(targets)

    page = Page("fiber-plugins demo: what E(decolorize(x)) does not see")
    page.text(
        "Each row: a held-out Color-MNIST digit (red frame) and NDTM samples from the shipped "
        "diffusion prior whose subject features phi(x) = E(decolorize(x)) match the reference. "
        "The subject ignores colour by construction, so its fiber is the same digit in every "
        "colouring (b, h(b)): the samples should keep the digit and vary the colours."
    )
    page.image("grid.png", "reference and fiber samples")
    page.heading("Fidelity: fiber loss per sample vs the nearest-neighbour baseline")
    rows = []
    for r in range(result.num_references):
        losses = result.fiber_loss[r]
        rows.append(
            [f"digit {digits[r]}"]
            + [("failed" if result.failed[r, m] else float(losses[m])) for m in range(n)]
            + [float(nn_loss[r]), median(losses[~result.failed[r]]) / float(nn_loss[r])]
        )
    page.table(
        ["reference"] + [f"sample {m}" for m in range(n)] + ["nearest neighbour", "median / NN"],
        rows,
    )
    page.text(
        "Nearest neighbour: the fiber loss of the closest of the 4,000 training digits in phi "
        "space (the paper's Table 5 baseline). Lower is closer to the fiber."
    )
    page.heading("Consistency: background colours of the samples vs the known mixture")
    _colour_histogram(result, out / "colours.png")
    page.image("colours.png", "recovered background colours against the mixture density")
    cons = consistency(result.images[~result.failed])
    page.text(
        f"Colour KL to the mixture: {cons['kl']:.3f}; Wasserstein-1: {cons['w1']:.3f} "
        f"({cons['num_colours']} channel colours; few samples make these estimates noisy: "
        "the benchmark uses more)."
    )
    page.text(
        f"{result.num_references * n} samples in {sample_time:.1f} s on {device}; "
        f"settings: T={steps}, {DEMO_NDTM}.",
        cls="note",
    )
    page.write(out / "report.html")
    print(result.summary())
    print(f"nearest-neighbour baseline (median): {median(nn_loss):.4g}")
    return out


def _colour_histogram(result, path: Path) -> None:
    import numpy as np

    from ._utils import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    ok = ~result.failed
    b = cm.border_mean(result.images[ok]).flatten().numpy()
    grid = np.linspace(0, 1, 200)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    ax.hist(b, bins=30, range=(0, 1), density=True, alpha=0.6, label="samples (all channels)")
    ax.plot(grid, cm.mixture_pdf(grid), "k-", label="known mixture")
    ax.set_xlabel("background colour b")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
