"""`Batch`: what an algorithm sees of one batch of rows, and how it stops a row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .._utils import randn_rows


@dataclass
class Batch:
    """What an algorithm sees for one batch of rows (one row = one reference x one sample)."""

    rows: list[tuple[int, int]]
    generators: list[torch.Generator]
    x_T: torch.Tensor  # (B, *latent) initial noise
    target: object  # (B, K) tensor or tuple of them: the static target y*
    ref_latent: torch.Tensor | None  # (B, *latent) encoded reference, for re-approximated targets
    alive: torch.Tensor  # (B,) bool, cleared when a sample hits a non-finite value
    # why rows failed: a code per row on the device (0: none), so that recording a failure
    # never waits for the GPU; read once per batch with reasons()
    _codes: torch.Tensor | None = None
    _texts: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def for_rows(cls, rows, generators, x_T: torch.Tensor, targets, ref_latents) -> Batch:
        """The batch of ``rows`` ((reference, sample) pairs) starting from ``x_T`` (B, *latent):
        each row's target is its reference's row of ``targets`` (a
        :class:`~fiber_plugins.objectives.targets.Targets` of R rows), likewise ``ref_latents``
        (R, *latent) or None; every row alive."""
        device = x_T.device
        idx = torch.tensor([r for r, _ in rows], device=device)
        return cls(
            rows=list(rows),
            generators=list(generators),
            x_T=x_T,
            target=targets.rows(idx).value,
            ref_latent=ref_latents[idx] if ref_latents is not None else None,
            alive=torch.ones(len(rows), dtype=torch.bool, device=device),
        )

    @property
    def condition(self):
        """What a conditional prior (a trained fiber model) is conditioned on: each row's own
        static target y* (its reference's row of the targets; never a re-approximated y*_t).
        Rows keep it through batching, out-of-memory back-off and resume, because it is looked
        up from the row's reference index like the target."""
        return self.target

    def step_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise like ``like`` (B, ...), each row from its own generator."""
        return randn_rows(self.generators, tuple(like.shape[1:]), like.device, like.dtype)

    def fail(self, rows: torch.Tensor, reason: str) -> None:
        """Stop the rows where ``rows`` (B,) is True and record ``reason`` for those that had
        none (the first cause is kept). ``alive`` is cleared in place; no host sync."""
        rows = rows.to(self.alive.device).bool()
        if self._codes is None:
            self._codes = torch.zeros(len(self.rows), dtype=torch.long, device=self.alive.device)
        if not self._texts or self._texts[-1] != reason:
            self._texts.append(reason)
        code = len(self._texts)
        self._codes = torch.where(rows & (self._codes == 0), code, self._codes)
        self.alive &= ~rows

    def reasons(self) -> list[str | None]:
        """The recorded reason of each row (None where none was recorded)."""
        if self._codes is None:
            return [None] * len(self.rows)
        return [self._texts[c - 1] if c else None for c in self._codes.tolist()]


def mark_nonfinite(x: torch.Tensor, alive: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
    """Clear ``alive`` for rows where x or any per-row value is non-finite; zero those rows of x."""
    ok = torch.isfinite(x).flatten(1).all(1)
    for v in values:
        ok = ok & torch.isfinite(v)
    alive &= ok
    return torch.where(alive.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))
