"""``fiber-plugins report RUN_DIR``: one HTML page for a saved run.

The page shows the reference and sample grid, each sample's fiber loss against the baselines
found in ``evaluation.json`` (nearest neighbour, augmented references), the loss trace, the
low-pass robustness curve and the invariance map (per-pixel spread of the samples: the channel
mean of :func:`fiber_plugins.evaluation.invariance_map`). Images are written as PNG files next to
``report.html``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import torch

from ..errors import MissingFileError
from ..evaluation.metrics import (
    LOWPASS_CUTOFFS,
    NearestNeighbourBaseline,
    augmentation_baseline,
    diversity,
    invariance_map,
    lowpass_curve,
)
from ..objectives.targets import Targets
from ..samplers.result import FiberResult
from .html import Page

EVALUATION_FILE = "evaluation.json"


def evaluate_run(result: FiberResult, objective, out_dir: str | Path, pool01=None) -> dict:
    """Compute what the report shows beyond the result itself and write ``evaluation.json``:
    the low-pass curve of every sample, the augmentation baseline and (given a reference set
    ``pool01``) the nearest-neighbour baseline."""
    out = Path(out_dir)
    given = result.targets
    if given is None or Targets.of(given).summed:  # baselines need one target tensor
        return {}
    targets = cast(torch.Tensor, given)  # not a sum: a result then holds one (R, K) tensor
    r, m = result.fiber_loss.shape
    flat = result.images.reshape(r * m, *result.images.shape[2:])
    rows = targets.repeat_interleave(m, 0)
    curve = lowpass_curve(objective, flat, rows).reshape(len(LOWPASS_CUTOFFS), r, m)
    ev = {
        "lowpass_cutoffs": list(LOWPASS_CUTOFFS),
        "lowpass_median": [_median(curve[i][~result.failed]) for i in range(len(LOWPASS_CUTOFFS))],
        "diversity": [diversity(result.images[i][~result.failed[i]]) for i in range(r)],
    }
    if result.references is not None:
        aug = augmentation_baseline(objective, result.references, targets, n=m)
        ev["augmentation_median"] = [float(aug[i].median()) for i in range(r)]
    if pool01 is not None:
        nn_loss, nn_idx = NearestNeighbourBaseline(objective, pool01)(targets)
        ev["nearest_neighbour"] = nn_loss.tolist()
        ev["nearest_neighbour_index"] = nn_idx.tolist()
    (out / EVALUATION_FILE).write_text(json.dumps(ev, indent=2))
    return ev


def _median(t: torch.Tensor) -> float:
    return float(t.median()) if t.numel() else math.nan


def write_report(run_dir: str | Path, result: FiberResult | None = None) -> Path:
    """Write ``report.html`` (and its PNGs) into a run folder.

    ``result`` is the run's result when the caller has it in memory (the CLI after sampling);
    otherwise it is read from the folder. The run's own files are never rewritten; a missing
    ``grid.png`` is drawn.
    """
    from .._utils import require

    run = Path(run_dir)
    if result is None:
        if not (run / "run.json").is_file() and not (run / "samples.safetensors").is_file():
            raise MissingFileError(
                f"{str(run)!r} is not a run folder (no run.json); write one with "
                "'fiber-plugins sample' or FiberResult.save"
            )
        result = FiberResult.load(run)
    ev_path = run / EVALUATION_FILE
    ev = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")

    page = Page("fiber-plugins report")
    cfg = result.config
    page.text(
        f"{result.summary()}. Sampler {cfg.get('sampler', '?')}, objective "
        f"{cfg.get('objective', {}).get('name', '?')}, prior {cfg.get('prior', '?')}."
    )
    if not (run / "grid.png").is_file():
        result.save_grid(run / "grid.png")
    page.image("grid.png", "references (red frame) and their fiber samples")

    page.heading("Fiber loss per sample against the baselines")
    header = ["reference"] + [f"sample {j}" for j in range(result.num_samples)] + ["median"]
    if "nearest_neighbour" in ev:
        header.append("nearest neighbour")
    if "augmentation_median" in ev:
        header.append("augmented reference (median)")
    rows = []
    for i in range(result.num_references):
        ok = ~result.failed[i]
        row = [i] + [
            f"failed: {result.reason(i, j)}"
            if result.failed[i, j]
            else float(result.fiber_loss[i, j])
            for j in range(result.num_samples)
        ]
        row.append(_median(result.fiber_loss[i][ok]))
        if "nearest_neighbour" in ev:
            row.append(float(ev["nearest_neighbour"][i]))
        if "augmentation_median" in ev:
            row.append(float(ev["augmentation_median"][i]))
        rows.append(row)
    page.table(header, rows)

    page.heading("Loss trace")
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    trace = result.loss_trace.reshape(-1, result.loss_trace.shape[-1])
    for t in trace:
        ax.plot(t.numpy(), color="tab:blue", alpha=0.35, lw=1)
    ax.plot(trace.nanmedian(0).values.numpy(), color="k", lw=2, label="median")
    ax.set_yscale("log")
    ax.set_xlabel("sampling step")
    ax.set_ylabel("fiber loss of the Tweedie estimate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "trace.png")
    plt.close(fig)
    page.image("trace.png", "fiber loss along the sampling trajectory")

    if "lowpass_median" in ev:
        page.heading("Low-pass robustness")
        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
        ax.plot(ev["lowpass_cutoffs"], ev["lowpass_median"], "o-")
        ax.set_yscale("log")
        ax.set_xlabel("low-pass cutoff (fraction of Nyquist)")
        ax.set_ylabel("median fiber loss")
        fig.tight_layout()
        fig.savefig(run / "lowpass.png")
        plt.close(fig)
        page.image("lowpass.png", "fiber loss of low-passed samples")
        page.text(
            "A flat curve means the samples' match to the target survives removing high "
            "frequencies (a semantic match); a steep rise means it hides in fine detail.",
            cls="note",
        )

    page.heading("Invariance map")
    # the channel mean of the per-channel map that the Captum-style attribute returns; a
    # reference without a successful sample (NaN there) is drawn as 0
    spread = torch.nan_to_num(invariance_map(result).mean(1), nan=0.0)  # (R, H, W)
    fig, axes = plt.subplots(
        1, len(spread), figsize=(2.4 * len(spread), 2.6), dpi=110, squeeze=False
    )
    for i, s in enumerate(spread):
        im = axes[0, i].imshow(s.numpy(), cmap="magma")
        axes[0, i].set_title(f"reference {i}", fontsize=8)
        axes[0, i].axis("off")
        fig.colorbar(im, ax=axes[0, i], fraction=0.046)
    fig.tight_layout()
    fig.savefig(run / "invariance.png")
    plt.close(fig)
    page.image("invariance.png", "per-pixel standard deviation of the fiber samples")
    page.text(
        "Bright: pixels the samples change freely (the model is invariant there).", cls="note"
    )
    return page.write(run / "report.html")
