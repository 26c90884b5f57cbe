"""``fiber-plugins report RUN_DIR``: one HTML page for a saved run.

The page shows the reference and sample grid, each sample's fiber loss against the baselines
found in ``evaluation.json`` (nearest neighbour, augmented references), the loss trace, the
low-pass robustness curve and the invariance map (per-pixel spread of the samples: the channel
mean of :func:`fiber_plugins.evaluation.invariance_map`). When ``evaluation.json`` holds realism
scores (:mod:`fiber_plugins.evaluation.realism`), samples flagged off-manifold get an orange frame
in the grid and a mark in the tables, and the page says how many were flagged. Images are
written as PNG files next to ``report.html``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import torch

from .._utils import median
from ..errors import MissingFileError, UserValueError
from ..evaluation.metrics import (
    LOWPASS_CUTOFFS,
    NearestNeighbourBaseline,
    augmentation_baseline,
    diversity,
    invariance_map,
    lowpass_curve,
)
from ..evaluation.realism import (
    DEFAULT_DRAWS,
    DEFAULT_LEVELS,
    DEFAULT_SEED,
    SCORE_NAME,
    RealismCheck,
    known_calibration,
    realism_score,
)
from ..objectives.targets import Targets
from ..samplers.result import FiberResult
from ..samplers.run_folder import (
    EVALUATION_FILE,
    FLAGGED_GRID_FILE,
    METRICS_FILE,
    REPORT_FILE,
    atomic_write,
)
from .html import Page

NO_THRESHOLD_NOTE = (
    "no calibrated threshold for this prior, so no sample is flagged: the scores alone do not "
    "say what is off-manifold. Calibrate one on held-out real images of the prior's domain "
    "(fiber_plugins.evaluation.calibrate_realism) and pass it as evaluate_run(..., "
    "realism_threshold=...)"
)


def evaluate_run(
    result: FiberResult,
    objective,
    out_dir: str | Path,
    pool01=None,
    prior=None,
    realism_threshold: float | RealismCheck | None = None,
) -> dict:
    """Compute what the report shows beyond the result itself and write ``evaluation.json``:
    the low-pass curve of every sample, the augmentation baseline and (given a reference set
    ``pool01``) the nearest-neighbour baseline.

    Given the run's ``prior``, also each sample's realism score
    (:func:`~fiber_plugins.evaluation.realism_score`, the prior's denoising error; higher = less
    realistic) and, with a threshold, an off-manifold flag per sample. ``realism_threshold`` is a
    :class:`~fiber_plugins.evaluation.RealismCheck` from
    :func:`~fiber_plugins.evaluation.calibrate_realism` (its score settings are used), a number
    (default settings), or ``None``: then the shipped calibration for this prior's exact weights
    (:func:`~fiber_plugins.evaluation.known_calibration`) if there is one, else scores without
    flags. The scores and flags go into ``evaluation.json`` (key ``realism``) and into the run's
    ``metrics.json`` (``realism_score`` and ``off_manifold`` per sample, ``realism`` at the top)
    when the folder has one.
    """
    out = Path(out_dir)
    ev: dict = {}
    if prior is not None:
        ev["realism"] = _realism(result, prior, realism_threshold)
        _add_realism_to_metrics(out / METRICS_FILE, ev["realism"])
    given = result.targets
    if given is None or Targets.of(given).summed:  # baselines need one target tensor
        if ev:
            (out / EVALUATION_FILE).write_text(json.dumps(ev, indent=2))
        return ev
    targets = cast(torch.Tensor, given)  # not a sum: a result then holds one (R, K) tensor
    r, m = result.fiber_loss.shape
    flat = result.images.reshape(r * m, *result.images.shape[2:])
    rows = targets.repeat_interleave(m, 0)
    curve = lowpass_curve(objective, flat, rows).reshape(len(LOWPASS_CUTOFFS), r, m)
    ev.update(
        {
            "lowpass_cutoffs": list(LOWPASS_CUTOFFS),
            "lowpass_median": [
                _median(curve[i][~result.failed]) for i in range(len(LOWPASS_CUTOFFS))
            ],
            "diversity": [diversity(result.images[i][~result.failed[i]]) for i in range(r)],
        }
    )
    if result.references is not None:
        aug = augmentation_baseline(objective, result.references, targets, n=m)
        ev["augmentation_median"] = [median(aug[i]) for i in range(r)]
    if pool01 is not None:
        nn_loss, nn_idx = NearestNeighbourBaseline(objective, pool01)(targets)
        ev["nearest_neighbour"] = nn_loss.tolist()
        ev["nearest_neighbour_index"] = nn_idx.tolist()
    (out / EVALUATION_FILE).write_text(json.dumps(ev, indent=2))
    return ev


def _median(t: torch.Tensor) -> float:
    return median(t)


def _realism(result: FiberResult, prior, given: float | RealismCheck | None) -> dict:
    """The ``realism`` entry of evaluation.json: per-sample scores, the threshold and flags."""
    check: RealismCheck | None
    threshold: float | None = None
    if isinstance(given, RealismCheck):
        check, source = given, "given (calibrated)"
    elif given is not None:
        check, source, threshold = None, "given as a number", float(given)
        if not math.isfinite(threshold):
            raise UserValueError(f"realism_threshold must be a finite number, got {given!r}")
    else:
        check = known_calibration(prior)
        source = "the shipped calibration for this prior's weights" if check else "none"
    if check is not None:
        threshold = check.threshold
    levels = check.levels if check is not None else DEFAULT_LEVELS
    draws = check.draws if check is not None else DEFAULT_DRAWS
    seed = check.seed if check is not None else DEFAULT_SEED
    r, m = result.failed.shape
    ok = ~result.failed.reshape(-1)
    flat = result.images.reshape(r * m, *result.images.shape[2:])
    scores = torch.full((r * m,), math.nan)
    try:
        if bool(ok.any()):
            scores[ok] = realism_score(prior, flat[ok], levels, draws, seed, batch_size=16)
        refs = (
            realism_score(prior, result.references, levels, draws, seed, batch_size=16).tolist()
            if result.references is not None
            else None
        )
    except UserValueError as err:  # e.g. a conditional fiber model: no score without y
        return {"score": SCORE_NAME, "skipped": str(err)}
    grid = scores.reshape(r, m)
    entry: dict = {
        "score": SCORE_NAME,
        "higher_is": "less realistic",
        "levels": list(levels),
        "draws": draws,
        "seed": seed,
        "scores": [[_finite(v) for v in row] for row in grid.tolist()],
        "reference_scores": None if refs is None else [_finite(v) for v in refs],
        "threshold": threshold,
        "threshold_source": source,
        "calibration": check.to_dict() if check is not None else None,
    }
    if threshold is None:
        entry.update(flagged=None, num_flagged=None, note=NO_THRESHOLD_NOTE)
    else:
        flags = grid > threshold
        entry["flagged"] = [
            [None if bool(result.failed[i, j]) else bool(flags[i, j]) for j in range(m)]
            for i in range(r)
        ]
        entry["num_flagged"] = int((flags & ~result.failed).sum())
    entry["num_scored"] = int(ok.sum())
    return entry


def _finite(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)


def _add_realism_to_metrics(path: Path, realism: dict) -> None:
    """Add the realism scores and flags to a run folder's ``metrics.json`` (if it has one):
    ``realism_score`` and ``off_manifold`` (None: failed, or no threshold) per sample, and a
    ``realism`` summary without the per-sample lists."""
    if not path.is_file():
        return
    metrics = json.loads(path.read_text())
    scores, flags = realism.get("scores"), realism.get("flagged")
    for entry in metrics.get("samples", []):
        i, j = entry.get("reference"), entry.get("sample")
        if scores is None or i is None or j is None:
            continue
        entry["realism_score"] = scores[i][j]
        entry["off_manifold"] = None if flags is None else flags[i][j]
    metrics["realism"] = {
        k: v for k, v in realism.items() if k not in ("scores", "flagged", "reference_scores")
    }
    atomic_write(path, lambda p: p.write_text(json.dumps(metrics, indent=2, default=str)))


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
    realism = ev.get("realism") or {}
    flagged = _flag_tensor(realism, result)
    if flagged is not None:
        from ..grid import save_grid

        refs = result.references
        if refs is None:  # explicit targets: a blank tile in the reference column
            refs = torch.ones(result.images.shape[0], *result.images.shape[2:])
        save_grid(
            run / FLAGGED_GRID_FILE,
            refs,
            result.images,
            result.fiber_loss,
            result.failed,
            flagged=flagged,
        )
        page.image(
            FLAGGED_GRID_FILE,
            "references (red frame) and their fiber samples; orange frame: flagged off-manifold",
        )
        n_flag, n_ok = int(flagged.sum()), int((~result.failed).sum())
        page.text(
            f"{n_flag} of {n_ok} samples flagged off-manifold (orange frame): their realism "
            f"score (the prior's denoising error) is above the threshold "
            f"{realism['threshold']:.4g} ({realism.get('threshold_source', '?')}). A flagged "
            "sample is not an image the prior would produce (adversarial pattern or noise); "
            "treat its fiber loss with suspicion.",
            cls="warn" if n_flag else "note",
        )
    else:
        page.image("grid.png", "references (red frame) and their fiber samples")
        if "skipped" in realism:
            page.text(f"Realism scores not computed: {realism['skipped']}", cls="note")
        elif "scores" in realism and realism.get("threshold") is None:
            page.text(f"Realism scores computed, {NO_THRESHOLD_NOTE}.", cls="note")

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
            else f"{float(result.fiber_loss[i, j]):.4g} (flagged)"
            if flagged is not None and bool(flagged[i, j])
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

    if "scores" in realism:
        _realism_section(page, realism, result, flagged)

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
    return page.write(run / REPORT_FILE)


def _flag_tensor(realism: dict, result: FiberResult) -> torch.Tensor | None:
    """(R, M) bool flags from evaluation.json's realism entry (None: no flags there, or they do
    not fit the result)."""
    flags = realism.get("flagged")
    if flags is None:
        return None
    t = torch.tensor([[bool(v) for v in row] for row in flags], dtype=torch.bool)
    return t if tuple(t.shape) == tuple(result.failed.shape) else None


def _realism_section(
    page: Page, realism: dict, result: FiberResult, flagged: torch.Tensor | None
) -> None:
    page.heading("Realism score per sample (off-manifold check)")
    header = ["reference"] + [f"sample {j}" for j in range(result.num_samples)]
    refs = realism.get("reference_scores")
    if refs is not None:
        header.append("the reference itself")
    rows = []
    for i, scores in enumerate(realism["scores"]):
        row: list = [i]
        for j, v in enumerate(scores):
            if v is None:
                row.append("failed" if bool(result.failed[i, j]) else "–")
            elif flagged is not None and bool(flagged[i, j]):
                row.append(f"{v:.4g} (flagged)")
            else:
                row.append(float(v))
        if refs is not None:
            row.append("–" if refs[i] is None else float(refs[i]))
        rows.append(row)
    page.table(header, rows)
    levels = ", ".join(f"{v:g}" for v in realism.get("levels", []))
    threshold = realism.get("threshold")
    text = (
        "The realism score is the prior's denoising error: the mean squared error of its noise "
        f"estimate on the sample noised to the levels {levels} ({realism.get('draws')} fixed "
        "noise draws each). Higher = less like the images the prior was trained on. "
    )
    if threshold is not None:
        cal = realism.get("calibration") or {}
        how = (
            f" (the {cal['quantile']:g} quantile of {cal['num_images']} held-out real images"
            + (f": {cal['source']}" if cal.get("source") else "")
            + ")"
            if cal.get("quantile") is not None
            else ""
        )
        text += f"Threshold {threshold:.4g}{how}; above it a sample is flagged."
    else:
        text += "No threshold: " + NO_THRESHOLD_NOTE + "."
    page.text(text, cls="note")
