"""Small pieces shared by the optimisation-based samplers (noise optimisation, pixel inversion,
latent refinement): config (de)serialisation, choice validation, and a per-row optimiser."""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import torch

OPTIMISERS = ("sgd", "adam")


class SettingsMixin:
    """``to_dict`` / ``from_dict`` for frozen config dataclasses (JSON round trip)."""

    _label = "sampler"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown {cls._label} settings {sorted(unknown)}; valid: {sorted(known)}"
            )
        return cls(**d)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def row_mask(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) bool -> broadcastable (B, 1, ..., 1) against ``like``."""
    return rows.view(-1, *([1] * (like.dim() - 1)))


class RowOptimiser:
    """SGD or Adam written out element-wise, with per-row freezing.

    ``torch.optim`` updates whole tensors; a sampler must leave rows that stopped (or failed)
    exactly where they are, momentum included, so the update is masked per row. Element-wise
    updates also keep every row independent of the rest of its batch.
    """

    def __init__(self, kind: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        check_choice("optimiser", kind, OPTIMISERS)
        self.kind, self.lr, self.betas, self.eps = kind, float(lr), betas, eps
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def step(
        self, key: int, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """The updated ``param``; rows where ``rows`` is False are returned unchanged."""
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
        if self.kind == "sgd":
            new = param - self.lr * grad
        else:
            b1, b2 = self.betas
            m, v, k = self._state.get(key, (torch.zeros_like(param), torch.zeros_like(param), 0))
            k += 1
            m = m * b1 + (1 - b1) * grad
            v = v * b2 + (1 - b2) * grad * grad
            self._state[key] = (m, v, k)
            new = param - self.lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + self.eps)
        return torch.where(row_mask(rows, param), new, param)
