"""Precision and compilation settings of the engine on the shipped Color-MNIST models.

NDTM (the benchmark's settings, T=10, N=3) on 4 Color-MNIST test references x 2 samples, once per
setting: fp32 eager, unguided, bf16 autocast, bf16 weights, blocks compiled. Prints a table of
wall time and fiber-loss statistics and saves it as
``benchmarks/results/precision-<device>-<date>.md``. Runs on the CPU (the default) or a GPU::

    python benchmarks/precision_cpu.py                       # CPU, blocks compiled with aot_eager
    python benchmarks/precision_cpu.py --device cuda --compile-backend inductor
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import platform
import time
import warnings
from pathlib import Path

import torch

import fiber_plugins as fp
from fiber_plugins import zoo
from fiber_plugins.color_mnist_bench import BENCH_NDTM
from fiber_plugins.data import color_mnist as cm

OUT = Path(__file__).resolve().parent / "results"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile-backend", default="aot_eager")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=OUT)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    prior = zoo.load("color-mnist-prior", device=device)
    objective = fp.FiberObjective(zoo.load("color-mnist-subject", device=device))
    g, _ = cm.load_digits("test")
    refs, _ = cm.make_colored(g[:4], torch.Generator().manual_seed(1))
    cfg = {**BENCH_NDTM, "num_steps": args.steps, "inner_steps": args.inner_steps}
    runs = [
        ("fp32 eager", prior, {}),
        ("unguided (scale)", prior, {"guidance": 0.0}),
        ("bf16 autocast", prior, {"autocast": True}),
        ("bf16 weights", copy.deepcopy(prior).accelerate(weights="bf16"), {}),
        (
            f"blocks compiled ({args.compile_backend}; compile time included)",
            copy.deepcopy(prior).accelerate(compile="blocks", compile_backend=args.compile_backend),
            {},
        ),
    ]
    rows = []
    for name, pr, extra in runs:
        sampler = fp.NDTMSampler(pr, objective, **{**cfg, **extra})
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = sampler.sample(references=refs, n=2, seed=0, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(
            {
                "setting": name,
                "seconds": time.perf_counter() - t0,
                "median": res.median_loss(),
                "max": float(res.fiber_loss.max()),
                "failed": int(res.failed.sum()),
            }
        )
        print(f"{name}: {rows[-1]['seconds']:.1f} s, median {rows[-1]['median']:.3g}", flush=True)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    date = _dt.date.today().isoformat()
    lines = [
        f"# NDTM precision settings on Color-MNIST: {dev or device} ({device}), {date}",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; T={args.steps}, "
        f"N={args.inner_steps}; 4 references x 2 samples; command: "
        f"`{' '.join(['python benchmarks/precision_cpu.py', *(argv or [])])}`",
        "",
        "| setting | wall time (s) | median fiber loss | max fiber loss | failed |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setting']} | {r['seconds']:.1f} | {r['median']:.3g} | {r['max']:.3g} | {r['failed']} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"precision-{device.type}-{date}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
