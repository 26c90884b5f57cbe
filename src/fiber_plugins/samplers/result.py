"""`FiberResult`: the typed output of every sampler."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._utils import median, warn
from ..errors import MissingFileError, UserValueError
from ..objectives.targets import Targets
from .rows import row_unit_labels
from .run_folder import (
    GRID_FILE,
    METRICS_FILE,
    RUN_FILE,
    SAMPLES_FILE,
    RunFolder,
    check_out_dir,
    tensor_digest,
)


@dataclass
class FiberResult:
    """Fiber samples for R references x M samples each.

    Attributes
    ----------
    images: (R, M, C, H, W) samples in [0, 1] (failed samples are zeros).
    references: (R, C, H, W) reference images in [0, 1] at the prior's size, or ``None`` when the
        targets were given explicitly.
    fiber_loss: (R, M) final fiber loss d(phi(x), y*) of each sample against the static target.
    loss_trace: (R, M, T) fiber loss of the Tweedie estimate at each sampling step.
    failed: (R, M) True where a sample hit a non-finite value and was stopped.
    reasons: R x M nested list: why each failed sample failed (None for the others).
    targets: (R, K) targets y* (a tuple of them for summed objectives).
    config: the sampler's settings and the objective/prior description.
    wall_time: seconds for the whole call.
    """

    images: torch.Tensor
    references: torch.Tensor | None
    fiber_loss: torch.Tensor
    loss_trace: torch.Tensor
    failed: torch.Tensor
    config: dict = field(default_factory=dict)
    wall_time: float = 0.0
    targets: object = None
    reasons: list | None = None

    @property
    def num_references(self) -> int:
        """R, the number of references (or explicit targets)."""
        return self.images.shape[0]

    @property
    def num_samples(self) -> int:
        """n, the samples per reference."""
        return self.images.shape[1]

    def median_loss(self) -> float:
        """Median final fiber loss over the samples that did not fail (NaN if all failed)."""
        ok = self.fiber_loss[~self.failed]
        return median(ok)

    def summary(self) -> str:
        """One line: references x samples, median fiber loss, failures, wall time."""
        return (
            f"{self.num_references} reference(s) x {self.num_samples} sample(s): median fiber loss "
            f"{self.median_loss():.4g}, {int(self.failed.sum())} failed, {self.wall_time:.1f} s"
        )

    def reason(self, r: int, m: int) -> str | None:
        """Why sample (r, m) failed (None when it did not)."""
        if not bool(self.failed[r, m]):
            return None
        if self.reasons is not None and self.reasons[r][m]:
            return self.reasons[r][m]
        return "non-finite value during sampling"

    def metrics(self) -> dict:
        """The run's metrics (what ``metrics.json`` holds): per sample its fiber loss, failure and
        reason, plus the median and the counts.
        """
        per = []
        for r in range(self.num_references):
            for m in range(self.num_samples):
                per.append(
                    {
                        "reference": r,
                        "sample": m,
                        "fiber_loss": None if self.failed[r, m] else float(self.fiber_loss[r, m]),
                        "failed": bool(self.failed[r, m]),
                        "reason": self.reason(r, m),
                    }
                )
        return {
            "num_references": self.num_references,
            "num_samples": self.num_samples,
            "median_fiber_loss": self.median_loss(),
            "num_failed": int(self.failed.sum()),
            "wall_time_s": self.wall_time,
            "seconds_per_sample": self.wall_time
            / max(1, self.images.shape[0] * self.images.shape[1]),
            "samples": per,
            "config": self.config,
        }

    @property
    def unit_labels(self) -> list[str] | None:
        """The unit of each reference row when the call sampled a
        :class:`~fiber_plugins.objectives.units.UnitSet` (else None)."""
        return row_unit_labels(self.config)

    def by_unit(self) -> dict[str, FiberResult]:
        """The rows of each unit as a result of its own, in unit order: images (R_u, M, ...),
        targets the unit's own columns (R_u, k). A call on one objective gives ``{"0": self}``.
        """
        labels = self.unit_labels
        if labels is None:
            return {"0": self}
        units = self.config["objective"]["units"]
        out: dict[str, FiberResult] = {}
        for u, label in enumerate(units["labels"]):
            rows = torch.tensor(
                [r for r, name in enumerate(labels) if name == label], dtype=torch.long
            )
            if rows.numel() == 0:
                continue
            a, b = units["spans"][u]
            target = None if self.targets is None else Targets.of(self.targets).value[rows][:, a:b]
            out[label] = dataclasses.replace(
                self,
                images=self.images[rows],
                references=None if self.references is None else self.references[rows],
                fiber_loss=self.fiber_loss[rows],
                loss_trace=self.loss_trace[rows],
                failed=self.failed[rows],
                targets=target,
                reasons=None if self.reasons is None else [self.reasons[int(r)] for r in rows],
                config={**self.config, "unit": label},
            )
        return out

    def target_tuple(self) -> tuple[torch.Tensor, ...]:
        """The targets as a tuple of (R, K_i) tensors (one per summed term)."""
        return () if self.targets is None else Targets.of(self.targets).parts

    def fingerprint(self) -> dict:
        """What decides the samples: a resumed run must match it (see :mod:`.run_folder`)."""
        return run_fingerprint(self.config, self.num_samples, self.references, self.target_tuple())

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the run folder ``out_dir``: ``grid.png`` (reference first in each row),
        ``samples.safetensors``, ``metrics.json``, ``inputs.safetensors`` (references, targets),
        ``index.parquet`` and ``run.json`` (see :mod:`fiber_plugins.samplers.run_folder`).

        A folder holding an earlier run is refused unless ``overwrite=True``, which removes that
        whole run first. Returns the folder.
        """
        mode = check_out_dir(out_dir, overwrite=overwrite, can_resume=False)
        folder = RunFolder.start(
            out_dir,
            self.fingerprint(),
            self.num_references,
            self.num_samples,
            self.references,
            self.target_tuple(),
            mode=mode,
            extra=self._manifest_extra(),
            row_units=row_unit_labels(self.config),
        )
        self.write_to(folder)
        return folder.path

    def _manifest_extra(self) -> dict:
        summed = self.targets is not None and Targets.of(self.targets).summed
        return {"config": self.config, "targets_tuple": summed}

    def write_to(self, folder: RunFolder) -> None:
        """Finish ``folder`` with this (complete) result."""
        folder.manifest.update(self._manifest_extra(), wall_time_s=self.wall_time)
        reasons = [
            [self.reason(r, m) for m in range(self.num_samples)] for r in range(self.num_references)
        ]
        folder.finish(
            self.images, self.loss_trace, self.fiber_loss, self.failed, reasons, self.metrics()
        )
        self.save_grid(folder.path / GRID_FILE)

    def save_grid(self, path: str | Path) -> Path:
        """Draw the sample grid (reference in a red frame first in each row) to ``path``."""
        from ..grid import save_grid

        refs = self.references
        if refs is None:  # explicit targets: show a blank tile in the reference column
            refs = torch.ones(self.images.shape[0], *self.images.shape[2:])
        save_grid(path, refs, self.images, self.fiber_loss, self.failed)
        return Path(path)

    @classmethod
    def load(cls, run_dir: str | Path) -> FiberResult:
        """Read back a run folder (written by :meth:`save` or ``sample(..., out=...)``).

        A run that did not finish loads with its missing rows marked failed (reason "not
        sampled: the run was interrupted") and a warning that says how to finish it.
        """
        run_dir = Path(run_dir)
        if not (run_dir / RUN_FILE).is_file():
            if (run_dir / SAMPLES_FILE).is_file():
                return cls._load_legacy(run_dir)
            raise MissingFileError(
                f"{str(run_dir)!r} is not a run folder (no {RUN_FILE}); write one with "
                "result.save(dir) or fiber-plugins sample --out DIR"
            )
        folder = RunFolder.open(run_dir)
        man = folder.manifest
        refs, targets = folder.inputs()
        (unit,) = man["units"]
        R, M = unit["num_references"], unit["n"]
        images: torch.Tensor | None = None
        trace: torch.Tensor | None = None
        fiber_loss = torch.full((R, M), math.nan)
        failed = torch.ones(R, M, dtype=torch.bool)
        reasons: list[list[str | None]] = [
            ["not sampled: the run was interrupted"] * M for _ in range(R)
        ]
        for r, m, img, tr, loss, bad, why in folder.rows():
            if images is None or trace is None:
                images = torch.zeros(R, M, *img.shape)
                trace = torch.full((R, M, *tr.shape), math.nan)
            images[r, m], trace[r, m], fiber_loss[r, m], failed[r, m] = img, tr, loss, bad
            reasons[r][m] = why if bad else None
        if images is None or trace is None:
            raise UserValueError(
                f"run folder {str(run_dir)!r} holds no finished row yet; finish it with "
                "--resume (resume=True)"
            )
        if man.get("status") != "complete":
            warn(
                f"run {str(run_dir)!r} is {man.get('status')}: {len(folder.index)} of {R * M} "
                "rows are done; the others are marked failed. Finish it with --resume "
                "(sample(..., out=dir, resume=True))"
            )
        return cls(
            images=images,
            references=refs,
            fiber_loss=fiber_loss,
            loss_trace=trace,
            failed=failed,
            config=man.get("config", {}),
            wall_time=float(man.get("wall_time_s", 0.0)),
            targets=targets if man.get("targets_tuple") else (targets[0] if targets else None),
            reasons=reasons,
        )

    @classmethod
    def _load_legacy(cls, run_dir: Path) -> FiberResult:
        """A folder written before run.json existed (samples.safetensors + metrics.json)."""
        from safetensors.torch import load_file

        t = load_file(str(run_dir / SAMPLES_FILE))
        meta = json.loads((run_dir / METRICS_FILE).read_text())
        targets = tuple(t[k] for k in sorted(t) if k.startswith("target_"))
        return cls(
            images=t["images"],
            references=t.get("references"),
            fiber_loss=t["fiber_loss"],
            loss_trace=t["loss_trace"],
            failed=t["failed"].bool(),
            config=meta.get("config", {}),
            wall_time=float(meta.get("wall_time_s", 0.0)),
            targets=(targets[0] if len(targets) == 1 else targets) if targets else None,
        )


def run_fingerprint(config: dict, n: int, references, targets) -> dict:
    """What decides a run's samples, to check that a resumed run is the same run: sampler,
    settings, objective, prior, seed, n, precision settings, and a hash of the references (or of
    the explicit targets). Batch size and device are not part of it."""
    acc = {k: v for k, v in dict(config.get("acceleration", {})).items() if k != "checkpointing"}
    return {
        "sampler": config.get("sampler"),
        "settings": json.loads(json.dumps(config.get("settings"), default=str)),
        "objective": json.loads(json.dumps(config.get("objective"), default=str)),
        "prior": config.get("prior"),
        "seed": config.get("seed"),
        "n": n,
        "acceleration": json.loads(json.dumps(acc, default=str)),
        "inputs": tensor_digest(references) if references is not None else tensor_digest(*targets),
    }


def call_record(sampler, seed: int, batch_size) -> dict:
    """``result.config`` of a sampler call: the sampler and its settings, the objective, the
    prior (and, for a conditional fiber model, which one and what it is conditioned on), the
    seed, batch size, device and acceleration."""
    from ..priors.conditional import as_fiber_model

    record = {
        "sampler": sampler.name,
        "settings": sampler.config.to_dict(),
        "objective": sampler.objective.describe(),
        "prior": repr(sampler.prior),
        "seed": seed,
        "batch_size": batch_size,
        "device": str(sampler.device),
        "acceleration": sampler.prior.acceleration.to_dict(),
    }
    model = as_fiber_model(sampler.prior)
    if model is not None:  # which model, conditioned on what
        record["fiber_model"] = model.record()
    return record
