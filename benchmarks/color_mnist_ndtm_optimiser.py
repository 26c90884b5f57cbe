"""NDTM's control optimiser on the conditional fiber model: Adam (the paper's) against plain
gradient steps.

    python benchmarks/color_mnist_ndtm_optimiser.py [--split train|test] [--sets K]
        [--lr-scales 10 30 100 300] [--out DIR]

Row (d) of ``color_mnist_ndtm_conditional.py`` (NDTM on ``color-mnist-conditional``, its guidance
schedule and inner steps read from that script's results.json) is run with its Adam control and
with ``optimiser='sgd'`` at Adam's learning rates times each of ``--lr-scales``, against (b), the
plain conditional sampler. All rows start from the same noise, and NDTM with zero control gives
(b)'s images, so every colour has a twin in (b): the change of each background colour is what
the guidance did, and the colour KL's excess over (b) is paired set by set.

``--split train`` (default) runs on the digits that script tunes on (32 training digits in
colourings of seed 101, noise seeds 100, 101, ...); ``--split test`` on the benchmark's 16
held-out references (noise seeds 0, 1, ..., as that script's rows). Writes
``results_{split}.md``, ``results_{split}.json`` and ``colour_histograms_{split}.png`` into
``--out``. Runs on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from color_mnist_ndtm_conditional import OUT as CONDITIONAL_OUT  # noqa: E402
from color_mnist_ndtm_conditional import (  # noqa: E402
    background_colours,
    drift_summary,
    on_one_thread,
    paired_drift,
    plot_colours,
)

from fiber_plugins import zoo  # noqa: E402
from fiber_plugins.color_mnist_bench import (  # noqa: E402
    BENCH_NDTM,
    CONDITIONAL,
    _make_sampler,
    references,
    sample_sets,
    summarise,
)
from fiber_plugins.objectives import FiberObjective  # noqa: E402
from fiber_plugins.samplers import GuidanceSchedule, NDTMConfig, NDTMSampler  # noqa: E402

OUT = "benchmarks/results/color-mnist-ndtm-conditional/optimiser"
ROOT = Path(__file__).resolve().parents[1]  # the repository
BIG_MOVE = 0.05  # a colour moved by more than this is counted


def row_d_config(results_json: Path, steps: int) -> NDTMConfig:
    """Row (d)'s NDTM settings as ``color_mnist_ndtm_conditional.py`` chose and recorded them."""
    if not results_json.is_file():
        raise SystemExit(
            f"{results_json} not found: run benchmarks/color_mnist_ndtm_conditional.py first, "
            "or pass --conditional-results"
        )
    s = json.loads(results_json.read_text())["settings"]
    base = NDTMConfig(num_steps=steps, **BENCH_NDTM)
    return replace(
        base,
        guidance=GuidanceSchedule.from_dict(s["row_d_guidance"]),
        inner_steps=int(s["row_d_inner_steps"]),
    )


def sgd_config(adam: NDTMConfig, scale: float) -> NDTMConfig:
    """The same control with plain gradient steps at ``scale`` x Adam's learning rates."""
    return replace(
        adam, optimiser="sgd", lr_start=adam.lr_start * scale, lr_end=adam.lr_end * scale
    )


def paired_excess(per_set: list[dict], base_sets: list[dict]) -> dict:
    """KL minus (b)'s on the same noise seed: mean and standard error over the sets."""
    d = torch.tensor([r["kl"] - b["kl"] for r, b in zip(per_set, base_sets)], dtype=torch.float64)
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"mean": float(d.mean()), "se": se, "per_set": d.tolist()}


def moves(b: torch.Tensor, d: torch.Tensor) -> dict:
    """Colours that the guidance moved by more than BIG_MOVE, and how many of them lay within 0.1
    of h's wrap (b = 0.5) and moved down."""
    big = d.abs() > BIG_MOVE
    near = (b - 0.5).abs() < 0.1
    return {
        "moved": int(big.sum()),
        "moved_near_wrap": int((big & near).sum()),
        "moved_near_wrap_down": int((big & near & (d < 0)).sum()),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--references", type=int, default=None, help="default 32 (train), 16 (test)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--sets", type=int, default=4, help="independent sample sets (noise seeds)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--lr-scales", type=float, nargs="+", default=[10.0, 30.0, 100.0, 300.0])
    p.add_argument(
        "--conditional-results",
        default=str(ROOT / CONDITIONAL_OUT / "results.json"),
        help="results.json of color_mnist_ndtm_conditional.py (row (d)'s schedule)",
    )
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    if any(not (math.isfinite(s) and s > 0) for s in args.lr_scales):
        raise SystemExit(f"--lr-scales must be positive numbers, got {args.lr_scales}")
    return on_one_thread(run, args)


def run(args) -> dict:
    start = time.perf_counter()
    adam = row_d_config(Path(args.conditional_results), args.steps)
    if args.split == "train":  # the digits color_mnist_ndtm_conditional.py tunes on
        num, seed0 = args.references or 32, 100
        refs = references(num, seed0, split="train")
    else:
        num, seed0 = args.references or 16, 0
        refs = references(num, seed0)
    seeds = [seed0 + i for i in range(args.sets)]
    subject = zoo.load("color-mnist-subject")
    objective = FiberObjective(subject, name="E(decolorize(x))")  # as the benchmark builds it
    model = zoo.load(CONDITIONAL["conditional"])
    prior = zoo.load("color-mnist-prior")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    n_bench = BENCH_NDTM["inner_steps"]  # unused by the plain conditional sampler
    samplers = {"b": _make_sampler("conditional", prior, objective, args.steps, n_bench)}
    samplers["adam"] = NDTMSampler(model, objective, adam)
    for s in args.lr_scales:
        samplers[f"sgd x{s:g}"] = NDTMSampler(model, objective, sgd_config(adam, s))
    rows: dict[str, dict] = {}
    runs_of: dict[str, list] = {}
    for key, sampler in samplers.items():
        per_set, runs, secs = sample_sets(sampler, refs, args.samples, seeds)
        row = {"row": key, **summarise(per_set), "seconds_per_sample": secs}
        if key != "b":
            row["optimiser"] = sampler.config.optimiser
            row["lr"] = [sampler.config.lr_start, sampler.config.lr_end]
            row["kl_excess_vs_b"] = paired_excess(per_set, rows["b"]["per_set"])
            b, d = paired_drift(runs_of["b"], runs)
            row["colour_drift_vs_b"] = {**drift_summary(b, d), **moves(b, d)}
        rows[key] = row
        runs_of[key] = runs
        print({k: v for k, v in row.items() if k != "per_set"}, flush=True)

    colours = {k: torch.cat([background_colours(r) for r in runs_of[k]]) for k in rows}
    plot_colours(colours, rows, out / f"colour_histograms_{args.split}.png")
    settings = {
        "split": args.split,
        "num_references": num,
        "num_samples": args.samples,
        "seeds": seeds,
        "ndtm_adam": adam.to_dict(),
        "lr_scales": args.lr_scales,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": time.perf_counter() - start,
    }
    report = {"settings": settings, "rows": list(rows.values())}
    (out / f"results_{args.split}.json").write_text(json.dumps(report, indent=2))
    (out / f"results_{args.split}.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    s = report["settings"]
    a = s["ndtm_adam"]
    g = a["guidance"]
    where = (
        "training digits (the ones color_mnist_ndtm_conditional.py tunes on)"
        if s["split"] == "train"
        else "held-out references (the benchmark's)"
    )
    lines = [
        f"# NDTM's control optimiser on the conditional fiber model ({s['split']} split)",
        "",
        f"{s['num_references']} {where} x {s['num_samples']} samples, {len(s['seeds'])} sample "
        f"sets (noise seeds {s['seeds'][0]}..{s['seeds'][-1]}; mean ± std over the sets), "
        f"T = {a['num_steps']}. NDTM on `color-mnist-conditional` with row (d)'s control: "
        f"guidance {g['kind']} {g['strength']:g} at noise levels <= {g['high']:g}, N = "
        f"{a['inner_steps']}, kappa {a['kappa']:g}; Adam at lr {a['lr_start']:g} -> "
        f"{a['lr_end']:g}, SGD at those rates times the scale. {s['device']}, "
        f"{s['torch_threads']} thread; {s['wall_time_s']:.0f} s.",
        "",
        "| row | median fiber loss | mean fiber loss | colour KL | KL - (b)'s, paired (mean ± "
        "s.e.) | mean abs change of b | colours moved > 0.05 (within 0.1 of the wrap, down) "
        "| s / sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ex = r.get("kl_excess_vs_b")
        dr = r.get("colour_drift_vs_b")
        label = "(b) conditional sampler" if r["row"] == "b" else f"(d) {r['row']}"
        lines.append(
            f"| {label} | {r['median_fiber_loss']:.3g} ± {r['median_fiber_loss_std']:.2g} | "
            f"{r['mean_fiber_loss']:.3g} ± {r['mean_fiber_loss_std']:.2g} | "
            f"{r['kl']:.3f} ± {r['kl_std']:.3f} | "
            + (f"{ex['mean']:+.3f} ± {ex['se']:.3f} | " if ex else " | ")
            + (
                f"{dr['mean_abs_change']:.4f} | {dr['moved']} ({dr['moved_near_wrap_down']}) | "
                if dr
                else " |  | "
            )
            + f"{r['seconds_per_sample']:.3g} |"
        )
    lines += [
        "",
        f"{report['rows'][0]['num_colours']} colours per row. Fidelity: fiber loss "
        "||phi(x) - phi(x*)||^2, phi = E(decolorize(x)); consistency: KL (20 bins) between the "
        "samples' background colours and the known mixture. `colour_histograms_"
        f"{s['split']}.png` shows every row's colours against the mixture.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
