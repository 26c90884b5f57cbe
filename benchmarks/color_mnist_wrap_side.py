"""Does a Color-MNIST denoiser use the digit to put the background on its side of h's wrap?

Under the colour law a channel's digit is lighter than its background when b < 0.5 and darker
when b >= 0.5 (h(b) = (b + 0.5) mod 1). So once the digit's contrast is visible in x_t, the exact
denoiser E[x0 | x_t] keeps the background of x0_hat on the side of 0.5 that the digit's sign
names, however noisy the background itself is: its posterior is truncated at 0.5.

This script colours test digits on the law with b drawn uniformly from [0.48, 0.52] in every
channel, noises them to a few noise levels of the prior's sampling grid (seeded noise), denoises
once and counts, per level, the channels whose x0_hat background (border mean) lies on the other
side of 0.5 from the true b. Two references are computed from the same x_t:

- ``posterior``: E[b | x_t, digit] under the colour law
  (:func:`fiber_plugins.data.color_mnist.posterior_clean`); it never crosses;
- ``no truncation``: the likelihood's estimate of b from x_t and the digit on the true branch
  (the channel's pixel sum, the digit's contrast removed), i.e. a denoiser that reads b off the
  image but does not know that the digit's sign fixes the side.

A network whose crossing share is near the second reference does not use the sign-side rule; the
wrong-branch colours of the unguided samples at the wrap (``color_mnist_prior_quality.py``)
are made this way: a background that drifts across 0.5 under a digit that stays. Flow-matching
priors only (x_t = (1 - t) x0 + t eps)::

    python benchmarks/color_mnist_wrap_side.py color-mnist-prior --out /tmp/side.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

LEVELS = (0.1, 0.2, 0.3, 0.45, 0.6)
HALF_WIDTH = 0.02


def crossing_shares(
    prior,
    levels=LEVELS,
    num: int = 512,
    steps: int = 25,
    seed: int = 0,
    half_width: float = HALF_WIDTH,
) -> dict:
    """Per noise level of ``prior``'s grid nearest to ``levels``: the share of channel colours
    whose x0_hat background lies across 0.5 from the true b, for the prior and the two
    references (module docstring). Returns {"levels", "prior", "posterior", "no_truncation",
    "num_colours", "half_width"}."""
    from fiber_plugins.data import color_mnist as cm

    g, _ = cm.load_digits("test")
    gen = torch.Generator().manual_seed(seed)
    grid = prior.timesteps(steps)
    picked = [min(grid, key=lambda st: abs(st.level - lv)) for lv in levels]
    for st in picked:
        if abs(float(st.a_t) + float(st.s_t) - 1) > 1e-4:
            raise SystemExit(
                f"the wrap-side check is for flow-matching priors (a_t + s_t = 1); this prior's "
                f"step at level {st.level:.2f} has a_t {float(st.a_t):.4f}, s_t {float(st.s_t):.4f}"
            )
    n_pix = g[0].numel()
    out: dict[str, list[float]] = {"prior": [], "posterior": [], "no_truncation": []}
    for st in picked:
        digits = g[torch.randint(0, g.shape[0], (num,), generator=gen)]
        b = 0.5 + half_width * (2 * torch.rand(num, 3, generator=gen) - 1)
        x0 = cm.colorize(digits, b) * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        xt = prior.add_noise(x0, noise, st)
        t, a = float(st.s_t), float(st.a_t)
        upper = b >= 0.5
        with torch.no_grad():
            _, x0_hat = prior.predict(xt, st)
        b_net = cm.border_mean((x0_hat.clamp(-1, 1) + 1) / 2)
        b_post = cm.border_mean((cm.posterior_clean(xt, torch.full((num,), t), digits) + 1) / 2)
        sign = torch.where(upper, -1.0, 1.0)  # the digit's contrast on the true branch
        b_lik = (xt.sum((2, 3)) + a * n_pix - a * sign * digits.sum((2, 3))) / (2 * a * n_pix)
        for key, est in (("prior", b_net), ("posterior", b_post), ("no_truncation", b_lik)):
            out[key].append(float(((est >= 0.5) != upper).float().mean()))
    return {
        "levels": [float(st.level) for st in picked],
        **out,
        "num_colours": 3 * num,
        "half_width": half_width,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    first = results[0]
    ax.plot(first["levels"], first["posterior"], "k-", marker="o", label="exact posterior")
    ax.plot(
        first["levels"],
        first["no_truncation"],
        "k--",
        marker="s",
        label="no truncation (reads b, ignores the digit's side)",
    )
    for r in results:
        ax.plot(r["levels"], r["prior"], marker="^", label=r["name"])
    ax.set(
        xlabel="noise level t of x_t",
        ylabel="share of x0_hat backgrounds across 0.5",
        title=f"background side at h's wrap (b ~ U(0.5 ± {first['half_width']:g}), "
        f"{first['num_colours']} colours per level)",
        ylim=(-0.01, None),
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    from color_mnist_prior_quality import load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prior", nargs="+", help="flow-matching prior folders or zoo names")
    p.add_argument("--name", nargs="+", default=None, help="the priors' labels (default: PRIOR)")
    p.add_argument("--num", type=int, default=512, help="digits per noise level (3 colours each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="the figure (PNG); JSON next to it")
    args = p.parse_args(argv)
    names = args.name or args.prior
    if len(names) != len(args.prior):
        p.error(f"--name gives {len(names)} labels for {len(args.prior)} priors")
    torch.set_num_threads(args.threads)
    results = []
    for prior_name, name in zip(args.prior, names):
        prior = load(prior_name)
        if getattr(prior, "conditional_on_features", False) or not hasattr(prior, "predict"):
            p.error(f"{prior_name!r} has no unconditional denoiser to look at")
        r = {"name": name, **crossing_shares(prior, num=args.num, seed=args.seed)}
        results.append(r)
        print(f"{name} ({r['num_colours']} colours per level):")
        print("| noise level | prior | exact posterior | no truncation |\n|---|---|---|---|")
        for i, lv in enumerate(r["levels"]):
            print(
                f"| {lv:.2f} | {r['prior'][i]:.3f} | {r['posterior'][i]:.3f} "
                f"| {r['no_truncation'][i]:.3f} |",
                flush=True,
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot(results, args.out)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return results


if __name__ == "__main__":
    main()
