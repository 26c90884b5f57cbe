"""Validate the off-manifold realism score on Color-MNIST, and calibrate its shipped threshold.

With the shipped prior (``zoo.load("color-mnist-prior")``) and the benchmark's subject
(phi = E(decolorize(x)), ``fiber_plugins.color_mnist_bench``), the realism score
(``fiber_plugins.evaluation.realism_score``: the prior's denoising error, higher = less
realistic) is computed for

- real: **true fiber samples**, the validation references recoloured with fresh colours from the
  known law (exact fiber members: same digit, any colouring b, h(b));
- off-manifold: **pixel-inversion** samples of the same references (``PixelInversionSampler``,
  the benchmark's settings ``BENCH_INVERSION``), and **noise-like** images of three kinds:
  Gaussian noise N(0.5, 0.25^2) clipped to [0, 1], uniform noise, and the prior's own samples
  from a single deterministic step (saturated noise);
- for information only (not in the AUCs): the prior's unguided samples (25 deterministic steps:
  DDIM, or Euler for a flow-matching prior; 50 stochastic steps with eta 1) and NDTM fiber samples with the benchmark's settings (T = 25, N = 3, eta
  0) and with the demo's eta 0.5.

The threshold is calibrated on held-out coloured test digits (``calibrate_realism``, conformal
0.99 quantile). Test-split digits are split by the benchmark's own permutation (seed 0): the first
100 are left to the benchmark's references, the validation references come next, the held-out
calibration digits are the last 500. Reported: ROC AUC of real vs each off-manifold kind and
pooled, the threshold's false-positive rate on the real fiber samples and its detection rate on
each other kind. Writes ``results.json``, ``results.md`` and ``histogram.png`` into
``benchmarks/results/color-mnist-realism/``::

    python benchmarks/color_mnist_realism.py                       # ~4 minutes on 1 CPU thread
    python benchmarks/color_mnist_realism.py --write-calibration   # also ship the threshold

``--write-calibration`` stores the calibration in ``fiber_plugins/evaluation/realism.py``
(``CALIBRATED``, keyed by the prior's weight fingerprint), where ``known_calibration(prior)`` and
the CLI's ``sample`` command find it. Rerun it after retraining the prior.
"""

from __future__ import annotations

import argparse
import json
import math
import pprint
import re
import time
from pathlib import Path

import torch

from fiber_plugins import zoo
from fiber_plugins._utils import median, to_model_range
from fiber_plugins.color_mnist_bench import BENCH_INVERSION, BENCH_NDTM
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.evaluation import realism as rl
from fiber_plugins.objectives import FiberObjective
from fiber_plugins.samplers import (
    NDTMConfig,
    NDTMSampler,
    PixelInversionConfig,
    PixelInversionSampler,
)

OUT = Path(__file__).resolve().parent / "results" / "color-mnist-realism"
PRIOR = "color-mnist-prior"
BENCH_RESERVED = 100  # test digits perm[:100]: left to the benchmark's references
NUM_TEST = 1000
OFF_KINDS = ("inversion", "gaussian", "uniform", "prior-1-step")
LABELS = {
    "real": "true fiber samples (references recoloured)",
    "inversion": "pixel inversion",
    "gaussian": "Gaussian noise N(0.5, 0.25^2), clipped",
    "uniform": "uniform noise",
    "prior-1-step": "prior, 1 deterministic step (saturated noise)",
    "prior-ddim-25": "prior, 25 deterministic steps (DDIM / Euler; unguided samples)",
    "prior-ddpm-50": "prior, 50 stochastic steps, eta 1 (unguided samples)",
    "ndtm": "NDTM fiber samples (benchmark settings, eta 0)",
    "ndtm-eta05": "NDTM fiber samples (eta 0.5, the demo's)",
    "held-out": "held-out test digits (calibration)",
}


def _split(num_references: int, num_held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(NUM_TEST, generator=torch.Generator().manual_seed(0))
    refs = perm[BENCH_RESERVED : BENCH_RESERVED + num_references]
    held = perm[NUM_TEST - num_held_out :]
    if BENCH_RESERVED + num_references > NUM_TEST - num_held_out:
        raise SystemExit(
            f"--references {num_references} and --held-out {num_held_out} overlap: their sum "
            f"must be at most {NUM_TEST - BENCH_RESERVED}"
        )
    return refs, held


def run(
    out: Path = OUT,
    num_references: int = 64,
    num_samples: int = 4,
    num_held_out: int = 500,
    num_noise: int = 128,
    inversion_steps: int = int(BENCH_INVERSION["num_steps"]),
    ndtm_references: int = 8,
    quantile: float = rl.DEFAULT_QUANTILE,
    seed: int = 0,
    device: str = "cpu",
    write_calibration: bool = False,
) -> dict:
    """Run the validation; returns (and writes) the report dict."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prior = zoo.load(PRIOR, device=device)
    subject = zoo.load("color-mnist-subject", device=device)
    objective = FiberObjective(subject, name="E(decolorize(x))")
    g_test, _ = cm.load_digits("test")
    ref_idx, held_idx = _split(num_references, num_held_out)
    g_refs = g_test[ref_idx]
    refs, _ = cm.make_colored(g_refs, torch.Generator().manual_seed(seed + 11))
    held, _ = cm.make_colored(g_test[held_idx], torch.Generator().manual_seed(seed + 10))

    images: dict[str, torch.Tensor] = {}
    losses: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    # (a) true fiber samples: the same digits in fresh colourings from the known law
    images["real"], _ = cm.make_colored(
        g_refs.repeat_interleave(num_samples, 0), torch.Generator().manual_seed(seed + 12)
    )
    # (b) pixel inversion of the same references
    t0 = time.perf_counter()
    inv = PixelInversionSampler(
        prior, objective, PixelInversionConfig(**{**BENCH_INVERSION, "num_steps": inversion_steps})
    ).sample(references=refs, n=num_samples, seed=seed, progress=False)
    seconds["inversion sampling"] = time.perf_counter() - t0
    ok = ~inv.failed.reshape(-1)
    images["inversion"] = inv.images.reshape(-1, *inv.images.shape[2:])[ok]
    losses["inversion"] = inv.fiber_loss.reshape(-1)[ok]
    # (c) noise-like images
    gen = torch.Generator().manual_seed(seed + 13)
    shape = (num_noise, 3, cm.SIZE, cm.SIZE)
    images["gaussian"] = (0.5 + 0.25 * torch.randn(shape, generator=gen)).clamp(0, 1)
    images["uniform"] = torch.rand(shape, generator=gen)
    with torch.no_grad():
        x = prior.sample_unguided(torch.randn(shape, generator=gen).to(prior.device), num_steps=1)
        images["prior-1-step"] = ((x.cpu() + 1) / 2).clamp(0, 1)
        # information: the prior's own samples
        half = (max(1, num_noise // 2), *shape[1:])
        for kind, steps, eta in (("prior-ddim-25", 25, 0.0), ("prior-ddpm-50", 50, 1.0)):
            z = torch.randn(half, generator=gen).to(prior.device)
            step_noise = [torch.randn(half, generator=gen).to(prior.device) for _ in range(steps)]
            x = prior.sample_unguided(z, num_steps=steps, eta=eta, step_noises=step_noise)
            images[kind] = ((x.cpu() + 1) / 2).clamp(0, 1)
    # information: NDTM fiber samples, the benchmark's settings and the demo's eta
    for kind, eta in (("ndtm", 0.0), ("ndtm-eta05", 0.5)) if ndtm_references > 0 else ():
        t0 = time.perf_counter()
        nd = NDTMSampler(
            prior, objective, NDTMConfig(num_steps=25, **{**BENCH_NDTM, "eta": eta})
        ).sample(references=refs[:ndtm_references], n=num_samples, seed=seed, progress=False)
        seconds[f"{kind} sampling"] = time.perf_counter() - t0
        ok = ~nd.failed.reshape(-1)
        images[kind] = nd.images.reshape(-1, *nd.images.shape[2:])[ok]
        losses[kind] = nd.fiber_loss.reshape(-1)[ok]
    # fiber loss of the true fiber samples (they are on the fiber: about 0 up to clipping)
    with objective.attached(), torch.no_grad():
        y = objective.target(to_model_range(refs.to(device)))
        losses["real"] = (
            objective.loss(
                to_model_range(images["real"].to(device)), y.repeat_interleave(num_samples, 0)
            )
            .cpu()
            .float()
        )

    # the score and the calibration
    t0 = time.perf_counter()
    held_scores = rl.realism_score(prior, held)  # the default settings, as calibrate_realism
    check = rl.RealismCheck.from_scores(
        held_scores,
        quantile,
        prior=rl.prior_fingerprint(prior),
        source=(
            f"{num_held_out} Color-MNIST test digits (the last {num_held_out} of the benchmark's "
            f"test permutation, seed 0), coloured with seed {seed + 10}"
        ),
    )
    levels = {
        k: rl.realism_score(prior, v, check.levels, check.draws, check.seed, per_level=True)
        for k, v in images.items()
    }
    scores = {k: v.mean(1) for k, v in levels.items()}  # = check.score(prior, images[k])
    seconds["scoring"] = time.perf_counter() - t0
    num_scored = num_held_out + sum(v.shape[0] for v in images.values())

    real = scores["real"]
    rows = []
    for kind, s in scores.items():
        row = {
            "kind": kind,
            "label": LABELS[kind],
            "n": int(s.numel()),
            "median_score": median(s),
            "p01_score": float(s.quantile(0.01)),
            "p99_score": float(s.quantile(0.99)),
            "flagged_share": float(check.flag(s).float().mean()),
            "median_fiber_loss": median(losses[kind]) if kind in losses else None,
            "role": "real"
            if kind == "real"
            else "off-manifold"
            if kind in OFF_KINDS
            else "information",
        }
        if kind != "real":
            row["roc_auc_vs_real"] = rl.roc_auc(real, s)
            row["roc_auc_vs_real_per_level"] = [
                rl.roc_auc(levels["real"][:, i], levels[kind][:, i])
                for i in range(len(check.levels))
            ]
        row["median_per_level"] = [float(v) for v in levels[kind].median(0).values]
        rows.append(row)
    pooled = torch.cat([scores[k] for k in OFF_KINDS])
    noise_pooled = torch.cat([scores[k] for k in OFF_KINDS if k != "inversion"])
    summary = {
        "roc_auc_pooled": rl.roc_auc(real, pooled),
        "roc_auc_noise_pooled": rl.roc_auc(real, noise_pooled),
        "min_roc_auc": min(r["roc_auc_vs_real"] for r in rows if r["role"] == "off-manifold"),
        "threshold": check.threshold,
        "false_positive_rate_real": float(check.flag(real).float().mean()),
        "detection_rate_pooled": float(check.flag(pooled).float().mean()),
        "held_out_median_score": median(held_scores),
    }
    wall = time.perf_counter() - t_start
    report = {
        "settings": {
            "prior": PRIOR,
            "prior_fingerprint": check.prior,
            "num_references": num_references,
            "num_samples": num_samples,
            "num_held_out": num_held_out,
            "num_noise": num_noise,
            "inversion": {**BENCH_INVERSION, "num_steps": inversion_steps},
            "ndtm_references": ndtm_references,
            "quantile": quantile,
            "seed": seed,
            "device": device,
            "torch_threads": torch.get_num_threads(),
        },
        "calibration": check.to_dict(),
        "summary": summary,
        "scores": {
            "held-out": [round(float(v), 6) for v in held_scores],
            **{k: [round(float(v), 6) for v in s] for k, s in scores.items()},
        },
        "rows": rows,
        "seconds": {
            **seconds,
            "total": wall,
            "scoring_per_image": seconds["scoring"] / num_scored,
        },
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(_markdown(report))
    _plot(scores, held_scores, check.threshold, out / "histogram.png")
    if write_calibration:
        path = write_calibration_entry(check, summary)
        report["calibration_written_to"] = str(path)
    return report


def write_calibration_entry(check: rl.RealismCheck, summary: dict) -> Path:
    """Replace the Color-MNIST prior's entry of ``CALIBRATED`` in realism.py by ``check``."""
    path = Path(rl.__file__)
    text = path.read_text()
    begin = text.index("# BEGIN CALIBRATED")
    end = text.index("# END CALIBRATED")
    head = text[begin:].split("\n", 1)[0]
    entries = {k: v for k, v in rl.CALIBRATED.items() if v.get("extra", {}).get("name") != PRIOR}
    entry = check.to_dict()
    entry["extra"] = {
        "name": PRIOR,
        "command": "python benchmarks/color_mnist_realism.py --write-calibration",
        "validation_roc_auc_pooled": round(summary["roc_auc_pooled"], 4),
        "validation_false_positive_rate": round(summary["false_positive_rate_real"], 4),
    }
    entries[str(check.prior)] = entry
    body = "CALIBRATED: dict[str, dict] = " + pprint.pformat(entries, width=96, sort_dicts=True)
    new = text[:begin] + head + "\n" + body + "\n" + text[end:]
    if re.search(r"\bnan\b|\binf\b", body):
        raise SystemExit(f"refusing to write a non-finite calibration: {entry}")
    path.write_text(new)
    return path


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _markdown(report: dict) -> str:
    s, c, sm, sec = report["settings"], report["calibration"], report["summary"], report["seconds"]
    lines = [
        "# Color-MNIST: off-manifold realism score",
        "",
        f"Prior `{s['prior']}` (fingerprint `{s['prior_fingerprint']}`); score: the prior's "
        f"denoising error at levels {', '.join(f'{v:g}' for v in c['levels'])}, "
        f"{c['draws']} fixed noise draws each (higher = less realistic). "
        f"{s['num_references']} validation references x {s['num_samples']} samples; "
        f"{s['num_noise']} images per noise kind; pixel inversion {s['inversion']['num_steps']} "
        f"Adam steps (lr {s['inversion']['lr']}, TV {s['inversion']['tv_weight']}); seed "
        f"{s['seed']}; device {s['device']} ({s['torch_threads']} thread(s)).",
        "",
        f"Threshold {c['threshold']:.4g}: the conformal {c['quantile']} quantile of "
        f"{c['num_images']} held-out real images ({c['source']}; largest held-out score "
        f"{c['held_out_max']:.4g}).",
        "",
        "| kind | role | n | median score | 1% / 99% score | ROC AUC vs real | flagged | median fiber loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['label']} | {r['role']} | {r['n']} | {_fmt(r['median_score'])} | "
            f"{_fmt(r['p01_score'])} / {_fmt(r['p99_score'])} | {_fmt(r.get('roc_auc_vs_real'))} "
            f"| {100 * r['flagged_share']:.1f} % | {_fmt(r['median_fiber_loss'])} |"
        )
    lv = c["levels"]
    lines += [
        "",
        "Per noise level: median denoising error (ROC AUC vs the true fiber samples at that "
        "level alone). The score is the mean over the levels.",
        "",
        "| kind | " + " | ".join(f"level {v:g}" for v in lv) + " |",
        "|---|" + "---|" * len(lv),
    ]
    for r in report["rows"]:
        aucs = r.get("roc_auc_vs_real_per_level")
        cells = [
            _fmt(m) + (f" ({aucs[i]:.3f})" if aucs else "")
            for i, m in enumerate(r["median_per_level"])
        ]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Pooled ROC AUC (real vs all off-manifold kinds): {sm['roc_auc_pooled']:.4f}; noise "
        f"kinds pooled: {sm['roc_auc_noise_pooled']:.4f}; smallest per kind: "
        f"{sm['min_roc_auc']:.4f}.",
        f"At the threshold: false-positive rate on true fiber samples "
        f"{100 * sm['false_positive_rate_real']:.1f} %, detection rate on the off-manifold "
        f"kinds pooled {100 * sm['detection_rate_pooled']:.1f} %.",
        "",
        "Wall time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in sec.items() if k != "scoring_per_image")
        + f" ({1000 * sec['scoring_per_image']:.1f} ms per scored image).",
        "",
    ]
    return "\n".join(lines)


def _plot(scores: dict, held: torch.Tensor, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    every = torch.cat([held, *scores.values()])
    every = every[torch.isfinite(every) & (every > 0)]
    bins = np.logspace(
        math.log10(float(every.min()) * 0.9), math.log10(float(every.max()) * 1.1), 60
    )
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    ax.hist(held.numpy(), bins=bins, color="0.85", edgecolor="0.6", label=LABELS["held-out"])
    colors = plt.get_cmap("tab10").colors
    palette = [c for i, c in enumerate(colors) if i != 7]  # tab10's 8th colour is grey
    for i, (kind, s) in enumerate(scores.items()):
        ax.hist(
            s.numpy(),
            bins=bins,
            histtype="step",
            lw=1.5,
            color=palette[i % len(palette)],
            ls="-" if kind in ("real", *OFF_KINDS) else ":",
            label=LABELS[kind],
        )
    ax.axvline(threshold, color="k", ls="--", lw=1.5, label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("realism score (denoising error; higher = less realistic)")
    ax.set_ylabel("images")
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("solid: real and off-manifold kinds; dotted: for information", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--references", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--held-out", type=int, default=500)
    p.add_argument("--noise", type=int, default=128, help="images per noise kind")
    p.add_argument("--inversion-steps", type=int, default=int(BENCH_INVERSION["num_steps"]))
    p.add_argument("--ndtm-references", type=int, default=8, help="0: skip the NDTM row")
    p.add_argument("--quantile", type=float, default=rl.DEFAULT_QUANTILE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--write-calibration", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    report = run(
        a.out,
        num_references=a.references,
        num_samples=a.samples,
        num_held_out=a.held_out,
        num_noise=a.noise,
        inversion_steps=a.inversion_steps,
        ndtm_references=a.ndtm_references,
        quantile=a.quantile,
        seed=a.seed,
        device=a.device,
        write_calibration=a.write_calibration,
    )
    print((Path(a.out) / "results.md").read_text())
    if "calibration_written_to" in report:
        print(f"calibration written to {report['calibration_written_to']}")
    return report


if __name__ == "__main__":
    main()
