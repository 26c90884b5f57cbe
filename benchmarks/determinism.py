"""How much seeded samples depend on the batch size, and that a resumed run does not.

Every row (reference, sample) has its own generator, so the noise it sees does not depend on its
batch. What can still differ is float32 round-off: convolution and matmul kernels pick other
algorithms (and summation orders) for other batch shapes, and the sampler may amplify that.
This script measures it on the shipped Color-MNIST models: NDTM on 4 test references x 4
samples, once per batch size (1, 2, 4, 16), for a few settings, and a run interrupted after two
batches and resumed against the uninterrupted run. It prints the largest and the mean absolute
pixel difference to batch size 1 and saves the table as
``benchmarks/results/determinism-<device>-<date>.md``::

    python benchmarks/determinism.py            # CPU, ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import tempfile
from pathlib import Path

import torch

import fiber_plugins as fp
from fiber_plugins import zoo
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.errors import RunInterrupted
from fiber_plugins.samplers import run_folder as rf

OUT = Path(__file__).resolve().parent / "results"
SETTINGS = (  # (T, N, eta, guidance)
    (3, 1, 0.0, 1.0),
    (25, 3, 0.0, 0.0),
    (25, 3, 0.0, 1.0),
    (25, 3, 0.5, 1.0),
)


def _diff(a, b) -> tuple[float, float, bool]:
    d = (a.images - b.images).abs()
    return float(d.max()), float(d.mean()), bool(torch.equal(a.images, b.images))


def _interrupted_and_resumed(s, kw, batch_size):
    with tempfile.TemporaryDirectory() as tmp:
        orig, calls = rf.RunFolder.commit, []

        def stop_after_two(self, *a, **k):
            orig(self, *a, **k)
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt

        rf.RunFolder.commit = stop_after_two
        try:
            s.sample(batch_size=batch_size, out=Path(tmp) / "run", **kw)
        except RunInterrupted:
            pass
        finally:
            rf.RunFolder.commit = orig
        return s.sample(batch_size=batch_size, out=Path(tmp) / "run", resume=True, **kw)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path, default=OUT)
    args = p.parse_args(argv)
    prior = zoo.load("color-mnist-prior", device=args.device)
    subject = zoo.load("color-mnist-subject", device=args.device)
    objective = fp.FiberObjective(subject, name="E(decolorize(x))")
    g, _ = cm.load_digits("test")
    refs, _ = cm.make_colored(g[:4], torch.Generator().manual_seed(0))
    kw = dict(references=refs, n=4, seed=0, progress=False)
    rows = []
    for T, N, eta, gamma in SETTINGS:
        s = fp.NDTMSampler(prior, objective, num_steps=T, inner_steps=N, eta=eta, guidance=gamma)
        base = s.sample(batch_size=1, **kw)
        label = f"T={T}, N={N}, eta={eta}, guidance={gamma}"
        rows.append((label, "batch 1, again", *_diff(s.sample(batch_size=1, **kw), base)))
        for bs in (2, 4, 16):
            rows.append((label, f"batch {bs}", *_diff(s.sample(batch_size=bs, **kw), base)))
        resumed = _interrupted_and_resumed(s, kw, 4)
        rows.append(
            (label, "batch 4 resumed vs batch 4", *_diff(resumed, s.sample(batch_size=4, **kw)))
        )
        print(*rows[-5:], sep="\n", flush=True)
    date = _dt.date.today().isoformat()
    lines = [
        f"# Seeded NDTM samples vs batch size ({args.device}, {date})",
        "",
        "Shipped Color-MNIST prior and subject (E(decolorize(x))), 4 test references x 4 samples, "
        "seed 0; absolute pixel differences (pixels in [0, 1]) to the same settings at batch "
        f"size 1. torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads. `python benchmarks/determinism.py`.",
        "",
        "| settings | run | max abs pixel diff | mean abs pixel diff | bit-identical |",
        "|---|---|---|---|---|",
    ]
    for label, run, mx, mean, same in rows:
        lines.append(f"| {label} | {run} | {mx:.2e} | {mean:.2e} | {'yes' if same else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"determinism-{args.device}-{date}.md").write_text(text)
    return [dict(zip(("settings", "run", "max", "mean", "identical"), r)) for r in rows]


if __name__ == "__main__":
    main()
