"""The shared sampling engine: references -> targets, batching, seeds, progress, failures.

Every sampler subclasses :class:`FiberSampler` and implements only :meth:`FiberSampler.run_batch`
(its algorithm on one batch of rows). The engine owns everything else, so all samplers share the
same result type, batching of many references x many samples, per-row seeding (results do not
depend on the batch size), progress bars, non-finite handling and out-of-memory back-off
(halve the batch; at batch 1, turn on the prior's gradient checkpointing for the run).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._utils import randn_rows, row_generator, to_model_range, to_unit_range
from ..errors import UserTypeError, UserValueError
from ..objectives.base import FiberObjective
from ..objectives.targets import Targets
from ..objectives.units import UnitSet
from ..priors.conditional import as_fiber_model as fiber_model
from ..priors.prior import DiffusionPrior
from ._common import check_int
from .batch import Batch
from .memory import MemoryPolicy
from .precision import network_autocast, warn_half_on_cpu
from .preflight import check_devices, check_prior, reference_targets, unit_rows
from .result import FiberResult, call_record
from .rows import RowStore, sigterm_as_interrupt
from .run_folder import check_out_dir


class FiberSampler(abc.ABC):
    """Base class: run an algorithm over references x samples and collect a :class:`FiberResult`."""

    name = "base"

    config_class: type[Any] | None = None  # the algorithm's config dataclass (to_dict / from_dict)

    # whether the sampler takes a trained ConditionalFiberModel as its prior: every denoiser call
    # is then conditioned on each row's own target y* (see predict)
    conditional = False

    def __init__(self, prior: DiffusionPrior, objective: FiberObjective, config=None, **overrides):
        """``config`` (default: ``config_class()``), with ``overrides`` as keyword settings."""
        if self.config_class is not None:
            config = config or self.config_class()
            if overrides:
                config = self.config_class.from_dict({**config.to_dict(), **overrides})
        elif overrides:
            raise UserTypeError(f"{type(self).__name__} takes no settings {sorted(overrides)}")
        check_prior(self, prior, objective)
        self.prior = prior
        self.objective = objective
        self.config = config

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def run_batch(self, batch: Batch, progress: tqdm | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (final images in [-1, 1] (B, C, H, W), loss trace (B, T))."""

    def initial_state(self, rows: list[tuple[int, int]], generators) -> torch.Tensor:
        """The (B, *latent) state each row starts from: standard normal noise drawn from the
        row's own generator (so a row's noise does not depend on its batch). Refinement starts
        from given images instead."""
        return randn_rows(generators, self.prior.latent_shape, self.device)

    def annotate(self, result: FiberResult) -> None:
        """Add the algorithm's own entries to ``result.config`` before the run is written
        (default: none)."""
        return None

    def num_trace_steps(self) -> int:
        """T, the length of each row's loss trace (B, T)."""
        return self.config.num_steps

    def probe_config(self):
        """Settings of the short run that measures memory for ``batch_size="auto"``: one
        sampling step (samplers override this when that does not reach their peak)."""
        if hasattr(self.config, "num_steps"):
            return dataclasses.replace(self.config, num_steps=1)
        return self.config

    # ------------------------------------------------------------------ shared helpers
    @property
    def device(self) -> torch.device:
        """The device the prior (and so the sampling state) is on."""
        return self.prior.device

    def predict(self, x: torch.Tensor, step, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) of the prior at (x_t, step) for the rows of ``batch``. A conditional
        fiber model is conditioned row by row on ``batch.condition`` (each row's own static
        target y*, which stays with the row through batching, out-of-memory back-off and
        resume); an unconditional prior takes no condition."""
        model = fiber_model(self.prior)
        if model is not None:
            return model.predict(x, step, cond=batch.condition)
        return self.prior.predict(x, step)

    def autocast(self):
        """The networks' autocast for this call (:func:`~.precision.network_autocast`)."""
        return network_autocast(self.prior, bool(getattr(self.config, "autocast", False)))

    def fiber_loss(self, images: torch.Tensor, target) -> torch.Tensor:
        """d(phi(images), y*) per sample in fp32: images (B, C, H, W) in [-1, 1], target a
        :class:`~fiber_plugins.objectives.targets.Targets` (or the objective's raw value) of B
        rows; returns (B,)."""
        with self.autocast():
            feats = Targets.of(self.objective.features(images)).float()
        return self.objective.distance_between(feats.value, Targets.of(target).value).float()

    # ------------------------------------------------------------------ the public call
    def sample(
        self,
        references=None,
        targets=None,
        n: int = 4,
        seed: int = 0,
        batch_size: int | str | None = None,
        progress: bool = True,
        out: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> FiberResult:
        """Sample ``n`` fiber samples for each reference (or explicit target).

        Parameters
        ----------
        references:
            Image paths, PIL images, numpy arrays, a (R, C, H, W) / (C, H, W) tensor in [0, 1];
            resized to the prior's image size. The target is y* = phi(reference) at that size.
        targets:
            Instead of references: explicit targets, (K,) or (R, K) (a tuple for summed objectives).
        n: samples per reference.
        seed: base seed; each (reference, sample) row has its own generator.
        batch_size: rows per batch (default: all rows, at most 16). ``"auto"`` measures peak GPU
            memory on two short probe runs (batch 1 and 2) and takes the largest batch that fits
            90% of the free memory (at most 64; on the CPU: all rows, at most 16). Whatever the
            batch size, it is halved and the batch retried on CUDA out-of-memory; finished
            samples are kept. When even one row does not fit, the prior's gradient
            checkpointing is turned on for this call (with a warning;
            ``config["acceleration"]["checkpointing"] == "auto"`` in the result) and switched
            off again afterwards.
        progress: show a tqdm bar with the running median fiber loss.
        out: a run folder (see :mod:`fiber_plugins.samplers.run_folder`). Each finished batch is
            written to it at once, so an interrupt (Ctrl-C, SIGTERM) or a crash loses only the
            batch in flight: the call raises :class:`~fiber_plugins.errors.RunInterrupted` after
            recording the run as interrupted. The folder is checked before any work: it must be
            writable and hold no earlier run, unless ``resume`` or ``overwrite``.
        resume: finish the run in ``out``: only the rows it lacks are sampled, with the same
            seeds, so the result equals an uninterrupted run's (same batch size; see the docs on
            determinism). The call must repeat the run's settings, references and seed.
        overwrite: remove the whole earlier run in ``out`` first.

        Returns
        -------
        FiberResult with images (R, n, C, H, W), fiber_loss (R, n), loss_trace (R, n, T).
        """
        if (references is None) == (targets is None):
            raise UserValueError("give either references= or targets=, not both or neither")
        check_int("n", n, 1)
        check_int("seed", seed, 0)
        mode = None
        if out is not None:
            mode = check_out_dir(out, overwrite=bool(overwrite), resume=bool(resume))
        elif resume or overwrite:
            raise UserValueError("resume=True / overwrite=True need a run folder: out=...")
        start = time.perf_counter()
        prior = self.prior
        check_devices(self.objective, self.device)
        warn_half_on_cpu(prior, bool(getattr(self.config, "autocast", False)))
        unbound = self.objective
        if isinstance(unbound, UnitSet):  # many units: one row per (unit, reference)
            mode_t = getattr(self.config, "target_mode", "static")
            self.objective, references, targets = unit_rows(unbound, references, targets, mode_t)
        try:
            with contextlib.ExitStack() as scope, sigterm_as_interrupt(out is not None):
                memory = MemoryPolicy(prior, scope)  # checkpointing it turns on ends with the call
                return self._sample(
                    references, targets, n, seed, batch_size, progress, start, out, mode, memory
                )
        finally:
            self.objective = unbound

    def _sample(
        self, references, targets, n, seed, batch_size, progress, start, out, mode, memory
    ) -> FiberResult:
        prior, device = self.prior, self.device
        with self.objective.attached():
            refs, y = reference_targets(self, references, targets)
            num_refs = y.num_rows
            if getattr(self.config, "target_mode", "static") == "reapprox" and refs is None:
                raise UserValueError(
                    "target_mode='reapprox' needs reference images, not explicit targets"
                )
            ref_latents = None
            if refs is not None and getattr(self.config, "target_mode", "static") == "reapprox":
                with torch.no_grad():
                    ref_latents = prior.encode(to_model_range(refs.to(device, prior.dtype))).float()

            # a reference whose target is not finite cannot be sampled: its rows fail at once
            # (asked through the objective's own distance: d(y*, y*) is 0 for a sound target;
            # objectives may mask entries of y* with NaN, as Captum's per-example targets do)
            with torch.no_grad():
                bad_target = ~torch.isfinite(self.objective.distance_between(y.value, y.value))
            store = RowStore.for_call(
                num_refs,
                n,
                (prior.image_channels, *prior.image_size),
                self.num_trace_steps(),
                out=out,
                mode=mode,
                config=call_record(self, seed, batch_size),
                references=refs,
                targets=y.cpu(),
            )
            rows = store.pending(bad_target.cpu())
            # for batch_size="auto": the most memory-hungry unit of this sampler, on b rows
            probe = copy.copy(self)
            probe.config = self.probe_config()
            bs = memory.batch_size(
                batch_size,
                len(rows),
                lambda b: probe._run_rows(
                    [rows[i % len(rows)] for i in range(b)], y, ref_latents, seed, None
                ),
            )
            bar = tqdm(
                total=len(rows) * self.num_trace_steps(),
                desc=self.name,
                unit="step",
                disable=not progress,
                leave=False,
            )
            try:
                bs = memory.run_in_batches(
                    rows,
                    bs,
                    lambda chunk: self._run_rows(chunk, y, ref_latents, seed, bar),
                    store.put,
                    bar,
                )
            except KeyboardInterrupt:
                if store.folder is None:
                    raise
                raise store.interrupted() from None
            finally:
                bar.close()
        cfg = call_record(self, seed, bs)
        result = FiberResult(
            images=store.images,
            references=refs,
            fiber_loss=store.losses,
            loss_trace=store.traces,
            failed=store.failed,
            config=cfg,
            wall_time=time.perf_counter() - start,
            targets=y.cpu().value,
            reasons=store.reasons,
        )
        self.annotate(result)
        if store.folder is not None:
            if mode == "resume":
                result.wall_time += float(store.folder.manifest.get("wall_time_s", 0.0))
            result.write_to(store.folder)
        return result

    def _run_rows(self, chunk, y, ref_latents, seed, bar):
        gens = [row_generator(seed, self.objective.seed_row(r), m) for r, m in chunk]
        batch = Batch.for_rows(chunk, gens, self.initial_state(chunk, gens), y, ref_latents)
        img, trace = self.run_batch(batch, bar)
        with torch.no_grad():
            img = img.float().clamp(-1, 1)
            loss = self.fiber_loss(img, batch.target)
        batch.fail(~batch.alive, "non-finite value during sampling")  # no cause recorded
        batch.fail(~torch.isfinite(loss), "the fiber loss of the final sample is not finite")
        bad = ~batch.alive
        why = batch.reasons()
        return to_unit_range(img.cpu()), loss.cpu(), trace.cpu(), bad.cpu(), why
