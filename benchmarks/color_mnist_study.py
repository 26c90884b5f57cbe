"""The paper's Color-MNIST consistency study with the shipped models, with error bars.

Three parts, on the Color-MNIST benchmark's references (``fiber_plugins.color_mnist_bench``:
K held-out test digits, M samples each, T steps) and ``--sets`` independent sample sets per
setting (noise seeds 0, 1, ...; mean ± std over the sets, paper Fig. 14 style):

1. **Fidelity vs consistency** (paper Fig. 4): NDTM with the in-distribution prior at guidance
   strengths ``--guidance`` (constant schedule, the benchmark's other NDTM settings) and the
   conditional flow-matching fiber models at their training lambda_fiber (the shipped
   ``color-mnist-conditional-nofiber`` (0) and ``color-mnist-conditional`` (0.01), plus any
   ``--conditional FOLDER`` trained with ``fiber-plugins train conditional --fiber-weight W``),
   on one plot (``pareto.png``) with the nearest neighbour's fiber loss.
2. **Leakage of the re-approximated target** (paper Fig. 19): every reference gets the same
   background colour ``--leak-colour`` (all channels). The fiber does not depend on the colour,
   so the sampled background colours must keep the mixture's law and not move toward that
   colour. Reported for NDTM with the static (exact) and with the re-approximated target: the share of
   sampled channel colours within ±0.05 of it (the mixture puts ``mixture`` there) and the
   colour KL, against the same sampler on the ordinary references (``leakage.png``).
3. **The prior's error vs the guidance's** (issue 16 item 2): the prior's own colour law on the
   fiber is the background colours of its unguided samples whose digit colour obeys h
   (|f - h(b)| <= 0.3, the settings study's rule), i.e. the prior restricted to the colourings
   that lie on the fiber. KL(prior on the fiber || mixture) is the prior's share of the error;
   KL(NDTM || prior on the fiber) is what the guidance adds; KL(NDTM || mixture) is the total
   (``prior_vs_guidance.png``).

Writes ``study.json``, ``study.md`` and the three figures into ``--out``
(default ``benchmarks/results/color-mnist/``)::

    python benchmarks/color_mnist_study.py                                   # ~20 min, 2 threads
    python benchmarks/color_mnist_study.py --conditional /tmp/cond-0.1       # + a trained lambda
    python benchmarks/color_mnist_study.py --carry-conditional benchmarks/results/color-mnist/study.json

``--carry-conditional STUDY_JSON`` keeps the conditional rows of an earlier study of the same
references, samples, sets and T whose models are not measured now (a ``--conditional`` folder
that is no longer there): the conditional sampler does not use the prior, so a new prior does
not change them. They are marked as carried in study.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fiber_plugins import zoo
from fiber_plugins._utils import median
from fiber_plugins.color_mnist_bench import (
    BENCH_NDTM,
    CONDITIONAL,
    references,
    sample_sets,
    summarise,
)
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.evaluation.metrics import NearestNeighbourBaseline, histogram_kl
from fiber_plugins.objectives import FiberObjective
from fiber_plugins.samplers import (
    ConditionalConfig,
    ConditionalFiberSampler,
    GuidanceSchedule,
    NDTMConfig,
    NDTMSampler,
)

OUT = Path(__file__).resolve().parent / "results" / "color-mnist"
BINS = 20  # the benchmark's KL estimator
LEAK_HALF_WIDTH = 0.05


def ndtm(prior, objective, steps: int, guidance: float | None = None, **over) -> NDTMSampler:
    """NDTM with the benchmark's settings; ``guidance`` a constant strength (None: the
    benchmark's schedule)."""
    cfg = {**BENCH_NDTM, **over}
    if guidance is not None:
        cfg["guidance"] = GuidanceSchedule("constant", guidance)
    return NDTMSampler(prior, objective, NDTMConfig(num_steps=steps, **cfg))


def background_colours(images01: torch.Tensor) -> np.ndarray:
    return cm.border_mean(images01).flatten().numpy()


def on_fiber_colours(images01: torch.Tensor) -> np.ndarray:
    """Background channel colours whose digit colour lies on h's branch (|f - h(b)| <= 0.3)."""
    b, f = cm.channel_colours(images01)
    return b[~cm.off_branch(b, f)].numpy()


def histogram_pdf(samples: np.ndarray):
    """A piecewise-constant density from a BINS-bin histogram on [0, 1] (for histogram_kl)."""
    dens, edges = np.histogram(np.clip(samples, 0, 1), bins=BINS, range=(0, 1), density=True)
    return lambda b: dens[np.clip(np.searchsorted(edges, b, side="right") - 1, 0, BINS - 1)]


def mixture_mass(lo: float, hi: float) -> float:
    return float(cm.mixture_cdf(np.array([hi]))[0] - cm.mixture_cdf(np.array([lo]))[0])


def row(name: str, per_set: list[dict], secs: float, **extra) -> dict:
    return {"setting": name, **summarise(per_set), "seconds_per_sample": secs, **extra}


def carried_conditional(path: Path, settings: dict, measured: set[str]) -> list[dict]:
    """The conditional rows of an earlier study.json whose ``model`` is not in ``measured``, for
    ``--carry-conditional``; the study must have the same references, samples, sets and T."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--carry-conditional {str(path)!r}: {e}") from None
    s = earlier.get("settings", {})
    keys = ("num_references", "num_samples", "sets", "steps")
    differ = [f"{k} {s.get(k)!r} (now {settings[k]!r})" for k in keys if s.get(k) != settings[k]]
    if differ:
        raise SystemExit(f"--carry-conditional {str(path)!r}: another study: {', '.join(differ)}")
    return [
        {**r, "carried_from": r.get("carried_from") or str(path)}
        for r in earlier.get("sweep", [])
        if r.get("family") == "conditional" and r.get("model") not in measured
    ]


def run(args) -> dict:
    torch.manual_seed(0)
    objective = FiberObjective(zoo.load("color-mnist-subject"), name="E(decolorize(x))")
    prior = zoo.load("color-mnist-prior")
    refs = references(args.references, 0)
    seeds = list(range(args.sets))
    g_train, _ = cm.load_digits("train")
    pool, _ = cm.make_colored(g_train, torch.Generator().manual_seed(2))
    targets = objective.target(refs * 2 - 1)
    nn_median = median(NearestNeighbourBaseline(objective, pool)(targets)[0])
    kw = {"progress": False}
    t_all = time.perf_counter()

    def log(r: dict) -> None:
        print(
            f"{r['setting']}: median fiber loss {r['median_fiber_loss']:.3g} ± "
            f"{r['median_fiber_loss_std']:.2g}, KL {r['kl']:.3f} ± {r['kl_std']:.3f}",
            flush=True,
        )

    # 1. fidelity vs consistency
    sweep, images, runs = [], {}, {}
    for g in args.guidance:
        runs[g] = per_set, results, secs = sample_sets(
            ndtm(prior, objective, args.steps, g), refs, args.samples, seeds, **kw
        )
        sweep.append(row(f"NDTM, guidance {g:g}", per_set, secs, family="ndtm", strength=g))
        images[g] = torch.cat([r.images[~r.failed] for r in results])
        log(sweep[-1])
    conditional = [
        (zoo.training_info(n)["fiber_weight"], n, zoo.load(n)) for n in CONDITIONAL.values()
    ]
    for folder in args.conditional:
        from fiber_plugins import load_prior

        weight = json.loads((Path(folder) / "training.json").read_text())["fiber_weight"]
        conditional.append((weight, str(folder), load_prior(folder)))
    for weight, name, model in sorted(conditional, key=lambda c: c[0]):
        sampler = ConditionalFiberSampler(model, objective, ConditionalConfig(num_steps=args.steps))
        per_set, _, secs = sample_sets(sampler, refs, args.samples, seeds, **kw)
        sweep.append(
            row(
                f"conditional FM, lambda {weight:g}",
                per_set,
                secs,
                family="conditional",
                strength=weight,
                model=name,
            )  # fmt: skip
        )
        log(sweep[-1])
    if args.carry_conditional is not None:
        now = {k: getattr(args, k.replace("num_", "")) for k in
               ("num_references", "num_samples", "sets", "steps")}  # fmt: skip
        carried = carried_conditional(args.carry_conditional, now, {c[1] for c in conditional})
        sweep += carried
        sweep.sort(key=lambda r: (r["family"] != "ndtm", r["strength"]))
        for r in carried:
            print(f"{r['setting']}: carried from {r['carried_from']}", flush=True)

    # 2. leakage of the re-approximated target
    c = args.leak_colour
    g_refs = cm.decolorize(refs)
    fixed = cm.colorize(g_refs, torch.full((refs.shape[0], 3), c))
    lo, hi = c - LEAK_HALF_WIDTH, c + LEAK_HALF_WIDTH
    leak = {"colour": c, "window": [lo, hi], "mixture": mixture_mass(lo, hi), "rows": []}
    leak_colours = {}
    for mode in ("static", "reapprox"):
        for name, r in (("benchmark references", refs), (f"background {c:g}", fixed)):
            bench = BENCH_NDTM["guidance"]
            if (
                mode == "static"
                and r is refs
                and bench.kind == "constant"
                and bench.strength in runs
            ):
                per_set, results, secs = runs[bench.strength]  # the sweep's run: same settings
            else:
                sampler = ndtm(prior, objective, args.steps, target_mode=mode)
                per_set, results, secs = sample_sets(sampler, r, args.samples, seeds, **kw)
            cols = [background_colours(res.images[~res.failed]) for res in results]
            shares = [float(((b >= lo) & (b <= hi)).mean()) for b in cols]
            leak_colours[(mode, name)] = np.concatenate(cols)
            leak["rows"].append(
                {
                    **row(f"NDTM ({mode} target), {name}", per_set, secs),
                    "share_near_colour": float(np.mean(shares)),
                    "share_near_colour_std": float(np.std(shares, ddof=1))
                    if len(shares) > 1
                    else 0.0,
                }
            )
            log(leak["rows"][-1])

    # 3. the prior's error vs the guidance's
    noise = torch.randn(
        args.unguided, *prior.latent_shape, generator=torch.Generator().manual_seed(0)
    )
    x = torch.cat(
        [
            prior.sample_unguided(noise[i : i + 128], num_steps=args.steps)
            for i in range(0, len(noise), 128)
        ]
    )
    unguided01 = (x.clamp(-1, 1) + 1) / 2
    all_b = background_colours(unguided01)
    fiber_b = on_fiber_colours(unguided01)
    prior_pdf = histogram_pdf(fiber_b)
    diag = {
        "unguided_samples": args.unguided,
        "prior_colours": int(all_b.size),
        "prior_on_fiber_colours": int(fiber_b.size),
        "kl_prior_vs_mixture": histogram_kl(all_b, cm.mixture_pdf),
        "kl_prior_on_fiber_vs_mixture": histogram_kl(fiber_b, cm.mixture_pdf),
        "rows": [],
    }
    for g, imgs in images.items():
        b = background_colours(imgs)
        diag["rows"].append(
            {
                "setting": f"NDTM, guidance {g:g}",
                "strength": g,
                "kl_vs_mixture": histogram_kl(b, cm.mixture_pdf),
                "kl_vs_prior_on_fiber": histogram_kl(b, prior_pdf),
                "colours": int(b.size),
            }
        )
    report = {
        "settings": {
            "num_references": args.references,
            "num_samples": args.samples,
            "sets": args.sets,
            "steps": args.steps,
            "ndtm": {
                k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in BENCH_NDTM.items()
            },
            "torch_threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t_all,
        },
        "nearest_neighbour_median": nn_median,
        "sweep": sweep,
        "leakage": leak,
        "prior_vs_guidance": diag,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(report, indent=2))
    (args.out / "study.md").write_text(markdown(report))
    plot_pareto(report, args.out / "pareto.png")
    plot_leakage(leak, leak_colours, args.out / "leakage.png")
    plot_diagnostic(diag, all_b, fiber_b, {g: background_colours(i) for g, i in images.items()},
                    args.out / "prior_vs_guidance.png")  # fmt: skip
    return report


def _pm(r: dict, k: str, d: int = 3) -> str:
    return f"{r[k]:.{d}g} ± {r[k + '_std']:.2g}"


def markdown(rep: dict) -> str:
    s = rep["settings"]
    out = [
        "# Color-MNIST study: fidelity vs consistency, leakage, prior vs guidance",
        "",
        f"{s['num_references']} held-out references x {s['num_samples']} samples, T={s['steps']}, "
        f"{s['sets']} independent sample sets per setting (mean ± std over the sets); the "
        f"benchmark's NDTM settings unless the row says otherwise; {s['torch_threads']} thread(s), "
        f"{s['seconds']:.0f} s in all. Command: `python benchmarks/color_mnist_study.py`.",
        "",
        "## Fidelity vs consistency (pareto.png)",
        "",
        f"Nearest neighbour (train split) median fiber loss: {rep['nearest_neighbour_median']:.3g}.",
        "",
        "| setting | median fiber loss | colour KL | colour W1 | s / sample |",
        "|---|---|---|---|---|",
    ]
    for r in rep["sweep"]:
        name = r["setting"] + (" (carried from an earlier study)" if r.get("carried_from") else "")
        out.append(f"| {name} | {_pm(r, 'median_fiber_loss')} | {_pm(r, 'kl')} | "
                   f"{_pm(r, 'w1')} | {r['seconds_per_sample']:.3f} |")  # fmt: skip
    lk = rep["leakage"]
    out += [
        "",
        "## Leakage of the re-approximated target (leakage.png)",
        "",
        f"Share of sampled background channel colours in [{lk['window'][0]:.2f}, "
        f"{lk['window'][1]:.2f}] (the mixture puts {lk['mixture']:.3f} there) when every "
        f"reference has background {lk['colour']:g}, against the benchmark's references.",
        "",
        "| setting | share near the colour | colour KL | median fiber loss |",
        "|---|---|---|---|",
    ]
    for r in lk["rows"]:
        out.append(f"| {r['setting']} | {_pm(r, 'share_near_colour')} | {_pm(r, 'kl')} | "
                   f"{_pm(r, 'median_fiber_loss')} |")  # fmt: skip
    d = rep["prior_vs_guidance"]
    out += [
        "",
        "## The prior's error vs the guidance's (prior_vs_guidance.png)",
        "",
        f"{d['unguided_samples']} unguided samples: {d['prior_colours']} channel colours, "
        f"{d['prior_on_fiber_colours']} of them on the fiber (digit colour on h's branch). "
        f"KL(prior || mixture) = {d['kl_prior_vs_mixture']:.3f}; KL(prior on the fiber || "
        f"mixture) = {d['kl_prior_on_fiber_vs_mixture']:.3f} (the prior's share).",
        "",
        "| setting | KL(samples \\|\\| mixture) | KL(samples \\|\\| prior on the fiber) | colours |",
        "|---|---|---|---|",
    ]
    for r in d["rows"]:
        out.append(f"| {r['setting']} (all sets pooled) | {r['kl_vs_mixture']:.3f} | "
                   f"{r['kl_vs_prior_on_fiber']:.3f} | {r['colours']} |")  # fmt: skip
    return "\n".join(out) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(rep: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for family, marker, label in (
        ("ndtm", "o-", "NDTM, guidance"),
        ("conditional", "^-", "conditional FM, lambda"),
    ):
        rows = sorted(
            (r for r in rep["sweep"] if r["family"] == family), key=lambda r: r["strength"]
        )
        if not rows:
            continue
        ax.errorbar([r["median_fiber_loss"] for r in rows], [r["kl"] for r in rows],
                    xerr=[r["median_fiber_loss_std"] for r in rows], yerr=[r["kl_std"] for r in rows],
                    fmt=marker, capsize=2, label=label)  # fmt: skip
        for r in rows:
            ax.annotate(f"{r['strength']:g}", (r["median_fiber_loss"], r["kl"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.axvline(rep["nearest_neighbour_median"], color="gray", ls="--", label="nearest neighbour")
    ax.set_xscale("log")
    ax.set_xlabel("median fiber loss (fidelity, lower is better)")
    ax.set_ylabel("colour KL (consistency, lower is better)")
    ax.set_title(f"mean ± std over {rep['settings']['sets']} sample sets", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _mixture_curve(ax) -> None:
    grid = np.linspace(0, 1, 401)
    ax.plot(grid, cm.mixture_pdf(grid), color="k", lw=1.5, label="known mixture")


def plot_leakage(leak: dict, colours: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120, sharey=True)
    for ax, mode in zip(axes, ("static", "reapprox")):
        _mixture_curve(ax)
        for (m, name), b in colours.items():
            if m == mode:
                ax.hist(
                    b, bins=BINS, range=(0, 1), density=True, histtype="step", lw=1.5, label=name
                )
        ax.axvspan(
            *leak["window"], color="red", alpha=0.15, label=f"fixed colour {leak['colour']:g}"
        )
        ax.set_title(f"NDTM, {mode} target", fontsize=9)
        ax.set_xlabel("background colour b (per channel)")
    axes[0].set_ylabel("density")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_diagnostic(diag: dict, all_b, fiber_b, ndtm_b: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    _mixture_curve(ax)
    ax.hist(all_b, bins=BINS, range=(0, 1), density=True, histtype="step", lw=1.5, ls=":",
            label=f"prior, unguided (KL {diag['kl_prior_vs_mixture']:.2f})")  # fmt: skip
    ax.hist(fiber_b, bins=BINS, range=(0, 1), density=True, histtype="step", lw=2,
            label=f"prior on the fiber (KL {diag['kl_prior_on_fiber_vs_mixture']:.2f})")  # fmt: skip
    for r in diag["rows"]:
        ax.hist(ndtm_b[r["strength"]], bins=BINS, range=(0, 1), density=True, histtype="step",
                lw=1, label=f"{r['setting']} (KL {r['kl_vs_mixture']:.2f}; vs prior "
                f"{r['kl_vs_prior_on_fiber']:.2f})")  # fmt: skip
    ax.set_xlabel("background colour b (per channel)")
    ax.set_ylabel("density")
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--references", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--sets", type=int, default=3, help="independent sample sets per setting")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--conditional", type=Path, nargs="*", default=[],
                   help="more trained conditional fiber models (folders with training.json)")  # fmt: skip
    p.add_argument("--carry-conditional", type=Path, default=None,
                   help="an earlier study.json: keep its conditional rows whose models are not "
                   "measured now (they do not use the prior)")  # fmt: skip
    p.add_argument("--leak-colour", type=float, default=0.35)
    p.add_argument("--unguided", type=int, default=512, help="unguided samples for part 3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.sets < 1 or not 0 < args.leak_colour < 1:
        p.error(
            f"--sets must be >= 1 and --leak-colour in (0, 1), got {args.sets}, {args.leak_colour}"
        )
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = run(args)
    finally:
        torch.set_num_threads(before)  # called from Python (tests), leave the process as it was
    print((args.out / "study.md").read_text())
    return report


if __name__ == "__main__":
    main()
