"""`FiberResult`: the typed output of every sampler."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


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

    @property
    def num_references(self) -> int:
        return self.images.shape[0]

    @property
    def num_samples(self) -> int:
        return self.images.shape[1]

    def median_loss(self) -> float:
        ok = self.fiber_loss[~self.failed]
        return float(ok.median()) if ok.numel() else math.nan

    def summary(self) -> str:
        return (
            f"{self.num_references} reference(s) x {self.num_samples} sample(s): median fiber loss "
            f"{self.median_loss():.4g}, {int(self.failed.sum())} failed, {self.wall_time:.1f} s"
        )

    def metrics(self) -> dict:
        per = []
        for r in range(self.num_references):
            for m in range(self.num_samples):
                per.append(
                    {
                        "reference": r,
                        "sample": m,
                        "fiber_loss": None if self.failed[r, m] else float(self.fiber_loss[r, m]),
                        "failed": bool(self.failed[r, m]),
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

    def save(self, out_dir: str | Path) -> Path:
        """Write ``grid.png`` (reference first in each row), ``samples.safetensors`` and
        ``metrics.json`` into ``out_dir``; returns the folder."""
        from safetensors.torch import save_file

        from ..reporting.grid import save_grid

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        refs = self.references
        if refs is None:  # explicit targets: show a blank tile in the reference column
            refs = torch.ones(self.images.shape[0], *self.images.shape[2:])
        save_grid(out / "grid.png", refs, self.images, self.fiber_loss, self.failed)
        tensors = {
            "images": self.images.contiguous().float(),
            "fiber_loss": self.fiber_loss.contiguous().float(),
            "loss_trace": self.loss_trace.contiguous().float(),
            "failed": self.failed.to(torch.uint8).contiguous(),
        }
        if self.references is not None:
            tensors["references"] = self.references.contiguous().float()
        targets = self.targets if isinstance(self.targets, tuple) else (self.targets,)
        for i, t in enumerate(targets):
            if isinstance(t, torch.Tensor):
                tensors[f"target_{i}"] = t.detach().cpu().contiguous().float()
        save_file(tensors, str(out / "samples.safetensors"))
        (out / "metrics.json").write_text(json.dumps(self.metrics(), indent=2, default=str))
        return out

    @classmethod
    def load(cls, run_dir: str | Path) -> FiberResult:
        """Read back a folder written by :meth:`save`."""
        from safetensors.torch import load_file

        run_dir = Path(run_dir)
        t = load_file(str(run_dir / "samples.safetensors"))
        meta = json.loads((run_dir / "metrics.json").read_text())
        return cls(
            images=t["images"],
            references=t.get("references"),
            fiber_loss=t["fiber_loss"],
            loss_trace=t["loss_trace"],
            failed=t["failed"].bool(),
            config=meta.get("config", {}),
            wall_time=float(meta.get("wall_time_s", 0.0)),
        )
