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
import dataclasses
import math
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._utils import randn_rows, row_generator, warn
from ..errors import RunInterrupted, UserTypeError, UserValueError
from ..images import as_reference_batch
from ..objectives.base import FiberObjective, target_rows, target_to, target_width
from ..priors import acceleration as _acc
from ..priors.conditional import ConditionalFiberModel
from ..priors.prior import DiffusionPrior
from ._common import check_int
from .result import FiberResult, run_fingerprint
from .run_folder import RunFolder, check_out_dir
from .run_folder import _now as _run_folder_now

MAX_AUTO_BATCH = 64
_DOES_NOT_FIT = 2**62  # the peak "memory" of a probe that ran out of memory


class _CudaMemory:
    """Peak-memory counters of one CUDA device, for ``batch_size="auto"``."""

    def __init__(self, device: torch.device, fraction: float = 0.9):
        self.device, self.fraction = device, fraction

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def budget(self) -> int:
        """What may be allocated in all: what is allocated now + a fraction of the free memory."""
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        return torch.cuda.memory_allocated(self.device) + int(self.fraction * free)


def _memory_meter(device: torch.device):
    """A peak-memory meter for ``device``, or None where there is none (the CPU)."""
    return _CudaMemory(device) if device.type == "cuda" else None


def fit_batch_size(
    peak_bytes: Callable[[int], int], budget_bytes: int, max_rows: int, cap: int = MAX_AUTO_BATCH
) -> int:
    """The largest batch whose peak memory fits ``budget_bytes``, from two probe runs.

    ``peak_bytes(b)`` runs the sampler's most memory-hungry unit at batch b and returns the peak
    memory in bytes (weights included). Peak memory is modelled as ``static + b * per_row``, fitted
    from b = 1 and b = 2; the answer is clamped to [1, min(max_rows, cap)]. Allocator rounding
    makes the model approximate, so the engine still halves the batch on out-of-memory.
    """
    limit = max(1, min(max_rows, cap))
    p1 = int(peak_bytes(1))
    if limit == 1 or p1 >= budget_bytes:
        return 1
    p2 = int(peak_bytes(2))
    per_row = max(p2 - p1, 1)
    static = p1 - per_row
    return int(max(1, min(limit, (budget_bytes - static) // per_row)))


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

    def step_noise(self, like: torch.Tensor) -> torch.Tensor:
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


class FiberSampler(abc.ABC):
    """Base class: run an algorithm over references x samples and collect a :class:`FiberResult`."""

    name = "base"

    config_class: type | None = None  # the algorithm's config dataclass (to_dict / from_dict)

    conditional = False  # whether the sampler takes a trained ConditionalFiberModel

    def __init__(self, prior: DiffusionPrior, objective: FiberObjective, config=None, **overrides):
        """``config`` (default: ``config_class()``), with ``overrides`` as keyword settings."""
        if self.config_class is not None:
            config = config or self.config_class()
            if overrides:
                config = self.config_class.from_dict({**config.to_dict(), **overrides})
        elif overrides:
            raise UserTypeError(f"{type(self).__name__} takes no settings {sorted(overrides)}")
        if not isinstance(prior, DiffusionPrior):
            raise UserTypeError(f"prior must be a DiffusionPrior, got {type(prior).__name__}")
        if isinstance(prior, ConditionalFiberModel) and not self.conditional:
            raise UserTypeError(
                f"{type(self).__name__} needs an unconditional prior; a trained "
                "ConditionalFiberModel is sampled with ConditionalFiberSampler"
            )
        if not isinstance(objective, FiberObjective):
            raise UserTypeError(f"objective must be a FiberObjective, got {type(objective).__name__}")
        self.prior = prior
        self.objective = objective
        self.config = config

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def run_batch(self, batch: Batch, progress: tqdm | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (final images in [-1, 1] (B, C, H, W), loss trace (B, T))."""

    def num_trace_steps(self) -> int:
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
        return self.prior.device

    def _half_precision(self) -> bool:
        return self.prior.dtype in (torch.bfloat16, torch.float16) or bool(
            getattr(self.config, "autocast", False)
        )

    def autocast(self):
        """Autocast of the networks: bf16 when ``config.autocast`` is set (CUDA, or CPU for
        tests), and always in the prior's weight dtype when its weights are half precision
        (``prior.accelerate(weights="bf16")``), so normalisations and softmax stay fp32."""
        dtype = self.prior.dtype
        if dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.device.type, dtype=dtype)
        if getattr(self.config, "autocast", False):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fiber_loss(self, images: torch.Tensor, target) -> torch.Tensor:
        """d(phi(images), y*) per sample in fp32."""
        with self.autocast():
            feats = self.objective.features(images)
        feats = tuple(f.float() for f in feats) if isinstance(feats, tuple) else feats.float()
        return self.objective.distance_between(feats, target).float()

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
        self._check_devices()
        if self.device.type == "cpu" and self._half_precision():
            warn(
                "bf16/fp16 networks on the CPU: CPUs without native bf16 kernels run them many "
                "times slower than fp32 (see docs/performance.md); use fp32 on the CPU and keep "
                "half precision for the GPU"
            )
        checkpointing_before = prior.acceleration.get("checkpointing", False)
        try:
            with _sigterm_as_interrupt(out is not None):
                return self._sample(
                    references, targets, n, seed, batch_size, progress, start, out, mode
                )
        finally:
            if prior.acceleration.get("checkpointing") == "auto":  # turned on for this call only
                _acc.set_checkpointing(prior, bool(checkpointing_before))
                prior.acceleration = {**prior.acceleration, "checkpointing": checkpointing_before}

    def _targets(self, references, targets):
        """(references (R, C, H, W) in [0, 1] or None, targets on the device, fp32)."""
        prior, device = self.prior, self.device
        refs = None
        if references is not None:
            refs = as_reference_batch(references, prior.image_size, prior.image_channels)
            try:
                with torch.no_grad(), self.autocast():
                    y = self.objective.target(refs.to(device) * 2 - 1)
            except RuntimeError as err:
                _raise_if_shape_mismatch(err, prior)
                raise
            y = tuple(t.float() for t in y) if isinstance(y, tuple) else y.float()
        else:
            with torch.no_grad():
                probe = torch.zeros(1, prior.image_channels, *prior.image_size, device=device)
                try:
                    width = target_width(self.objective.features(probe))
                except RuntimeError as err:
                    _raise_if_shape_mismatch(err, prior)
                    raise
            y = self.objective.check_target(targets, width)
        return refs, target_to(y, device)

    def _config_record(self, seed, batch_size) -> dict:
        return {
            "sampler": self.name,
            "settings": self.config.to_dict(),
            "objective": self.objective.describe(),
            "prior": repr(self.prior),
            "seed": seed,
            "batch_size": batch_size,
            "device": str(self.device),
            "acceleration": dict(self.prior.acceleration),
        }

    def _sample(
        self, references, targets, n, seed, batch_size, progress, start, out, mode
    ) -> FiberResult:
        prior, device = self.prior, self.device
        with self.objective.attached():
            refs, y = self._targets(references, targets)
            self._check_gradient_path(refs)
            y_rows = y if isinstance(y, tuple) else (y,)
            num_refs = y_rows[0].shape[0]
            if getattr(self.config, "target_mode", "static") == "reapprox" and refs is None:
                raise UserValueError(
                    "target_mode='reapprox' needs reference images, not explicit targets"
                )
            ref_latents = None
            if refs is not None and getattr(self.config, "target_mode", "static") == "reapprox":
                with torch.no_grad():
                    ref_latents = prior.encode(refs.to(device, prior.dtype) * 2 - 1).float()

            T = self.num_trace_steps()
            images = torch.zeros(num_refs, n, prior.image_channels, *prior.image_size)
            losses = torch.full((num_refs, n), math.nan)
            traces = torch.full((num_refs, n, T), math.nan)
            failed = torch.zeros(num_refs, n, dtype=torch.bool)
            reasons: list[list[str | None]] = [[None] * n for _ in range(num_refs)]
            # a reference whose target is not finite cannot be sampled: its rows fail at once
            # (asked through the objective's own distance: d(y*, y*) is 0 for a sound target;
            # objectives may mask entries of y* with NaN, as Captum's per-example targets do)
            with torch.no_grad():
                bad_target = ~torch.isfinite(self.objective.distance_between(y, y)).cpu()
            folder = None
            if out is not None:
                y_cpu = tuple(t.cpu() for t in y_rows)
                cfg = self._config_record(seed, batch_size)
                folder = RunFolder.start(
                    out,
                    run_fingerprint(cfg, n, refs, y_cpu),
                    num_refs,
                    n,
                    refs,
                    y_cpu,
                    mode=mode,
                    extra={"config": cfg, "targets_tuple": isinstance(y, tuple)},
                )
                for r, m, img, tr, loss, bad, why in folder.rows():
                    images[r, m], traces[r, m], losses[r, m], failed[r, m] = img, tr, loss, bad
                    reasons[r][m] = why
            done_rows = folder.done() if folder is not None else set()
            rows = []
            for r in range(num_refs):
                for m in range(n):
                    if (r, m) in done_rows:
                        continue
                    if bad_target[r]:
                        failed[r, m] = True
                        reasons[r][m] = (
                            "the target phi(reference) holds NaN/inf (the subject's output at "
                            "this reference is not finite)"
                        )
                    else:
                        rows.append((r, m))
            if folder is not None and bad_target.any():
                skipped = [(r, m) for r in range(num_refs) for m in range(n)
                           if bad_target[r] and (r, m) not in done_rows]
                if skipped:
                    folder.commit(
                        skipped,
                        images[[r for r, _ in skipped], [m for _, m in skipped]],
                        losses[[r for r, _ in skipped], [m for _, m in skipped]],
                        traces[[r for r, _ in skipped], [m for _, m in skipped]],
                        [True] * len(skipped),
                        [reasons[r][m] for r, m in skipped],
                    )
            bs = self._batch_size(batch_size, rows, y, ref_latents, seed)
            bar = tqdm(
                total=len(rows) * T, desc=self.name, unit="step", disable=not progress, leave=False
            )
            done, first_bs = 0, bs
            try:
                while done < len(rows):
                    chunk = rows[done : done + bs]
                    bar_before = bar.n
                    try:
                        out_rows = self._run_rows(chunk, y, ref_latents, seed, bar)
                    except torch.OutOfMemoryError as err:
                        if len(chunk) == 1 and not self._may_checkpoint():
                            raise torch.OutOfMemoryError(_oom_advice(err, prior)) from err
                        out_rows = None
                    if out_rows is None:
                        # out of memory; handled here, after the except block, whose traceback
                        # holds the failed batch's tensors until it ends
                        if len(chunk) > 1:
                            bs = max(1, len(chunk) // 2)
                            bar.write(f"out of memory: retrying with batch size {bs}")
                        else:
                            self._checkpoint_for_memory("out of memory with one row (batch size 1)")
                            bs = first_bs  # with checkpointing a larger batch may fit again
                        bar.n = bar_before  # the retry counts the rows' steps again
                        bar.refresh()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    img, loss, trace, bad, why = out_rows
                    img[bad] = 0.0
                    loss[bad] = math.nan
                    for k, (r, m) in enumerate(chunk):
                        images[r, m], losses[r, m], traces[r, m], failed[r, m] = (
                            img[k],
                            loss[k],
                            trace[k],
                            bad[k],
                        )
                        reasons[r][m] = why[k] if bool(bad[k]) else None
                    if folder is not None:
                        folder.commit(chunk, img, loss, trace, bad, why)
                    done += len(chunk)
            except KeyboardInterrupt:
                if folder is None:
                    raise
                total = num_refs * n
                have = len(folder.done())
                folder.mark("interrupted", interrupted=_run_folder_now())
                raise RunInterrupted(
                    f"interrupted: {have} of {total} rows are written to {str(folder.path)!r}; "
                    "finish the run with --resume (sample(..., out=..., resume=True))",
                    run_dir=folder.path,
                    done=have,
                    total=total,
                ) from None
            finally:
                bar.close()
        cfg = self._config_record(seed, bs)
        result = FiberResult(
            images=images,
            references=refs,
            fiber_loss=losses,
            loss_trace=traces,
            failed=failed,
            config=cfg,
            wall_time=time.perf_counter() - start,
            targets=tuple(t.cpu() for t in y) if isinstance(y, tuple) else y.cpu(),
            reasons=reasons,
        )
        if folder is not None:
            if mode == "resume":
                result.wall_time += float(folder.manifest.get("wall_time_s", 0.0))
            result.write_to(folder)
        return result

    def _batch_size(self, batch_size, rows, y, ref_latents, seed) -> int:
        if batch_size == "auto":
            return self._auto_batch_size(rows, y, ref_latents, seed) if rows else 1
        if batch_size is None:
            return max(1, min(len(rows), 16))
        if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
            return batch_size
        raise UserValueError(
            f"batch_size must be a positive int, 'auto' or None, got {batch_size!r}"
        )

    def _auto_batch_size(self, rows, y, ref_latents, seed) -> int:
        meter = _memory_meter(self.device)
        if meter is None:
            return min(len(rows), 16)
        probe = type(self)(self.prior, self.objective, self.probe_config())

        peaks: dict[int, int] = {}

        def peak_bytes(b: int) -> int:
            if b not in peaks:
                meter.reset()
                chunk = [rows[i % len(rows)] for i in range(b)]
                try:
                    probe._run_rows(chunk, y, ref_latents, seed, None)
                    peaks[b] = meter.peak()
                except torch.OutOfMemoryError:
                    peaks[b] = _DOES_NOT_FIT
            return peaks[b]

        budget = meter.budget()
        if peak_bytes(1) >= budget and self._may_checkpoint():
            self._checkpoint_for_memory(
                f"one row needs more than the {budget / 2**30:.1f} GiB available"
            )
            peaks.clear()
        return fit_batch_size(peak_bytes, budget, len(rows))

    def _may_checkpoint(self) -> bool:
        """Whether the engine can still turn on the prior's gradient checkpointing."""
        prior = self.prior
        return not prior.acceleration.get("checkpointing") and _acc.supports_checkpointing(prior)

    def _checkpoint_for_memory(self, why: str) -> None:
        """Turn on the prior's gradient checkpointing for this call (``_may_checkpoint()`` must
        hold). Only memory decides: it costs about one extra forward per guided step."""
        prior = self.prior
        _acc.set_checkpointing(prior, True)
        prior.acceleration = {**prior.acceleration, "checkpointing": "auto"}
        warn(
            f"{why}: gradient checkpointing of the prior is on for this call (less memory, "
            "about one extra forward per guided step); prior.accelerate(checkpointing=True) "
            "keeps it on"
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_gradient_path(self, refs: torch.Tensor | None) -> None:
        """Refuse an objective whose features do not depend on the image (guidance would be a
        no-op): one subject forward + backward on a reference (or a grey probe)."""
        prior = self.prior
        if refs is not None:
            x = refs[:1].to(self.device) * 2 - 1
        else:
            x = torch.zeros(1, prior.image_channels, *prior.image_size, device=self.device)
        x = (
            x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)
        ).detach()
        x.requires_grad_(True)
        with torch.enable_grad():
            feats = self.objective.features(x)
            feats = feats if isinstance(feats, tuple) else (feats,)
            w = torch.Generator().manual_seed(1)
            probe = sum((f * torch.randn(f.shape, generator=w).to(f)).sum() for f in feats)
            if not probe.requires_grad:
                grad = None
            else:
                (grad,) = torch.autograd.grad(probe, x, allow_unused=True)
        if grad is not None and not bool(grad.abs().sum() > 0) and refs is not None:
            if all(bool((f == 0).all()) for f in feats):
                raise UserValueError(
                    f"phi of {self.objective.name} is zero at the reference and has no gradient "
                    "there: the unit is inactive for this image (a ReLU channel or SAE feature "
                    "that does not fire); pick a reference that activates it, or target the "
                    "pre-activation (e.g. the layer before the ReLU, pre_activation=True for SAEs)"
                )
        if grad is None or not bool(grad.abs().sum() > 0):
            raise UserValueError(
                f"phi of {self.objective.name} does not depend on the image: no gradient reaches "
                "the input, so guidance cannot change anything; pick a layer on the path from the "
                "input (and check the model for detach()/no_grad)"
            )

    def _check_devices(self) -> None:
        for _, obj in self.objective.terms():
            model = obj.model
            p = next(model.parameters(), None) if model is not None else None
            if p is not None and p.device != self.device:
                raise UserValueError(
                    f"the subject {type(model).__name__} is on {p.device} but the prior on "
                    f"{self.device}; move one of them (model.to('{self.device}') or "
                    f"prior.to('{p.device}'))"
                )

    def _run_rows(self, chunk, y, ref_latents, seed, bar):
        prior, device = self.prior, self.device
        gens = [row_generator(seed, r, m) for r, m in chunk]
        x_T = randn_rows(gens, prior.latent_shape, device)
        idx = torch.tensor([r for r, _ in chunk], device=device)
        batch = Batch(
            rows=chunk,
            generators=gens,
            x_T=x_T,
            target=target_rows(y, idx),
            ref_latent=ref_latents[idx] if ref_latents is not None else None,
            alive=torch.ones(len(chunk), dtype=torch.bool, device=device),
        )
        img, trace = self.run_batch(batch, bar)
        with torch.no_grad():
            img = img.float().clamp(-1, 1)
            loss = self.fiber_loss(img, batch.target)
        batch.fail(~batch.alive, "non-finite value during sampling")  # no cause recorded
        batch.fail(~torch.isfinite(loss), "the fiber loss of the final sample is not finite")
        bad = ~batch.alive
        why = batch.reasons()
        return ((img.cpu() + 1) / 2), loss.cpu(), trace.cpu(), bad.cpu(), why


@contextlib.contextmanager
def _sigterm_as_interrupt(active: bool):
    """While a run writes to a folder, SIGTERM (a scheduler's stop, ``kill``) stops it like
    Ctrl-C, so the finished rows are kept; the previous handler is restored afterwards. Only
    in the main thread (signal handlers cannot be set elsewhere)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not settable here (embedded interpreters)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_SHAPE_WORDS = re.compile(
    r"shape|size|dimension|channels|mat1|expected input|must match", re.IGNORECASE
)


def _raise_if_shape_mismatch(err: RuntimeError, prior: DiffusionPrior) -> None:
    """The subject's first forward on prior-sized images failed for its input shape: say so in
    one line with the fix (a user mistake, not a bug)."""
    first = (str(err).strip().splitlines() or [""])[0]
    if _SHAPE_WORDS.search(first):
        c, (h, w) = prior.image_channels, prior.image_size
        raise UserValueError(
            f"the subject cannot take the prior's {c}x{h}x{w} images ({first[:200]}); give the "
            "objective a Preprocess that resizes to the subject's input size "
            "(preprocess=Preprocess(size=...)) or use a prior of that size"
        ) from err


def _oom_advice(err: BaseException, prior: DiffusionPrior) -> str:
    ckpt = prior.acceleration.get("checkpointing")
    state = (
        "with gradient checkpointing on"
        if ckpt
        else "gradient checkpointing is not available for this denoiser"
    )
    tips = ["free GPU memory held elsewhere", "use a smaller prior or subject input size"]
    if prior.dtype == torch.float32:
        tips.insert(0, "cast the prior's weights once (prior.accelerate(weights='bf16'))")
    return f"{err}\n-> out of memory with one row (batch size 1; {state}). Try: " + "; ".join(tips)


def mark_nonfinite(x: torch.Tensor, alive: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
    """Clear ``alive`` for rows where x or any per-row value is non-finite; zero those rows of x."""
    ok = torch.isfinite(x).flatten(1).all(1)
    for v in values:
        ok = ok & torch.isfinite(v)
    alive &= ok
    return torch.where(alive.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))
