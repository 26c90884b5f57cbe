"""Conditional fiber models on the Color-MNIST benchmark's references, at several step counts.

    python benchmarks/color_mnist_conditional.py [MODEL ...] [--out DIR]

MODEL is a shipped name (default: color-mnist-conditional, color-mnist-conditional-nofiber) or a
folder written by ``fiber-plugins train conditional --out DIR`` (e.g. an ablation trained with
``--fiber-t-max 0.5``). The references, seeds and metrics are the benchmark's (16 held-out test
digits x 4 samples, seed 0), so T=25 reproduces its conditional rows. Writes results.md/.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fiber_plugins import zoo
from fiber_plugins._utils import median
from fiber_plugins.color_mnist_bench import consistency
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.objectives import FiberObjective
from fiber_plugins.priors import load_prior
from fiber_plugins.samplers import ConditionalFiberSampler

DEFAULT = ("color-mnist-conditional", "color-mnist-conditional-nofiber")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=list(DEFAULT))
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--references", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/color-mnist-conditional")
    args = p.parse_args(argv)
    objective = FiberObjective(zoo.load("color-mnist-subject"), name="E(decolorize(x))")
    g, _ = cm.load_digits("test")
    pick = torch.randperm(g.shape[0], generator=torch.Generator().manual_seed(0))
    refs, _ = cm.make_colored(g[pick[: args.references]], torch.Generator().manual_seed(1))
    rows = []
    for name in args.models:
        model = zoo.load(name) if name in zoo.NAMES else load_prior(name)
        info = model.info
        for steps in args.steps:
            res = ConditionalFiberSampler(model, objective, num_steps=steps).sample(
                references=refs, n=args.samples, seed=0, progress=False
            )
            ok = ~res.failed
            rows.append(
                {
                    "model": Path(name).name,
                    "fiber_weight": info.get("fiber_weight"),
                    "fiber_t_max": info.get("fiber_t_max"),
                    "steps": steps,
                    "median_fiber_loss": median(res.fiber_loss[ok]),
                    "mean_fiber_loss": float(res.fiber_loss[ok].mean()),
                    **consistency(res.images[ok]),
                    "seconds_per_sample": res.wall_time / res.fiber_loss.numel(),
                }
            )
            print(rows[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# Conditional fiber models on Color-MNIST",
        "",
        f"{args.references} held-out references x {args.samples} samples (the benchmark's), "
        f"seed 0, {torch.get_num_threads()} CPU threads.",
        "",
        "| model | lambda_fiber | t_max | T | median fiber loss | mean fiber loss | colour KL "
        "| colour W1 | s / sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['fiber_weight']} | {r['fiber_t_max']} | {r['steps']} | "
            f"{r['median_fiber_loss']:.4g} | {r['mean_fiber_loss']:.4g} | {r['kl']:.3g} | "
            f"{r['w1']:.3g} | {r['seconds_per_sample']:.3g} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'}")
    return rows


if __name__ == "__main__":
    main()
