"""NDTM on a conditional fiber model, against NDTM on the prior and the plain conditional model.

    python benchmarks/color_mnist_ndtm_conditional.py [--references 16] [--samples 4] [--out DIR]

The paper's conclusion names combining NDTM with conditional models as the way past the
fidelity-consistency trade-off. Three methods on the Color-MNIST benchmark's references (the
held-out test digits and colourings that ``fiber-plugins bench color-mnist`` picks, same seed) and
its estimator (fiber loss; KL and W1 of the recovered background colours against the known
mixture):

(a) NDTM on the unconditional prior ``color-mnist-prior`` (the benchmark's NDTM settings);
(b) the plain conditional sampler on ``color-mnist-conditional`` (the benchmark's row);
(c) NDTM on ``color-mnist-conditional``, each row conditioned on its target y* (same settings
    as (a));
(d) as (c), with the guidance schedule chosen for the conditional model on *tuning* references:
    training digits in other colourings (``--tune-references``, noise seed ``--tune-seed``),
    so the held-out references never take part in the choice. The candidates
    (``SCHEDULES``: constant strengths, and limited-interval guidance where the conditional model
    alone takes the high-noise steps, some with more NDTM inner steps) are each run once on the
    tuning references; the pick is the lowest colour KL among those whose median fiber loss is
    within ``FIDELITY_FACTOR`` x (a)'s on the same tuning references. The tuning table is
    written too. The candidates sample the conditional model alone; after retraining the prior,
    ``--tuning-from benchmarks/results/color-mnist-ndtm-conditional/results.json`` keeps their
    rows and measures only row (a) again on the tuning digits, then re-picks.

Targets checked for (c) and (d): median fiber loss within 10x of (a)'s, and colour KL at most
(b)'s + 0.05, on the means over ``--sets`` independent sample sets. Writes results.md,
results.json, grids of (b), (c) and (d), ``colour_histograms.png`` (every row's background
colours, all sets pooled, against the mixture) and ``colour_drift.png`` (each colour of (c) and
(d) against its twin in (b): the rows share their initial noise) into ``--out``; results.md
also counts the colours of (b) off h's branch and what the guidance made of each
(``branch_fate``). Runs on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fiber_plugins import zoo
from fiber_plugins.color_mnist_bench import (
    BENCH_NDTM,
    CONDITIONAL,
    _make_sampler,
    references,
    sample_sets,
    summarise,
)
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.objectives import FiberObjective
from fiber_plugins.samplers import GuidanceSchedule, NDTMConfig, NDTMSampler

OUT = "benchmarks/results/color-mnist-ndtm-conditional"
FIDELITY_FACTOR = 10.0  # (c)'s median fiber loss <= this x (a)'s
KL_MARGIN = 0.05  # (c)'s colour KL <= (b)'s + this


@dataclass(frozen=True)
class Candidate:
    """One of row (d)'s candidates: a guidance schedule and NDTM's inner steps N (None: the
    benchmark's N)."""

    guidance: GuidanceSchedule
    inner_steps: int | None = None

    def config(self, ndtm: NDTMConfig) -> NDTMConfig:
        n = ndtm.inner_steps if self.inner_steps is None else self.inner_steps
        return replace(ndtm, guidance=self.guidance, inner_steps=n)

    def to_dict(self) -> dict:
        return {"guidance": self.guidance.to_dict(), "inner_steps": self.inner_steps}

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        return cls(GuidanceSchedule.from_dict(d["guidance"]), d.get("inner_steps"))


def _c(kind: str, strength: float, high: float = 1.0, n: int | None = None) -> Candidate:
    return Candidate(GuidanceSchedule(kind, strength, high=high), n)


# Row (d)'s candidates, tried on the tuning references.
SCHEDULES = (
    _c("constant", 0.1),
    _c("constant", 0.3),
    _c("interval", 0.3, 0.5),
    _c("interval", 1.0, 0.3),
    _c("interval", 1.0, 0.5),
    _c("interval", 1.0, 0.7),
    _c("interval", 0.5, 0.3),
    _c("interval", 0.5, 0.5),
    _c("interval", 1.0, 0.2),
    _c("interval", 2.0, 0.2),
    # guidance in the last steps only, stronger or with more inner steps (session 12)
    _c("interval", 3.0, 0.2),
    _c("interval", 5.0, 0.2),
    _c("interval", 3.0, 0.15),
    _c("interval", 1.5, 0.25),
    _c("interval", 2.0, 0.25),
    _c("interval", 2.0, 0.2, n=6),
    _c("interval", 1.0, 0.2, n=10),
    _c("interval", 1.0, 0.3, n=10),
)


def describe(c: Candidate) -> str:
    """'constant 0.3', 'interval 1 at noise levels <= 0.5' or '... <= 0.2, N = 10'."""
    g = c.guidance
    text = f"constant {g.strength:g}"
    if g.kind != "constant":
        text = f"{g.kind} {g.strength:g} at noise levels <= {g.high:g}"
    if c.inner_steps is not None:
        text += f", N = {c.inner_steps}"
    return text


def parse_schedule(text: str) -> Candidate:
    """'interval:STRENGTH:HIGH' or 'constant:STRENGTH', optionally followed by '@N' (NDTM's
    inner steps for row (d))."""
    spec, at, n_text = text.partition("@")
    kind, *nums = spec.split(":")
    try:
        n = int(n_text) if at else None
        if n is not None and n < 1:
            raise ValueError
        if kind == "constant" and len(nums) == 1:
            return Candidate(GuidanceSchedule("constant", float(nums[0])), n)
        if kind == "interval" and len(nums) == 2:
            return Candidate(GuidanceSchedule("interval", float(nums[0]), high=float(nums[1])), n)
    except ValueError:
        pass
    raise SystemExit(
        f"--schedule {text!r}: expected 'interval:STRENGTH:HIGH' or 'constant:STRENGTH', "
        "optionally followed by '@N' (N >= 1 inner steps)"
    )


def earlier_tuning(path: Path, args) -> list[dict]:
    """The candidates' rows of an earlier run's tuning table (its results.json), for
    ``--tuning-from``. The candidates sample the conditional model alone, so their rows do not
    depend on the unconditional prior; the run must have used the same tuning digits, samples,
    T and N."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--tuning-from {str(path)!r}: {e}") from None
    s = earlier.get("settings", {})
    same = {"tune_references": args.tune_references, "tune_seed": args.tune_seed,
            "num_samples": args.samples, "steps": args.steps, "inner_steps": args.inner_steps}  # fmt: skip
    differ = [f"{k} {s.get(k)!r} (now {v!r})" for k, v in same.items() if s.get(k) != v]
    if differ or not earlier.get("tuning"):
        raise SystemExit(
            f"--tuning-from {str(path)!r}: no tuning table of these settings: "
            + (", ".join(differ) or "the run skipped the tuning")
        )
    return list(earlier["tuning"][1:])


def tune(prior, model, objective, ndtm, args) -> tuple[Candidate, list[dict]]:
    """Row (d)'s schedule, chosen on training digits (never the held-out references).

    With ``args.tuning_from`` the candidates' rows come from that earlier run and only the
    reference row (a), the one that samples the prior, is measured again."""
    refs = references(args.tune_references, args.tune_seed, split="train")
    seeds = [args.tune_seed]
    base, _, _ = sample_sets(
        _make_sampler("ndtm", prior, objective, args.steps, args.inner_steps),
        refs,
        args.samples,
        seeds,
    )
    bound = FIDELITY_FACTOR * base[0]["median_fiber_loss"]
    table = [{"schedule": "(a) NDTM (prior), the reference", **base[0], "eligible": None}]
    if args.tuning_from is not None:
        for row in earlier_tuning(args.tuning_from, args):
            row = {**row, "eligible": row["median_fiber_loss"] <= bound, "carried": True}
            table.append(row)
            print("[tune, carried]", {k: v for k, v in row.items() if k != "guidance"})
        return _pick(table, bound), table
    for c in SCHEDULES:
        sets, _, secs = sample_sets(
            NDTMSampler(model, objective, c.config(ndtm)), refs, args.samples, seeds
        )
        row = {"schedule": describe(c), **c.to_dict(), **sets[0]}
        row["eligible"] = row["median_fiber_loss"] <= bound
        row["seconds_per_sample"] = secs
        table.append(row)
        print("[tune]", {k: v for k, v in row.items() if k != "guidance"}, flush=True)
    return _pick(table, bound), table


def _pick(table: list[dict], bound: float) -> Candidate:
    """The eligible candidate (median fiber loss <= ``bound``) with the lowest colour KL."""
    eligible = [r for r in table[1:] if r["eligible"]]
    if not eligible:
        raise SystemExit(f"no schedule reached median fiber loss <= {bound:.3g} on the tuning set")
    return Candidate.from_dict(min(eligible, key=lambda r: r["kl"]))


def background_colours(result, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Every channel's background colour of a result's samples in ``keep`` (default: those not
    failed), in [0, 1]."""
    x = result.images[~result.failed if keep is None else keep]
    return cm.border_mean(x.reshape(-1, *x.shape[-3:])).flatten()


def paired_drift(base_runs, runs) -> tuple[torch.Tensor, torch.Tensor]:
    """Background colours of ``base_runs`` and their change in ``runs``, sample by sample.

    Both lists hold one result per noise seed, sampled from the same initial noise (the plain
    conditional sampler and NDTM without guidance give identical images), so the difference is
    what the guidance did to each colour. Samples failed in either run are left out. Returns
    (b of the base, change of b), each flat over sets, samples and channels."""
    base, change = [], []
    for r0, r1 in zip(base_runs, runs):
        ok = ~r0.failed & ~r1.failed
        b0 = background_colours(r0, ok)
        base.append(b0)
        change.append(background_colours(r1, ok) - b0)
    return torch.cat(base), torch.cat(change)


def branch_fate(base_runs, runs) -> dict:
    """What the guidance did to the colours on and off h's branch, colour by colour against the
    twin in ``base_runs`` (paired as in :func:`paired_drift`). A colour is on the law when its
    digit colour f is within 0.3 of h(b) (``color_mnist.off_branch``). Counts of the base's
    colours off the law, and of those in the guided run: put on the law with b moved across
    the wrap (b = 0.5), put on the law with b on the same side (the digit colour changed), or
    still off; and of the base's colours on the law, those the guidance put off it."""
    b0s, f0s, b1s, f1s = [], [], [], []
    for r0, r1 in zip(base_runs, runs):
        ok = ~r0.failed & ~r1.failed
        for r, bs, fs in ((r0, b0s, f0s), (r1, b1s, f1s)):
            x = r.images[ok]
            b, f = cm.channel_colours(x.reshape(-1, *x.shape[-3:]))
            bs.append(b.flatten())
            fs.append(f.flatten())
    b0, f0, b1, f1 = (torch.cat(v) for v in (b0s, f0s, b1s, f1s))
    off0, off1 = cm.off_branch(b0, f0), cm.off_branch(b1, f1)
    crossed = (b0 >= 0.5) != (b1 >= 0.5)
    return {
        "colours": int(b0.numel()),
        "base_off_law": int(off0.sum()),
        "put_on_law_across_the_wrap": int((off0 & ~off1 & crossed).sum()),
        "put_on_law_same_side": int((off0 & ~off1 & ~crossed).sum()),
        "still_off_law": int((off0 & off1).sum()),
        "put_off_law": int((~off0 & off1).sum()),
    }


def drift_summary(b: torch.Tensor, d: torch.Tensor) -> dict:
    """Mean absolute change of the colours, and their mean change away from h's wrap (b = 0.5;
    positive: pushed away from it), for all colours and for those within 0.1 of the wrap."""
    away = d * torch.sign(b - 0.5)
    near = (b - 0.5).abs() < 0.1
    return {
        "mean_abs_change": float(d.abs().mean()),
        "mean_change_away_from_wrap": float(away.mean()),
        "near_wrap_colours": int(near.sum()),
        "near_wrap_mean_change_away": float(away[near].mean()) if near.any() else float("nan"),
    }


def plot_drift(drift: dict, path: Path) -> None:
    """Each colour's change under the guidance against its value without it (same noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(drift), figsize=(4.2 * len(drift), 3.6), dpi=120, sharey=True, squeeze=False
    )
    for ax, (b, d, label) in zip(axes[0], drift.values()):
        ax.scatter(b.numpy(), d.numpy(), s=4, alpha=0.5)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0.5, color="grey", lw=0.5, ls="--")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("background colour b in (b), same noise")
    axes[0, 0].set_ylabel("change of b under NDTM's control")
    fig.suptitle(
        "NDTM on the conditional model: each colour's change under the guidance (h wraps "
        "at the dashed line)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_colours(colours: dict, rows: dict, path: Path) -> None:
    """Histograms of the background colours of each row (all sets pooled) against the
    mixture; the wrap of h (b = 0.5) is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    grid = np.linspace(0, 1, 400)
    ax.plot(grid, cm.mixture_pdf(grid), "k-", lw=1, label="the mixture (the fiber's law)")
    for key, b in colours.items():
        r = rows[key]
        ax.hist(b.numpy(), bins=20, range=(0, 1), density=True, histtype="step", lw=1.5,
                label=f"({key}) KL {r['kl']:.2f} ± {r['kl_std']:.2f}")  # fmt: skip
    ax.axvline(0.5, color="grey", lw=0.5, ls="--")
    ax.set(xlabel="background colour b (per channel; h wraps at 0.5)", ylabel="density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--references", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=25, help="T (the benchmark's default)")
    p.add_argument("--inner-steps", type=int, default=3, help="N (the benchmark's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sets", type=int, default=3, help="independent sample sets (noise seeds)")
    p.add_argument(
        "--tune-references",
        type=int,
        default=32,
        help="training digits for choosing row (d)'s schedule (0: skip the tuning, use --schedule)",
    )
    p.add_argument("--tune-seed", type=int, default=100, help="picks and colours the tuning digits")
    p.add_argument(
        "--schedule",
        default=None,
        help="row (d)'s schedule as 'interval:STRENGTH:HIGH' or 'constant:STRENGTH', optionally "
        "with '@N' for NDTM's inner steps, instead of tuning",
    )
    p.add_argument(
        "--tuning-from",
        type=Path,
        default=None,
        help="an earlier run's results.json: reuse its candidates' tuning rows (they sample the "
        "conditional model alone) and measure only the reference row (a) again, with the prior",
    )
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    if args.tuning_from is not None and (args.schedule is not None or args.tune_references <= 0):
        raise SystemExit(
            "--tuning-from re-picks row (d)'s schedule on the tuning digits: drop --schedule and "
            "keep --tune-references > 0"
        )
    if args.tune_references <= 0 and args.schedule is None:
        raise SystemExit("--tune-references 0 needs --schedule")
    return on_one_thread(run, args)


def on_one_thread(fn, *args):
    """``fn(*args)`` with torch on one CPU thread (the thread count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    start = time.perf_counter()
    subject = zoo.load("color-mnist-subject")
    objective = FiberObjective(subject, name="E(decolorize(x))")  # as the benchmark builds it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = zoo.load("color-mnist-prior")
    model = zoo.load(CONDITIONAL["conditional"])
    ndtm = NDTMConfig(num_steps=args.steps, **{**BENCH_NDTM, "inner_steps": args.inner_steps})
    tuning: list[dict] = []
    if args.schedule is not None:
        chosen = parse_schedule(args.schedule)
    else:
        chosen, tuning = tune(prior, model, objective, ndtm, args)
    print("row (d) schedule:", describe(chosen), flush=True)
    refs = references(args.references, args.seed)
    methods = {
        "a": (
            "NDTM (prior)",
            _make_sampler("ndtm", prior, objective, args.steps, args.inner_steps),
        ),
        "b": (
            "conditional FM with fiber loss (plain conditional sampler)",
            _make_sampler("conditional", prior, objective, args.steps, args.inner_steps),
        ),
        "c": (
            "NDTM on the conditional model (conditioned on y*), the benchmark's guidance",
            NDTMSampler(model, objective, ndtm),
        ),
        "d": (
            f"NDTM on the conditional model, guidance {describe(chosen)}"
            + (" (chosen on training digits)" if tuning else ""),
            NDTMSampler(model, objective, chosen.config(ndtm)),
        ),
    }
    rows: dict[str, dict] = {}
    results = {}
    runs_of: dict[str, list] = {}
    colours: dict[str, torch.Tensor] = {}
    seeds = [args.seed + i for i in range(args.sets)]
    for key, (label, sampler) in methods.items():
        per_set, runs, secs = sample_sets(sampler, refs, args.samples, seeds)
        colours[key] = torch.cat([background_colours(r) for r in runs])
        rows[key] = {
            "method": f"({key}) {label}",
            **summarise(per_set),
            "seconds_per_sample": secs,
            "conditional_prior": "fiber_model" in runs[0].config,
        }
        results[key] = runs[0]
        runs_of[key] = runs
        print({k: v for k, v in rows[key].items() if k != "per_set"}, flush=True)
    results["c"].save_grid(out / "ndtm_conditional_grid.png")
    results["d"].save_grid(out / "ndtm_conditional_interval_grid.png")
    results["b"].save_grid(out / "conditional_grid.png")
    plot_colours(colours, rows, out / "colour_histograms.png")
    titles = {"c": "(c) the benchmark's guidance", "d": f"(d) guidance {describe(chosen)}"}
    drift = {k: (*paired_drift(runs_of["b"], runs_of[k]), titles[k]) for k in ("c", "d")}
    plot_drift(drift, out / "colour_drift.png")
    for k, (b, d, _) in drift.items():
        rows[k]["colour_drift_vs_b"] = drift_summary(b, d)
        rows[k]["branch_fate_vs_b"] = branch_fate(runs_of["b"], runs_of[k])

    a, b = rows["a"], rows["b"]
    targets = {}
    for key in ("c", "d"):
        r = rows[key]
        targets[f"fidelity ({key})"] = {
            "rule": f"median fiber loss ({key}) <= {FIDELITY_FACTOR:g} x (a)",
            "bound": FIDELITY_FACTOR * a["median_fiber_loss"],
            "value": r["median_fiber_loss"],
            "met": r["median_fiber_loss"] <= FIDELITY_FACTOR * a["median_fiber_loss"],
        }
        targets[f"consistency ({key})"] = {
            "rule": f"colour KL ({key}) <= (b) + {KL_MARGIN:g}",
            "bound": b["kl"] + KL_MARGIN,
            "value": r["kl"],
            "met": r["kl"] <= b["kl"] + KL_MARGIN,
        }
    settings = {
        "num_references": args.references,
        "num_samples": args.samples,
        "steps": args.steps,
        "inner_steps": args.inner_steps,
        "ndtm": ndtm.to_dict(),
        "row_d_guidance": chosen.guidance.to_dict(),
        "row_d_inner_steps": chosen.config(ndtm).inner_steps,
        "tune_references": args.tune_references if tuning else 0,
        "tune_seed": args.tune_seed,
        "tuning_carried_from": str(args.tuning_from) if args.tuning_from else None,
        "seed": args.seed,
        "sets": args.sets,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": time.perf_counter() - start,
    }
    report = {"settings": settings, "rows": list(rows.values()), "targets": targets}
    report["tuning"] = tuning
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    s = report["settings"]
    g = s["ndtm"]["guidance"]
    lines = [
        "# NDTM on a conditional fiber model (Color-MNIST)",
        "",
        f"{s['num_references']} held-out references x {s['num_samples']} samples (the "
        f"benchmark's references), {s['sets']} independent sample sets (noise seeds "
        f"{s['seed']}..{s['seed'] + s['sets'] - 1}; mean ± std over the sets), T={s['steps']}, "
        f"NDTM N={s['inner_steps']}, guidance {g['kind']} {g['strength']:g}, lr "
        f"{s['ndtm']['lr_start']:g} -> {s['ndtm']['lr_end']:g}, kappa {s['ndtm']['kappa']:g} (the "
        f"benchmark's settings; row (d) changes the guidance and, where its schedule names one, "
        f"N); {s['device']}, "
        f"{s['torch_threads']} thread; whole script {s['wall_time_s']:.0f} s.",
        "",
        "| method | median fiber loss | mean fiber loss | colour KL | colour W1 | s / sample "
        "| failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        pm = {
            k: f"{r[k]:.3g} ± {r[k + '_std']:.2g}"
            for k in ("median_fiber_loss", "mean_fiber_loss", "kl", "w1")
        }
        lines.append(
            f"| {r['method']} | {pm['median_fiber_loss']} | {pm['mean_fiber_loss']} | "
            f"{pm['kl']} | {pm['w1']} | {r['seconds_per_sample']:.3g} | {r['failed']} |"
        )
    drifts = [r for r in report["rows"] if "colour_drift_vs_b" in r]
    if drifts:
        lines += [
            "",
            "What the guidance does to the colours: (b), (c) and (d) start from the same noise "
            "((d) with guidance 0 gives (b)'s images), so each colour of (c) and (d) has a twin in "
            "(b). Change of b against the twin (`colour_drift.png`); 'away' is the change "
            "times sign(b - 0.5), positive when the guidance pushes the colour away from h's wrap.",
            "",
            "| method | mean abs change | mean change away from the wrap | the same, colours "
            "within 0.1 of the wrap |",
            "|---|---|---|---|",
        ]
        for r in drifts:
            dr = r["colour_drift_vs_b"]
            lines.append(
                f"| {r['method'][:3]} | {dr['mean_abs_change']:.4f} | "
                f"{dr['mean_change_away_from_wrap']:+.4f} | "
                f"{dr['near_wrap_mean_change_away']:+.4f} ({dr['near_wrap_colours']} colours) |"
            )
    fates = [r for r in drifts if r.get("branch_fate_vs_b") is not None]
    if fates:  # records written before branch_fate have none
        lines += [
            "",
            "Colours off h's branch (digit colour more than 0.3 from h(b)) in (b), and what the "
            "guidance made of each in its twin: put on the law by moving b across the wrap "
            "(b = 0.5), put on the law with b on the same side, or left off; and colours of (b) "
            "on the law that the guidance put off it.",
            "",
            "| method | colours | off the law in (b) | on the law, b across the wrap | on the law, "
            "same side | still off | put off the law |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in fates:
            fate = r["branch_fate_vs_b"]
            lines.append(
                f"| {r['method'][:3]} | {fate['colours']} | {fate['base_off_law']} | "
                f"{fate['put_on_law_across_the_wrap']} | {fate['put_on_law_same_side']} | "
                f"{fate['still_off_law']} | {fate['put_off_law']} |"
            )
    lines += ["", "| target | bound | measured | met |", "|---|---|---|---|"]
    for t in report["targets"].values():
        lines.append(
            f"| {t['rule']} | {t['bound']:.4g} | {t['value']:.4g} | {'yes' if t['met'] else 'no'} |"
        )
    lines += [
        "",
        "Fidelity: fiber loss ||phi(x) - phi(x*)||^2, phi = E(decolorize(x)). Consistency: KL "
        "(20 bins) and W1 between the samples' background colours and the known mixture (lower "
        "is better for all). (b), (c) and (d) use the shipped `color-mnist-conditional` "
        "(lambda_fiber 0.01); (c) and (d) condition every network call of each row on that row's "
        "target y* and correct the trajectory with NDTM's control.",
        "",
        "The same control with plain gradient steps instead of Adam's (`optimiser='sgd'`): "
        "`optimiser/results_test.md`, written by `benchmarks/color_mnist_ndtm_optimiser.py`.",
        "",
    ]
    if report.get("tuning"):
        lines += [
            "## How row (d)'s schedule was chosen",
            "",
            f"{s['tune_references']} training digits (not the held-out references) in colourings "
            f"of seed {s['tune_seed'] + 1}, {s['num_samples']} samples each, noise seed "
            f"{s['tune_seed']}, one set per schedule. Eligible: median fiber loss <= "
            f"{FIDELITY_FACTOR:g} x row (a)'s on the same digits; the pick is the eligible "
            "schedule with the lowest colour KL."
            + (
                f" The candidates' rows are carried from `{s['tuning_carried_from']}` (they "
                "sample the conditional model alone, so the prior does not change them); row (a) "
                "was measured again with this run's prior, and eligibility and the pick follow "
                "from it."
                if s.get("tuning_carried_from")
                else ""
            ),
            "",
            "| schedule | median fiber loss | colour KL | colour W1 | eligible |",
            "|---|---|---|---|---|",
        ]
        for r in report["tuning"]:
            ok = "" if r["eligible"] is None else ("yes" if r["eligible"] else "no")
            lines.append(
                f"| {r['schedule']} | {r['median_fiber_loss']:.3g} | {r['kl']:.3f} | "
                f"{r['w1']:.4f} | {ok} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
