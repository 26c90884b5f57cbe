"""How well an unconditional Color-MNIST prior has learnt the colour law, from unguided samples.

Draws ``--n`` unguided samples (T=``--steps``, seeded noise, the grid and update the samplers
use: :meth:`DiffusionPrior.sample_unguided`, DDIM eta=0 / Euler for flow matching; ``--eta 1``
for DDPM-like stochastic updates, whose step noise is seeded too) and prints

- the colour KL and W1 of the recovered background colours against the known mixture, with the
  Color-MNIST benchmark's estimator (:func:`fiber_plugins.color_mnist_bench.consistency`: a
  20-bin histogram KL over all 3 n channel colours);
- per background-colour bin of width 0.1, the number of channel colours and the share whose
  digit colour is on the wrong branch of h (|f - h(b)| > 0.3), computed exactly as
  ``benchmarks/color_mnist_settings.py``'s ``wrong_branch_by_bin`` (same noise for the same
  seed and n, so the two agree sample for sample);
- the seconds per sampled image.

``--wrap-probe PNG`` adds a look inside the network at h's wrap (b = 0.5): test digits coloured
on the law with one background colour b in all three channels, b on a grid across [0.3, 0.7],
are noised to a few noise levels (fixed noise) and denoised once; the figure shows, per level,
the mean digit colour of the denoised estimate x0_hat against b (with h(b)) and the share of
digits whose estimate is on the wrong branch. At low and middle noise levels the background
colour is fixed by hundreds of pixels, so a network that has learnt h puts the jump at 0.5.

``--wrap-edge PNG`` plots, per prior, its colours near the wrap in bins of 0.025 (on h's branch
and off it) against the count the colour law expects there: it shows where the wrong-branch
colours of the [0.4, 0.5) bin lie and whether they add to the law's colours or replace them.

Each ``PRIOR`` is a diffusers prior folder (what :func:`fiber_plugins.load_prior` reads), a
zoo name (``color-mnist-prior``), or ``exact``: the exact denoiser of the training distribution
on the same sampling grid (:class:`ExactDenoiser`; it separates the sampler's error from the
network's). A conditional fiber model (``color-mnist-conditional``) has no
unguided samples: it is measured on 4 samples for each of n / 4 held-out references, conditioned
on their features, for comparison. Writes ``quality.json`` and ``quality.md`` into
``--out-dir`` (appending a row per prior)::

    python benchmarks/color_mnist_prior_quality.py color-mnist-prior --n 512 --out-dir /tmp/q
    python benchmarks/color_mnist_prior_quality.py color-mnist-prior color-mnist-conditional \
        --n 512 --wrap-edge /tmp/q/wrap_edge.png --out-dir /tmp/q
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "color-mnist-prior-quality"


def load(prior: str):
    import fiber_plugins as fp
    from fiber_plugins import zoo

    if prior == "exact":
        return ExactDenoiser()
    if Path(prior).expanduser().is_dir():
        return fp.load_prior(prior)
    return zoo.load(prior)


class ExactDenoiser:
    """The exact denoiser of the training distribution (the 4,000 training digits, each in
    every colouring of the colour law), sampled on the shipped flow prior's grid with its Euler
    update: E[x0 | x_t] = sum_i p(g_i | x_t) E[x0 | x_t, g_i], all in closed form
    (:func:`fiber_plugins.data.color_mnist.colour_components`). It memorises the digits, so its
    samples are training digits; what it shows is whether the sampler itself keeps h's wrap
    when the denoiser is exact. PRIOR name ``exact``."""

    latent_shape = (3, 32, 32)
    conditional_on_features = False

    def __init__(self, batch: int = 64):
        from fiber_plugins import zoo
        from fiber_plugins.data import color_mnist as cm

        self.grid = zoo.load("color-mnist-prior")  # timesteps and update only
        self.digits = cm.load_digits("train")[0].double().flatten(1)  # (D, P)
        self.batch = batch

    def x0(self, x: torch.Tensor, t: float, digits: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t] for x_t (N, 3, H, W) at noise level t (model units, x_t = (1 - t) x0 +
        t eps), over ``digits`` (D, P) (default: the training digits)."""
        from fiber_plugins.data import color_mnist as cm

        g = self.digits if digits is None else digits
        n_pix = g.shape[1]
        xf = x.double().flatten(2)  # (N, 3, P)
        tt = torch.tensor(min(max(t, 1e-6), 1 - 1e-6), dtype=torch.float64)
        a = 1 - tt
        sum_g, sq_g = g.sum(1), g.pow(2).sum(1)  # (D,)
        cov = xf @ g.T - xf.mean(2, keepdim=True) * sum_g  # (N, 3, D)
        log_w, mean_b, signs = cm.colour_components(xf.sum(2, keepdim=True), cov, sum_g, tt, n_pix)
        # log p(x_t,c | g_i) up to a constant of x_t: the components, plus the digit's own term
        log_p = torch.logsumexp(log_w, 0) - a**2 * (sq_g - sum_g**2 / n_pix) / (2 * tt**2)
        w_digit = torch.softmax(log_p.sum(1), -1)[:, None]  # (N, 1, D)
        comp = torch.softmax(log_w, 0)  # (4, N, 3, D)
        b_hat = (comp * mean_b).sum(0)
        s_hat = (comp * signs.view(-1, 1, 1, 1)).sum(0)
        x0 = ((2 * b_hat - 1) * w_digit).sum(-1, keepdim=True) + (s_hat * w_digit) @ g
        return x0.view_as(x).to(x.dtype)

    def sample_unguided(self, noise, num_steps=25, eta=0.0, step_noises=None) -> torch.Tensor:
        if eta != 0:
            raise SystemExit("the exact denoiser is sampled deterministically (eta 0)")
        out = []
        for x in noise.split(self.batch):
            for step in self.grid.timesteps(num_steps):
                x0 = self.x0(x, float(step.s_t))
                x = self.grid.update(x0, (x - step.a_t * x0) / step.s_t, step)
            out.append(x)
        return torch.cat(out)


def unguided(
    prior, n: int, seed: int, steps: int, batch: int = 256, eta: float = 0.0
) -> torch.Tensor:
    """n unguided samples in [0, 1]; the noise is color_mnist_settings.wrong_branch_by_bin's.
    With ``eta > 0`` the step noise comes from a generator seeded ``seed + 1``. A conditional
    fiber model has no unguided samples; it samples 4 images for each of n / 4 held-out
    references (the benchmark's ``references(n // 4, seed)``), conditioned on their features."""
    if getattr(prior, "conditional_on_features", False):
        return conditional_samples(prior, n, seed, steps, eta)
    noise = torch.randn(n, *prior.latent_shape, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(0, n, batch):
        x = noise[i : i + batch]
        z = [torch.randn(x.shape, generator=gen) for _ in range(steps)] if eta > 0 else None
        out.append(prior.sample_unguided(x, num_steps=steps, eta=eta, step_noises=z).clamp(-1, 1))
    return (torch.cat(out) + 1) / 2


def conditional_samples(model, n: int, seed: int, steps: int, eta: float = 0.0) -> torch.Tensor:
    """n samples in [0, 1] of a conditional fiber model of the benchmark's subject: 4 per
    held-out reference (n must be a multiple of 4), Euler with ``steps`` steps."""
    from fiber_plugins import zoo
    from fiber_plugins.color_mnist_bench import references
    from fiber_plugins.objectives import FiberObjective
    from fiber_plugins.samplers import ConditionalConfig, ConditionalFiberSampler

    if eta != 0 or n % 4:
        raise SystemExit(
            f"a conditional fiber model is sampled deterministically, 4 images per reference: "
            f"got eta {eta:g}, n {n} (use eta 0 and a multiple of 4)"
        )
    objective = FiberObjective(zoo.load("color-mnist-subject"), name="E(decolorize(x))")
    sampler = ConditionalFiberSampler(model, objective, ConditionalConfig(num_steps=steps))
    res = sampler.sample(references=references(n // 4, seed), n=4, seed=seed, progress=False)
    return res.images.reshape(-1, *res.images.shape[-3:])


def wrong_branch(x: torch.Tensor) -> list[tuple[float, int, float]]:
    """Per b-bin of width 0.1: (bin start, channel colours, share on the wrong branch of h)."""
    from fiber_plugins.data import color_mnist as cm

    return cm.wrong_branch_shares(x)


def measure(prior, n: int = 256, steps: int = 25, seed: int = 0, eta: float = 0.0) -> dict:
    """Colour KL / W1 (the benchmark's estimator), wrong-branch shares per b-bin, s / image."""
    from fiber_plugins.color_mnist_bench import consistency

    t0 = time.perf_counter()
    x = unguided(prior, n, seed, steps, eta=eta)
    secs = time.perf_counter() - t0
    cells = wrong_branch(x)
    return {
        **consistency(x),
        "wrong_branch": [{"bin": lo, "colours": c, "share": w} for lo, c, w in cells],
        "wrap_edge": wrap_edge(x),
        "max_wrong_share": max((w for _, c, w in cells if c), default=math.nan),
        "n": n,
        "steps": steps,
        "eta": eta,
        "seed": seed,
        "seconds_per_image": secs / n,
        "torch_threads": torch.get_num_threads(),
    }


def wrap_edge(x: torch.Tensor, lo: float = 0.3, hi: float = 0.7, width: float = 0.025) -> list:
    """Channel colours near h's wrap in bins of ``width``: per bin its start, the colours on
    h's branch and off it, and the count the colour law expects there (all colours of ``x``
    times the mixture's mass in the bin)."""
    import numpy as np

    from fiber_plugins.data import color_mnist as cm

    b, f = cm.channel_colours(x)
    off = cm.off_branch(b, f).flatten()
    b = b.flatten()
    rows = []
    for k in range(round((hi - lo) / width)):
        a = lo + k * width
        inside = (b >= a) & (b < a + width)
        mass = cm.mixture_cdf(np.array([a + width, a]))
        rows.append(
            {
                "bin": round(a, 4),
                "on_law": int((inside & ~off).sum()),
                "off_law": int((inside & off).sum()),
                "expected": float((mass[0] - mass[1]) * b.numel()),
            }
        )
    return rows


def plot_wrap_edge(results: list[dict], path: Path) -> None:
    """One panel per measured prior: its colours per fine b-bin near the wrap, on and off h's
    branch, against the count the colour law expects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(results), 2)
    rows_ = -(-len(results) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.6 * rows_), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, results):
        rows = r["wrap_edge"]
        left = [c["bin"] for c in rows]
        w = rows[1]["bin"] - rows[0]["bin"]
        on = [c["on_law"] for c in rows]
        ax.bar(left, on, width=w, align="edge", color="tab:blue", label="on h's branch")
        ax.bar(
            left,
            [c["off_law"] for c in rows],
            width=w,
            align="edge",
            bottom=on,
            color="tab:red",
            label="on the wrong branch",
        )
        ax.stairs(
            [c["expected"] for c in rows],
            [*left, left[-1] + w],
            color="k",
            lw=1.2,
            label="the colour law's count",
        )
        ax.axvline(0.5, color="grey", lw=0.5)
        top = max(max(c["on_law"] + c["off_law"], c["expected"]) for c in rows)
        ax.set(title=r["prior"], xlabel="background colour b", ylim=(0, 1.08 * top))
        ax.set_ylabel(f"channel colours (of {r['num_colours']})")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("colours at h's wrap (b = 0.5): where the wrong-branch colours lie")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROBE_LEVELS = (0.2, 0.4, 0.6, 0.8)


def wrong_foreground(b: torch.Tensor) -> torch.Tensor:
    """The other branch of h at b (:func:`fiber_plugins.data.color_mnist.other_branch`)."""
    from fiber_plugins.data import color_mnist as cm

    return cm.other_branch(b)


def wrap_probe(prior, levels=PROBE_LEVELS, num_digits: int = 32, steps: int = 25, seed: int = 0):
    """The denoiser at h's wrap. For b on a grid across [0.3, 0.7] (all channels) and digits
    coloured on the law (f = h(b)) or on the wrong branch, noised to ``levels`` with fixed noise:
    the mean digit colour of x0_hat (``law``, ``wrong``), its mean background colour
    (``*_background``) and the share of channels whose x0_hat colours obey h (``*_on_law``:
    not :func:`~fiber_plugins.data.color_mnist.off_branch`), each [[per b] per level]; with "b", "levels", "num_digits"."""
    from fiber_plugins.data import color_mnist as cm

    g, _ = cm.load_digits("test")
    g = g[torch.randperm(g.shape[0], generator=torch.Generator().manual_seed(seed))[:num_digits]]
    # pixels that show the digit colour, (D, H, W): taken from the known digit, not from x0_hat
    # (cm.channel_colours finds digit pixels by their contrast, which a blurred x0_hat lacks)
    stroke = g[:, 0] > 0.7
    grid = torch.linspace(0.3, 0.7, 41)
    grid_steps = prior.timesteps(steps)
    picked = [min(grid_steps, key=lambda st: abs(st.level - lv)) for lv in levels]
    shape = (num_digits, *prior.latent_shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    keys = ("law", "wrong", "law_background", "wrong_background", "law_on_law", "wrong_on_law")
    out = {k: torch.zeros(len(picked), grid.numel()) for k in keys}
    with torch.no_grad():
        for j, b in enumerate(grid):
            bb = torch.full((num_digits, 3), float(b))
            for key, f in (("law", cm.foreground(bb)), ("wrong", wrong_foreground(bb))):
                x0 = cm.colorize(g, bb, f) * 2 - 1
                for i, st in enumerate(picked):
                    _, x0_hat = prior.predict(prior.add_noise(x0, noise, st), st)
                    x01 = (x0_hat.clamp(-1, 1) + 1) / 2  # (D, 3, H, W)
                    fh = (x01 * stroke[:, None]).sum((-1, -2)) / stroke.sum((-1, -2))[:, None]
                    bh = cm.border_mean(x01)  # (D, 3)
                    out[key][i, j] = fh.mean()
                    out[key + "_background"][i, j] = bh.mean()
                    out[key + "_on_law"][i, j] = (~cm.off_branch(bh, fh)).float().mean()
    return {
        "b": grid.tolist(),
        "levels": [st.level for st in picked],
        **{k: v.tolist() for k, v in out.items()},
        "num_digits": num_digits,
    }


def plot_wrap_probe(probe: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fiber_plugins.data import color_mnist as cm

    b = torch.tensor(probe["b"])
    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex=True)
    names = {"law": "input on the law (f = h(b))", "wrong": "input on the wrong branch"}
    for col, (key, name) in enumerate(names.items()):
        colour, background, share = axes[:, col]
        colour.plot(b, cm.foreground(b), "k--", lw=1, label="h(b), the law")
        colour.plot(b, wrong_foreground(b), "k:", lw=1, label="the wrong branch")
        background.plot(b, b, "k--", lw=1, label="the input's b")
        for lv, f, bg, ok in zip(
            probe["levels"], probe[key], probe[key + "_background"], probe[key + "_on_law"]
        ):
            colour.plot(b, f, label=f"noise level {lv:.2f}")
            background.plot(b, bg)
            share.plot(b, ok)
        for ax in axes[:, col]:
            ax.axvline(0.5, color="grey", lw=0.5)
        colour.set_title(name)
        share.set(xlabel="background colour b of the input (all channels)", ylim=(-0.03, 1.03))
    axes[0, 0].set_ylabel("mean digit colour of x0_hat")
    axes[1, 0].set_ylabel("mean background of x0_hat")
    axes[2, 0].set_ylabel("share of x0_hat on the law")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{title}: the denoiser at h's wrap ({probe['num_digits']} test digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_row(name: str, r: dict) -> str:
    eta = f", eta {r['eta']:g}" if r.get("eta") else ""
    cells = " | ".join(
        f"{c['share']:.2f} ({c['colours']})" if c["colours"] else "-" for c in r["wrong_branch"]
    )
    return (
        f"| {name} | {r['n']} | {r['steps']}{eta} | {r['kl']:.3f} | {r['w1']:.3f} | {cells} "
        f"| {r['seconds_per_image']:.3f} |"
    )


HEADER = (
    "| prior | n | T | colour KL | colour W1 | "
    + " | ".join(f"b in [{i / 10:.1f}, {(i + 1) / 10:.1f})" for i in range(10))
    + " | s / image |\n|---|---|---|---|---|"
    + "---|" * 10
    + "---|"
)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prior", nargs="+", help="diffusers prior folders or zoo names")
    p.add_argument("--n", type=int, default=256, help="unguided samples (3 colours each)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (the benchmark's T)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0, help="0: deterministic; 1: DDPM-like")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--name", nargs="+", default=None, help="the rows' labels (default: PRIOR)")
    p.add_argument("--out-dir", type=Path, default=OUT)
    p.add_argument("--wrap-probe", type=Path, default=None, help="also save the wrap probe (PNG)")
    p.add_argument(
        "--wrap-edge",
        type=Path,
        default=None,
        help="also save the colours near the wrap, one panel per prior (PNG)",
    )
    args = p.parse_args(argv)
    names = args.name or args.prior
    if len(names) != len(args.prior):
        p.error(f"--name gives {len(names)} labels for {len(args.prior)} priors")
    if args.wrap_probe is not None and len(args.prior) > 1:
        p.error("--wrap-probe looks inside one prior; give one PRIOR")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    js = args.out_dir / "quality.json"
    rows = json.loads(js.read_text()) if js.exists() else []
    md = args.out_dir / "quality.md"
    if not md.exists():
        md.write_text(
            "# Color-MNIST prior quality (unguided samples)\n\nColour KL / W1: the benchmark's "
            "estimator against the known mixture; per b-bin: wrong-branch share (colours).\n\n"
            + HEADER
            + "\n"
        )
    print(HEADER)
    results = []
    for prior_name, name in zip(args.prior, names):
        prior = load(prior_name)
        if args.wrap_probe is not None and getattr(prior, "conditional_on_features", False):
            p.error("--wrap-probe needs an unconditional prior (its denoiser takes no condition)")
        r = {"prior": name, **measure(prior, args.n, args.steps, args.seed, args.eta)}
        print(markdown_row(name, r), flush=True)
        print(
            f"  {name}: colour KL {r['kl']:.3f}, W1 {r['w1']:.3f} ({r['num_colours']} colours), "
            f"max wrong-branch share {r['max_wrong_share']:.2f}, "
            f"{r['seconds_per_image']:.3f} s/image",
            flush=True,
        )
        with md.open("a") as fh:
            fh.write(markdown_row(name, r) + "\n")
        if args.wrap_probe is not None:
            r["wrap_probe"] = wrap_probe(prior, steps=args.steps, seed=args.seed)
            plot_wrap_probe(r["wrap_probe"], args.wrap_probe, name)
            print_wrap_probe(r["wrap_probe"])
        results.append(r)
        js.write_text(json.dumps([*rows, *results], indent=2))
    if args.wrap_edge is not None:
        plot_wrap_edge(results, args.wrap_edge)
    return results


def print_wrap_probe(pr: dict) -> None:
    below = [k for k, b in enumerate(pr["b"]) if 0.4 <= b < 0.5]
    for i, lv in enumerate(pr["levels"]):
        law = sum(pr["law"][i][k] for k in below) / len(below)
        wrong = sum(pr["wrong"][i][k] for k in below) / len(below)
        fixed = sum(pr["wrong_on_law"][i][k] for k in below) / len(below)
        print(
            f"wrap probe, noise level {lv:.2f}, b in [0.4, 0.5) (law: f 0.9-1.0): mean digit "
            f"colour of x0_hat {law:.2f} from inputs on the law, {wrong:.2f} from inputs "
            f"on the wrong branch (f 0), of which {fixed:.2f} are denoised onto the law"
        )


if __name__ == "__main__":
    main()
