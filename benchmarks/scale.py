"""Throughput of many units: one target per sampler call against many units per call, and one
against two processes (torchrun), on the shipped Color-MNIST models.

1. ``units``: U channels of the classifier's last conv layer x 1 reference x 1 sample, NDTM with
   T steps and N inner steps: (a) one call per unit (batch 1 each, how a user without unit
   batching does it), (b) one UnitSet call (batch U), and (c) for reference one call on a single
   unit with U rows (U references x 1 sample: the same total batch, one target).
2. ``procs``: the example plan ``examples/plans/color-mnist-channels.toml`` run into a fresh
   store by 1 process and by ``torchrun --nproc_per_node 2`` (wall time including start-up).

Prints a table and saves it as ``benchmarks/results/scale-<device>-<date>.md``::

    python benchmarks/scale.py                 # CPU: ~5 min on 2 cores
    python benchmarks/scale.py --units 256 --steps 50 --inner-steps 4 --device cuda
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fiber_plugins as fp
from fiber_plugins import zoo
from fiber_plugins.jobs.work import dataset_images
from fiber_plugins.objectives.units import UnitSet

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
PLAN = ROOT / "examples" / "plans" / "color-mnist-channels.toml"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def units_rows(units: int, steps: int, inner: int, device: str) -> list[dict]:
    """Samples per hour for U units x 1 reference x 1 sample, three ways."""
    prior = zoo.load("color-mnist-prior", device=device)
    model = zoo.load("color-mnist-classifier", device=device)
    ref = dataset_images("color-mnist:test", [0])[0].image
    refs = [r.image for r in dataset_images("color-mnist:test", list(range(units)))]
    settings = dict(num_steps=steps, inner_steps=inner)

    def layer(index):
        return fp.FiberObjective(model, layer="features.8", index=index, reduction="spatial_mean")

    rows = []
    fp.NDTMSampler(prior, layer([0]), **settings).sample(
        references=[ref], n=1, progress=False
    )  # warm-up
    _sync(device)
    t = time.perf_counter()
    for u in range(units):
        fp.NDTMSampler(prior, layer([u]), **settings).sample(references=[ref], n=1, progress=False)
    _sync(device)
    rows.append(("one call per unit (batch 1)", units, time.perf_counter() - t))
    t = time.perf_counter()
    result = fp.NDTMSampler(prior, UnitSet.of(layer(list(range(units)))), **settings).sample(
        references=[ref], n=1, batch_size=units, progress=False
    )
    _sync(device)
    rows.append(
        (f"one UnitSet call, {units} units (batch {units})", units, time.perf_counter() - t)
    )
    assert result.images.shape[0] == units
    t = time.perf_counter()
    fp.NDTMSampler(prior, layer([0]), **settings).sample(
        references=refs, n=1, batch_size=units, progress=False
    )
    _sync(device)
    rows.append((f"one unit, {units} references (batch {units})", units, time.perf_counter() - t))
    return [
        {"setting": name, "samples": n, "seconds": s, "samples_per_hour": 3600 * n / s}
        for name, n, s in rows
    ]


def procs_rows(device: str) -> list[dict]:
    """Wall time of the example plan with 1 and 2 processes (fresh stores)."""
    rows = []
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for procs in (1, 2):
            store = Path(tmp) / f"store{procs}"
            cmd = [torchrun, "--standalone", "--nproc_per_node", str(procs), "-m",
                   "fiber_plugins.cli.main", "run", str(PLAN), "--out", str(store)]  # fmt: skip
            if device != "cpu":
                cmd += ["--device", device] if procs == 1 else []
            t = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            seconds = time.perf_counter() - t
            samples = 64
            rows.append({"setting": f"example plan, torchrun {procs} process(es), 1 thread each",
                         "samples": samples, "seconds": seconds,
                         "samples_per_hour": 3600 * samples / seconds})  # fmt: skip
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-procs", action="store_true")
    args = p.parse_args(argv)
    rows = units_rows(args.units, args.steps, args.inner_steps, args.device)
    if not args.skip_procs:
        rows += procs_rows(args.device)
    dev = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    lines = [
        f"# Throughput of many units ({dev}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{platform.python_version()})",
        "",
        f"NDTM T={args.steps}, N={args.inner_steps}, shipped Color-MNIST prior and classifier "
        "(layer features.8), 1 reference x 1 sample per unit; `python benchmarks/scale.py`.",
        "",
        "| setting | samples | seconds | samples / hour |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['setting']} | {r['samples']} | {r['seconds']:.1f} | {r['samples_per_hour']:.0f} |"
              for r in rows]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else "gpu"
    (OUT / f"scale-{tag}-{_dt.date.today().isoformat()}.md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
