"""How well an unconditional Color-MNIST prior has learnt the colour law, from unguided samples.

Draws ``--n`` unguided samples (T=``--steps``, seeded noise, the grid and update the samplers
use: :meth:`DiffusionPrior.sample_unguided`, DDIM eta=0 / Euler for flow matching) and prints

- the colour KL and W1 of the recovered background colours against the known mixture, with the
  Color-MNIST benchmark's estimator (:func:`fiber_plugins.color_mnist_bench.consistency`: a
  20-bin histogram KL over all 3 n channel colours);
- per background-colour bin of width 0.1, the number of channel colours and the share whose
  digit colour is on the wrong branch of h (|f - h(b)| > 0.3), computed exactly as
  ``benchmarks/color_mnist_settings.py``'s ``wrong_branch_by_bin`` (same noise for the same
  seed and n, so the two agree sample for sample);
- the seconds per sampled image.

``PRIOR_DIR`` is a diffusers prior folder (what :func:`fiber_plugins.load_prior` reads) or a zoo
name (``color-mnist-prior``). Writes ``quality.json`` and ``quality.md`` into ``--out-dir``
(appending a row to ``quality.md`` per run)::

    python benchmarks/color_mnist_prior_quality.py color-mnist-prior --n 512 --out-dir /tmp/q
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

    if Path(prior).expanduser().is_dir():
        return fp.load_prior(prior)
    return zoo.load(prior)


def unguided(prior, n: int, seed: int, steps: int, batch: int = 256) -> torch.Tensor:
    """n unguided samples in [0, 1]; the noise is color_mnist_settings.wrong_branch_by_bin's."""
    noise = torch.randn(n, *prior.latent_shape, generator=torch.Generator().manual_seed(seed))
    out = [
        prior.sample_unguided(noise[i : i + batch], num_steps=steps).clamp(-1, 1)
        for i in range(0, n, batch)
    ]
    return (torch.cat(out) + 1) / 2


def wrong_branch(x: torch.Tensor) -> list[tuple[float, int, float]]:
    """Per b-bin of width 0.1: (bin start, channel colours, share on the wrong branch of h)."""
    from fiber_plugins.data import color_mnist as cm

    return cm.wrong_branch_shares(x)


def measure(prior, n: int = 256, steps: int = 25, seed: int = 0) -> dict:
    """Colour KL / W1 (the benchmark's estimator), wrong-branch shares per b-bin, s / image."""
    from fiber_plugins.color_mnist_bench import consistency

    t0 = time.perf_counter()
    x = unguided(prior, n, seed, steps)
    secs = time.perf_counter() - t0
    cells = wrong_branch(x)
    return {
        **consistency(x),
        "wrong_branch": [{"bin": lo, "colours": c, "share": w} for lo, c, w in cells],
        "max_wrong_share": max((w for _, c, w in cells if c), default=math.nan),
        "n": n,
        "steps": steps,
        "seed": seed,
        "seconds_per_image": secs / n,
        "torch_threads": torch.get_num_threads(),
    }


def markdown_row(name: str, r: dict) -> str:
    cells = " | ".join(
        f"{c['share']:.2f} ({c['colours']})" if c["colours"] else "-" for c in r["wrong_branch"]
    )
    return (
        f"| {name} | {r['n']} | {r['steps']} | {r['kl']:.3f} | {r['w1']:.3f} | {cells} "
        f"| {r['seconds_per_image']:.3f} |"
    )


HEADER = (
    "| prior | n | T | colour KL | colour W1 | "
    + " | ".join(f"b in [{i / 10:.1f}, {(i + 1) / 10:.1f})" for i in range(10))
    + " | s / image |\n|---|---|---|---|---|"
    + "---|" * 10
    + "---|"
)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prior", help="a diffusers prior folder or a zoo name")
    p.add_argument("--n", type=int, default=256, help="unguided samples (3 colours each)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (the benchmark's T)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--name", default=None, help="the row's label (default: PRIOR)")
    p.add_argument("--out-dir", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.name or args.prior
    r = {"prior": name, **measure(load(args.prior), args.n, args.steps, args.seed)}
    print(
        f"{name}: colour KL {r['kl']:.3f}, W1 {r['w1']:.3f} ({r['num_colours']} colours), "
        f"max wrong-branch share {r['max_wrong_share']:.2f}, {r['seconds_per_image']:.3f} s/image"
    )
    print(HEADER)
    print(markdown_row(name, r), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    js = args.out_dir / "quality.json"
    rows = json.loads(js.read_text()) if js.exists() else []
    js.write_text(json.dumps([*rows, r], indent=2))
    md = args.out_dir / "quality.md"
    if not md.exists():
        md.write_text(
            "# Color-MNIST prior quality (unguided samples)\n\nColour KL / W1: the benchmark's "
            "estimator against the known mixture; per b-bin: wrong-branch share (colours).\n\n"
            + HEADER
            + "\n"
        )
    with md.open("a") as fh:
        fh.write(markdown_row(name, r) + "\n")
    return r


if __name__ == "__main__":
    main()
