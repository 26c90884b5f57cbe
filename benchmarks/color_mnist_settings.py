"""NDTM settings on Color-MNIST: what guidance schedule, eta and learning rate do to fidelity,
colour consistency and image noise.

NDTM on the shipped Color-MNIST priors and subject (T=25, N=3: the benchmark's settings, see
``fiber_plugins.color_mnist_bench.BENCH_NDTM``), 8 held-out references x 4 samples,
one row per setting. Columns: median and 90th-percentile fiber loss (fidelity); colour KL and W1
of the recovered background colours against the known mixture (consistency); the share of
channel colours in the band [0.35, 0.6] next to the mixture's own share (where guided samples
run short, see docs/color_mnist.md); and the mean absolute difference of neighbouring pixels
(image noise; the references' value is printed for scale). Saves a markdown table and a
histogram of the recovered colours as ``benchmarks/results/color-mnist-settings/``::

    python benchmarks/color_mnist_settings.py            # ~9 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import fiber_plugins as fp
from fiber_plugins import zoo
from fiber_plugins._utils import median
from fiber_plugins.color_mnist_bench import BENCH_NDTM, consistency
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.samplers.config import GuidanceSchedule

OUT = Path(__file__).resolve().parent / "results" / "color-mnist-settings"
BAND = (0.35, 0.60)

# (name, prior, overrides of the benchmark's NDTM settings)
SETTINGS = [
    ("unguided", "color-mnist-prior", {"guidance": 0.0}),
    ("NDTM, benchmark settings (constant 0.3, eta 0)", "color-mnist-prior", {}),
    ("NDTM, eta 0.5", "color-mnist-prior", {"eta": 0.5}),
    ("NDTM, lr 0.05 -> 0.001", "color-mnist-prior", {"lr_start": 0.05, "lr_end": 0.001}),
    ("NDTM, kappa 1e-2", "color-mnist-prior", {"kappa": 1e-2}),
    (
        "NDTM, interval [0.3, 0.9]",
        "color-mnist-prior",
        {"guidance": GuidanceSchedule("interval", 1.0, low=0.3, high=0.9)},
    ),
    (
        "NDTM, interval [0.1, 1]",
        "color-mnist-prior",
        {"guidance": GuidanceSchedule("interval", 1.0, low=0.1, high=1.0)},
    ),
    (
        "NDTM, ramp 1 -> 0",
        "color-mnist-prior",
        {"guidance": GuidanceSchedule("ramp", 1.0, final=0.0)},
    ),
    ("unguided (OOD prior)", "color-mnist-prior-ood", {"guidance": 0.0}),
    ("NDTM, benchmark settings (OOD prior)", "color-mnist-prior-ood", {}),
]


def neighbour_difference(images01: torch.Tensor) -> float:
    """Mean |x(i+1, j) - x(i, j)| and |x(i, j+1) - x(i, j)|: high for speckled images."""
    x = images01.reshape(-1, *images01.shape[-3:])
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return float((dv + dh) / 2)


def colours(images01: torch.Tensor) -> np.ndarray:
    return cm.border_mean(images01.reshape(-1, *images01.shape[-3:])).flatten().numpy()


def band_share(b: np.ndarray) -> float:
    return float(((b >= BAND[0]) & (b <= BAND[1])).mean())


def wrong_branch_by_bin(prior, n: int, seed: int, steps: int) -> list[tuple[float, int, float]]:
    """Unguided samples: per background-colour bin of width 0.1, the number of channel colours
    and the share whose digit colour is on the other branch of h (|f - h(b)| > 0.3, with f the
    mean over digit pixels, found as pixels > 0.25 away from the background in some channel)."""
    noise = torch.randn(n, *prior.latent_shape, generator=torch.Generator().manual_seed(seed))
    x = (prior.sample_unguided(noise, num_steps=steps).clamp(-1, 1) + 1) / 2
    return cm.wrong_branch_shares(x)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--references", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--branch-samples", type=int, default=512, help="unguided samples per prior")
    p.add_argument("--only", default=None, help="comma-separated row numbers (1-based) to run")
    p.add_argument("--out-dir", type=Path, default=OUT)
    args = p.parse_args(argv)
    chosen = SETTINGS
    if args.only:
        chosen = [SETTINGS[int(i) - 1] for i in args.only.split(",")]

    objective = fp.FiberObjective(zoo.load("color-mnist-subject"), name="E(decolorize(x))")
    g, _ = cm.load_digits("test")
    pick = torch.randperm(g.shape[0], generator=torch.Generator().manual_seed(args.seed))
    refs, _ = cm.make_colored(
        g[pick[: args.references]], torch.Generator().manual_seed(args.seed + 1)
    )
    mix = cm.mixture_cdf(np.array(BAND))
    mixture_band = float(mix[1] - mix[0])
    priors: dict = {}
    rows, hist = [], {}
    for name, prior_name, overrides in chosen:
        prior = priors.setdefault(prior_name, zoo.load(prior_name))
        cfg = {**BENCH_NDTM, "inner_steps": args.inner_steps, **overrides}
        sampler = fp.NDTMSampler(prior, objective, num_steps=args.steps, **cfg)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = sampler.sample(references=refs, n=args.samples, seed=args.seed, progress=False)
        secs = time.perf_counter() - t0
        b = colours(res.images)
        hist[name] = b
        loss = res.fiber_loss.flatten()
        rows.append(
            {
                "setting": name,
                "median": median(loss),
                "q90": float(loss.quantile(0.9)),
                **{k: v for k, v in consistency(res.images).items() if k != "num_colours"},
                "band_share": band_share(b),
                "noise": neighbour_difference(res.images),
                "s_per_sample": secs / loss.numel(),
            }
        )
        r = rows[-1]
        print(
            f"{name}: median {r['median']:.3g}, KL {r['kl']:.3f}, W1 {r['w1']:.3f}, "
            f"band {r['band_share']:.2f}, noise {r['noise']:.3f}",
            flush=True,
        )
    n = args.references * args.samples
    lines = [
        "# NDTM settings on Color-MNIST",
        "",
        f"{args.references} held-out references x {args.samples} samples ({n} samples, "
        f"{3 * n} channel colours per row), T={args.steps}, N={args.inner_steps}, seed "
        f"{args.seed}, the benchmark's NDTM settings unless the row says otherwise; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Command: "
        f"`python benchmarks/color_mnist_settings.py{' ' + ' '.join(argv) if argv else ''}`.",
        "",
        f"Colour band: share of channel colours in [{BAND[0]}, {BAND[1]}]; the mixture puts "
        f"{mixture_band:.2f} there. Noise: mean absolute difference of neighbouring pixels; the "
        f"references have {neighbour_difference(refs):.3f}.",
        "",
        "| setting | median fiber loss | 90th pct. | colour KL | colour W1 | colour band | noise "
        "| s / sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setting']} | {r['median']:.3g} | {r['q90']:.3g} | {r['kl']:.3f} | {r['w1']:.3f} "
        f"| {r['band_share']:.2f} | {r['noise']:.3f} | {r['s_per_sample']:.2f} |"
        for r in rows
    ]
    lines += [
        "",
        "The priors' colour relation near the wrap of h: unguided samples "
        f"({args.branch_samples} per prior, T={args.steps}); per bin of the background colour b, "
        "the channel colours in the bin and the share whose digit colour is on the other branch "
        "of h (|f - h(b)| > 0.3).",
        "",
        "| prior | "
        + " | ".join(f"b in [{i / 10:.1f}, {(i + 1) / 10:.1f})" for i in range(10))
        + " |",
        "|---|" + "---|" * 10,
    ]
    for prior_name in ("color-mnist-prior", "color-mnist-prior-ood"):
        prior = priors.get(prior_name) or zoo.load(prior_name)
        cells = wrong_branch_by_bin(prior, args.branch_samples, args.seed, args.steps)
        lines.append(
            f"| {prior_name} | "
            + " | ".join(f"{w:.2f} ({c})" if c else "-" for _, c, w in cells)
            + " |"
        )
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.md").write_text(text)
    (args.out_dir / "results.json").write_text(json.dumps({"rows": rows}, indent=2))
    _plot(hist, args.out_dir / "colour_histograms.png")
    print(f"wrote {args.out_dir}/results.md, results.json, colour_histograms.png")
    return rows


def _plot(hist: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = [k for k in hist if k.startswith(("unguided", "NDTM, benchmark"))]
    if not show:
        return
    fig, axes = plt.subplots(1, len(show), figsize=(3.0 * len(show), 2.6), dpi=120, sharey=True)
    axes = np.atleast_1d(axes)
    grid = np.linspace(0, 1, 401)
    for ax, name in zip(axes, show):
        ax.hist(hist[name], bins=20, range=(0, 1), density=True, color="tab:blue", alpha=0.7)
        ax.plot(grid, cm.mixture_pdf(grid), color="k", lw=1.2, label="mixture")
        ax.axvspan(*BAND, color="tab:orange", alpha=0.15, label="band")
        ax.set_title(name.replace(", benchmark settings", "").replace(" (", "\n("), fontsize=8)
        ax.set_xlabel("recovered background colour b")
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
