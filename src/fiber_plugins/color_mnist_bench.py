"""``fiber-plugins bench color-mnist``: fidelity and consistency on a data set with a known fiber.

K held-out test digits (coloured with a fixed seed) are the references; each method draws M
samples per reference. Fidelity is the fiber loss under phi = E(decolorize(x)); consistency is
the KL divergence and Wasserstein-1 distance between the background colours recovered from the
samples (their 2-pixel border) and the known colour mixture. Baselines: the nearest training
image in phi space, augmented copies of the reference, and the unguided prior's own consistency.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from . import zoo
from ._utils import median, to_model_range
from .data import color_mnist as cm
from .errors import UserValueError
from .evaluation.metrics import (
    NearestNeighbourBaseline,
    augmentation_baseline,
    histogram_kl,
    wasserstein1,
)
from .grid import save_grid
from .objectives import FiberObjective
from .samplers import GuidanceSchedule, NDTMConfig, NDTMSampler

# NDTM settings used by the benchmark and the demo, chosen on the shipped models: guidance
# strength 0.3 from the sweep of benchmarks/color_mnist_study.py (the flow-matching priors reach
# the fiber with it and keep the colour law; strength 1 pushes the colours out of [0.35, 0.6]);
# docs/color_mnist.md
BENCH_NDTM: dict[str, Any] = dict(
    inner_steps=3,
    guidance=GuidanceSchedule("constant", 0.3),
    lr_start=0.1,
    lr_end=0.002,
    kappa=1e-4,
)


METHOD_NAMES = {
    "unguided": "unguided",
    "ndtm": "NDTM",
    "ndtm-reapprox": "NDTM re-approx. target",
    "dps": "DPS",
    "noise-opt": "noise optimisation",
    "inversion": "pixel inversion",
    "conditional": "conditional FM with fiber loss",
    "conditional-nofiber": "conditional FM",
}
# trained conditional fiber models (DESIGN 4.3) and the shipped model each method loads
CONDITIONAL = {
    "conditional": "color-mnist-conditional",
    "conditional-nofiber": "color-mnist-conditional-nofiber",
}


def _make_sampler(method: str, prior, objective, steps: int, inner_steps: int):
    """The benchmark's settings for each method (chosen on the shipped models)."""
    from .samplers import (
        DPSConfig,
        DPSSampler,
        NoiseOptConfig,
        NoiseOptSampler,
        PixelInversionConfig,
        PixelInversionSampler,
    )

    ndtm = {**BENCH_NDTM, "inner_steps": inner_steps}
    if method in CONDITIONAL:  # a trained model instead of the prior, same number of steps
        from .samplers import ConditionalConfig, ConditionalFiberSampler

        model = zoo.load(CONDITIONAL[method], device=prior.device)
        return ConditionalFiberSampler(model, objective, ConditionalConfig(num_steps=steps))
    if method == "unguided":
        return NDTMSampler(
            prior, objective, NDTMConfig(num_steps=steps, **{**ndtm, "guidance": 0.0})
        )
    if method == "ndtm":
        return NDTMSampler(prior, objective, NDTMConfig(num_steps=steps, **ndtm))
    if method == "ndtm-reapprox":
        return NDTMSampler(
            prior, objective, NDTMConfig(num_steps=steps, target_mode="reapprox", **ndtm)
        )
    if method == "dps":
        return DPSSampler(prior, objective, DPSConfig(num_steps=steps, **BENCH_DPS))
    if method == "noise-opt":
        return NoiseOptSampler(prior, objective, NoiseOptConfig(**BENCH_NOISE_OPT))
    return PixelInversionSampler(prior, objective, PixelInversionConfig(**BENCH_INVERSION))


BENCH_DPS: dict[str, Any] = dict(guidance=GuidanceSchedule("constant", 5.0), normalize=True)
BENCH_NOISE_OPT: dict[str, Any] = dict(
    num_steps=8, max_iters=20, optimiser="adam", lr=1.0, lowpass=0.5, threshold=None
)
BENCH_INVERSION: dict[str, Any] = dict(num_steps=200, lr=0.05, tv_weight=1e-3)


def consistency(images01: torch.Tensor) -> dict:
    """KL and W1 between the recovered background colours and the known mixture."""
    b = cm.border_mean(images01.reshape(-1, *images01.shape[-3:])).flatten().numpy()
    return {
        "kl": histogram_kl(b, cm.mixture_pdf),
        "w1": wasserstein1(b, cm.mixture_cdf),
        "num_colours": int(b.size),
    }


def references(num_references: int = 16, seed: int = 0, split: str = "test") -> torch.Tensor:
    """The benchmark's held-out references in [0, 1]: ``num_references`` digits of ``split``
    ('test': held out; 'train': for tuning settings without touching the held-out digits) picked by
    a seeded permutation, coloured with the known law (seed + 1)."""
    g, _ = cm.load_digits(split)
    pick = torch.randperm(g.shape[0], generator=torch.Generator().manual_seed(seed))
    return cm.make_colored(g[pick[:num_references]], torch.Generator().manual_seed(seed + 1))[0]


def sample_sets(sampler, refs: torch.Tensor, num_samples: int, seeds, progress: bool = False):
    """Sample ``num_samples`` per reference once per seed (independent sample sets); returns
    (one metrics dict per set, the sets' results, seconds per sample)."""
    sets, results, secs = [], [], 0.0
    for s in seeds:
        t0 = time.perf_counter()
        res = sampler.sample(references=refs, n=num_samples, seed=s, progress=progress)
        secs += time.perf_counter() - t0
        ok = ~res.failed
        losses = res.fiber_loss[ok]
        sets.append(
            {
                "seed": s,
                "median_fiber_loss": median(losses),
                "mean_fiber_loss": float(losses.mean()) if ok.any() else math.nan,
                **consistency(res.images[ok]),
                "failed": int(res.failed.sum()),
            }
        )
        results.append(res)
    return sets, results, secs / (len(sets) * refs.shape[0] * num_samples)


def summarise(sets: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one set) over independent sample sets of
    each metric; ``failed`` is summed."""
    out: dict[str, Any] = {"sets": len(sets)}
    for k in ("median_fiber_loss", "mean_fiber_loss", "kl", "w1"):
        v = torch.tensor([r[k] for r in sets], dtype=torch.float64)
        out[k] = float(v.mean())
        out[k + "_std"] = float(v.std()) if len(sets) > 1 else 0.0
    out["num_colours"] = sum(r["num_colours"] for r in sets)
    out["failed"] = sum(r["failed"] for r in sets)
    out["per_set"] = sets
    return out


# every file the benchmark writes (the grids: one per method and prior)
BENCH_FILES = (
    "results.json",
    "results.md",
    "fidelity_consistency.png",
    *(f"{m}_{tag}.png" for m in METHOD_NAMES for tag in ("in", "ood")),
)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, a folder of other things, or an earlier benchmark (any of its files: an
    interrupted one too) without ``overwrite``. Its files are replaced as the new ones are
    written, and the stale ones removed at the end (:func:`_remove_stale`), so an interrupted
    run leaves the earlier results, not none."""
    if out.exists() and not out.is_dir():
        raise UserValueError(f"--out {str(out)!r} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    earlier = [name for name in BENCH_FILES if (out / name).is_file()]
    if not earlier:
        names = sorted(p.name for p in out.iterdir())
        raise UserValueError(
            f"--out {str(out)!r} is not empty and holds no benchmark ({', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''}); give a new or empty folder"
        )
    if not overwrite:
        raise UserValueError(
            f"--out {str(out)!r} holds an earlier benchmark ({', '.join(earlier[:2])}); pass "
            "--overwrite (overwrite=True) to replace it, or give a new folder"
        )


def _remove_stale(out: Path, written: set[str]) -> None:
    """After a run: the earlier benchmark's files this run did not write again (a grid of a
    method not run this time would otherwise stand beside the new results)."""
    for name in BENCH_FILES:
        if name not in written:
            (out / name).unlink(missing_ok=True)


def run_color_mnist_bench(
    out: str | Path,
    num_references: int = 16,
    num_samples: int = 4,
    steps: int = 25,
    inner_steps: int = 3,
    seed: int = 0,
    device: str = "cpu",
    priors: tuple[str, ...] = ("color-mnist-prior", "color-mnist-prior-ood"),
    methods: tuple[str, ...] = tuple(METHOD_NAMES),
    progress: bool = True,
    sets: int = 3,
    overwrite: bool = False,
) -> dict:
    """Run the benchmark; ``methods`` for the in-distribution prior (the OOD prior runs
    unguided and NDTM). Every method draws ``sets`` independent sample sets (noise seeds
    ``seed``, ``seed + 1``, ...) for the same references; rows give the mean and standard
    deviation over the sets (paper Fig. 14). Writes results.md, results.json,
    fidelity_consistency.png and one grid per method (first set) into ``out``.

    ``out`` is new, empty, or holds an earlier benchmark (its results.json): that one is
    replaced only with ``overwrite`` (its files go; other files in the folder stay)."""
    unknown = set(methods) - set(METHOD_NAMES)
    if unknown:
        raise UserValueError(f"unknown methods {sorted(unknown)}; choose from {list(METHOD_NAMES)}")
    if sets < 1:
        raise UserValueError(f"sets must be >= 1 (independent sample sets), got {sets}")
    out = Path(out)
    _check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    subject = zoo.load("color-mnist-subject", device=device)
    objective = FiberObjective(subject, name="E(decolorize(x))")

    refs = references(num_references, seed)
    targets = objective.target(to_model_range(refs.to(device))).cpu()

    g_train, _ = cm.load_digits("train")
    pool, _ = cm.make_colored(g_train, torch.Generator().manual_seed(seed + 2))
    nn_loss, _ = NearestNeighbourBaseline(objective, pool)(targets)
    aug_loss = augmentation_baseline(objective, refs, targets, n=num_samples, seed=seed)
    seeds = [seed + i for i in range(sets)]

    rows: list[dict] = []
    for prior_name in priors:
        prior = zoo.load(prior_name, device=device)
        ood = prior_name.endswith("ood")
        tag = "OOD prior" if ood else "prior"
        wanted = ("unguided", "ndtm") if ood else methods
        for method in wanted:
            sampler = _make_sampler(method, prior, objective, steps, inner_steps)
            per_set, results, secs = sample_sets(sampler, refs, num_samples, seeds, progress)
            res = results[0]
            label = tag
            if method in CONDITIONAL:
                info = zoo.training_info(CONDITIONAL[method])
                label = f"trained, lambda {info['fiber_weight']:g}"
                if info["fiber_weight"] > 0:
                    label += f" for t <= {info['fiber_t_max']:g}"
            summary = summarise(per_set)
            rows.append(
                {
                    "method": f"{METHOD_NAMES[method]} ({label})",
                    "key": method,
                    "prior": prior_name,
                    **summary,
                    "median_over_nn": summary["median_fiber_loss"] / median(nn_loss),
                    "seconds_per_sample": secs,
                }
            )
            save_grid(
                out / f"{method}_{'ood' if ood else 'in'}.png",
                res.references[:4],
                res.images[:4],
                res.fiber_loss[:4],
                res.failed[:4],
            )
    rows.append(
        {
            "method": "nearest neighbour (train split)",
            "median_fiber_loss": median(nn_loss),
            "mean_fiber_loss": float(nn_loss.mean()),
            "median_over_nn": 1.0,
        }
    )
    rows.append(
        {
            "method": "augmented reference",
            "median_fiber_loss": median(aug_loss),
            "mean_fiber_loss": float(aug_loss.mean()),
            "median_over_nn": median(aug_loss) / median(nn_loss),
        }
    )
    settings = {
        "num_references": num_references,
        "num_samples": num_samples,
        "sets": sets,
        "steps": steps,
        "inner_steps": inner_steps,
        "ndtm": {
            k: (v.__dict__ if hasattr(v, "__dict__") else v)
            for k, v in BENCH_NDTM.items()
            if k != "inner_steps"
        },
        "seed": seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    trained = [m for m in methods if m in CONDITIONAL]
    if trained:
        settings["conditional_training_s"] = ", ".join(
            f"{m}: {zoo.training_info(CONDITIONAL[m]).get('wall_time_s', float('nan')):.0f} s "
            f"of training on {zoo.training_info(CONDITIONAL[m]).get('device', '?')}"
            for m in trained
        )
    report = {"settings": settings, "rows": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(_markdown(report))
    _plot(rows, out / "fidelity_consistency.png")
    grids = {
        f"{r['key']}_{'ood' if r['prior'].endswith('ood') else 'in'}.png"
        for r in rows
        if "key" in r
    }  # the sampled rows (the baselines have no grid)
    _remove_stale(out, {"results.json", "results.md", "fidelity_consistency.png", *grids})
    return report


def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _pm(r: dict, key: str, digits: int = 4) -> str:
    """``mean ± std`` when the row has a standard deviation, else the value."""
    if r.get(key + "_std") is None:
        return _fmt(r.get(key), digits)
    return f"{_fmt(r[key], digits)} ± {_fmt(r[key + '_std'], 2)}"


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Color-MNIST benchmark",
        "",
        f"{s['num_references']} held-out references x {s['num_samples']} samples, T={s['steps']}, "
        f"N={s['inner_steps']}, {s.get('sets', 1)} independent sample sets (noise seeds "
        f"{s['seed']}..{s['seed'] + s.get('sets', 1) - 1}; mean ± std over the sets), "
        f"device {s['device']} ({s['torch_threads']} CPU thread(s)).",
        "",
        "| method | median fiber loss | mean fiber loss | median / NN | colour KL | colour W1 | s / sample | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        cells = [_pm(r, k) for k in ("median_fiber_loss", "mean_fiber_loss")]
        cells += [_fmt(r.get("median_over_nn")), _pm(r, "kl", 3), _pm(r, "w1", 3)]
        cells += [_fmt(r.get("seconds_per_sample"), 3), _fmt(r.get("failed"))]
        lines.append("| " + " | ".join([r["method"], *cells]) + " |")
    lines += [
        "",
        "Fidelity: fiber loss ||phi(x) - phi(x*)||^2 with phi = E(decolorize(x)) (lower is better). "
        "Consistency: KL(samples || mixture) over 20 bins and W1 between the samples' background "
        "colours and the known mixture (lower is better); the unguided rows are the prior's own value.",
        "Conditional FM rows: conditional flow-matching fiber models p(x | phi(x)) trained for this "
        "subject (DESIGN 4.3), sampled with the same number of steps; their s / sample excludes "
        "training"
        + (f" ({s['conditional_training_s']})." if s.get("conditional_training_s") else "."),
        "",
    ]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    from ._utils import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(8.5, 3.8), dpi=120)
    for r in rows:
        if "kl" not in r:
            continue
        marker = (
            "o" if r["method"].startswith("NDTM") else "^" if "conditional" in r["method"] else "s"
        )
        ax.errorbar(
            r["median_fiber_loss"],
            r["kl"],
            xerr=r.get("median_fiber_loss_std"),
            yerr=r.get("kl_std"),
            fmt=marker,
            ms=6,
            capsize=2,
            label=r["method"],
        )
    nn_row = next(r for r in rows if r["method"].startswith("nearest"))
    ax.axvline(nn_row["median_fiber_loss"], color="gray", ls="--", label="nearest neighbour")
    ax.set_xscale("log")
    ax.set_yscale("log")  # noise optimisation sits an order of magnitude above the rest
    ax.set_xlabel("median fiber loss (fidelity, lower is better)")
    ax.set_ylabel("colour KL (consistency, lower is better)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
