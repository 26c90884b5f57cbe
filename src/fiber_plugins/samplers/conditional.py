"""Sampling a conditional fiber model (DESIGN 4.3; paper Sec. 3.1): x ~ p(x | y = phi(x*)).

No guidance and no gradients: the trained model already knows the fiber, so one sample is
``num_steps`` Euler steps of its probability-flow ODE conditioned on y* (the row's target).
Runs on the shared engine (batching, seeds, progress, non-finite handling, OOM back-off) and
returns the same :class:`~fiber_plugins.samplers.FiberResult` as the guided samplers, so the
two approaches are compared on equal terms (``fiber-plugins bench color-mnist``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._utils import median
from ..errors import UserTypeError
from ..objectives.preprocess import Preprocess
from ..priors.conditional import ConditionalFiberModel
from ._common import SettingsMixin, check_bool, check_int, finite_rows
from .batch import Batch, mark_nonfinite
from .engine import FiberSampler


@dataclass(frozen=True)
class ConditionalConfig(SettingsMixin):
    """Conditional sampling settings.

    Parameters
    ----------
    num_steps: Euler steps of the flow ODE (the model's FlowMatch sigma grid).
    trace: record the fiber loss of the one-step estimate x0_hat at every step (one subject
        forward per step; off: the loss trace is all NaN, the final fiber loss is still there).
    autocast: bf16 autocast of the networks; the state x stays fp32.
    """

    _label = "conditional"

    num_steps: int = 25
    trace: bool = True
    autocast: bool = False

    def __post_init__(self):
        self._check("num_steps", check_int, 1)
        self._check("trace", check_bool)
        self._check("autocast", check_bool)


class ConditionalFiberSampler(FiberSampler):
    """Fiber samples from a trained :class:`~fiber_plugins.priors.ConditionalFiberModel`.

    Examples
    --------
    >>> model = ConditionalFiberModel.from_pretrained("runs/fiber-model")    # doctest: +SKIP
    >>> sampler = ConditionalFiberSampler(model, objective, num_steps=25)
    >>> result = sampler.sample(references=[x_ref], n=64)
    """

    prior: ConditionalFiberModel  # checked in __init__

    name = "conditional"

    config_class = ConditionalConfig

    conditional = True

    def __init__(self, model: ConditionalFiberModel, objective, config=None, **overrides):
        if not isinstance(model, ConditionalFiberModel):
            raise UserTypeError(
                "ConditionalFiberSampler samples a trained ConditionalFiberModel (see "
                f"train_fiber_model), got {type(model).__name__}; for a pretrained unconditional "
                "prior use a guided sampler (NDTMSampler)"
            )
        super().__init__(model, objective, config, **overrides)  # checks the objective

    def run_batch(self, batch: Batch, progress: tqdm | None):
        """Sample the conditional model p(x | y*) for one batch.

        Returns
        -------
        (images (B, C, H, W) in [-1, 1], loss trace (B, T), NaN where not traced).
        """
        cfg, model = self.config, self.prior
        y = model.check_condition(batch.target)
        steps = model.timesteps(cfg.num_steps)
        x = batch.x_T.float()
        alive = batch.alive
        trace = torch.full((x.shape[0], len(steps)), float("nan"), device=x.device)
        with torch.no_grad():
            for step in steps:
                with self.autocast():
                    eps, x0 = model.predict(x, step, cond=y)
                eps, x0 = eps.float(), x0.float()
                if cfg.trace:
                    trace[:, step.index] = self.fiber_loss(x0.clamp(-1, 1), y)
                x = model.update(x0, eps, step)
                batch.fail(
                    alive & ~finite_rows(x), f"non-finite flow state after step {step.index}"
                )
                x = mark_nonfinite(x, alive, x.new_ones(1))
                if progress is not None:
                    progress.update(len(batch.rows))
                    if cfg.trace and (step.index % 5 == 0 or step.index == len(steps) - 1):
                        vals = trace[:, step.index][alive]
                        if vals.numel():
                            progress.set_postfix(fiber_loss=f"{median(vals):.4g}")
        return x, trace

    def _check_gradient_path(self, refs) -> None:
        """Conditional sampling takes no gradient of phi, so any objective will do."""


def check_fiber_model_objective(model: ConditionalFiberModel, objective) -> None:
    """Warn when ``objective`` differs from the one ``model`` was trained with: the width alone
    cannot tell another layer, preprocessing or retrained subject apart. Every sampler that
    takes a conditional fiber model calls this when it is constructed."""
    from .._utils import warn
    from ..priors.conditional import subject_fingerprint

    info = model.info

    def as_stored(d):  # JSON round trip: tuples become lists, as in fiber_model.json
        if d is None:
            return None
        d = json.loads(json.dumps(d, default=str))
        if isinstance(d.get("preprocess"), dict):  # fields added since have their defaults
            try:
                full = Preprocess(**d["preprocess"]).to_dict()
                d["preprocess"] = json.loads(json.dumps(full, default=str))
            except (TypeError, ValueError):
                pass  # compared as stored
        return d

    trained = as_stored(info.get("objective_settings"))
    now = as_stored(objective.describe())
    differs = [k for k in (trained or {}) if k != "name" and trained.get(k) != now.get(k)]
    if differs:
        warn(
            f"the objective differs from the one this fiber model was trained with in "
            f"{differs} (trained: {[trained[k] for k in differs]}, now: "
            f"{[now.get(k) for k in differs]}); its samples are not this objective's fiber"
        )
    fp = info.get("subject_fingerprint")
    if fp and fp != subject_fingerprint(objective):
        warn(
            "the subject's weights differ from those the fiber model was trained with "
            f"(fingerprint {fp}); retrain the fiber model for this subject"
        )
