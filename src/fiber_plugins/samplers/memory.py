"""Memory of one sampling call: the batch size, ``batch_size="auto"``, out-of-memory back-off.

The engine asks :class:`MemoryPolicy` three things: how many rows to run at once, what to do when
a batch runs out of CUDA memory (halve it; with one row, turn on the prior's gradient
checkpointing for this call, "only when memory needs it"), and what to tell the user when
nothing helps. Checkpointing is switched through the prior's scoped
:meth:`~fiber_plugins.DiffusionPrior.checkpointing`, entered on the call's exit stack, so the
prior's own setting is back when the call ends, however it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .._utils import warn
from ..errors import UserValueError

MAX_AUTO_BATCH = 64
DEFAULT_MAX_BATCH = 16
_DOES_NOT_FIT = 2**62  # the peak "memory" of a probe that ran out of memory


class CudaMemory:
    """Peak-memory counters of one CUDA device, for ``batch_size="auto"``."""

    def __init__(self, device: torch.device, fraction: float = 0.9):
        self.device, self.fraction = device, fraction

    def reset(self) -> None:
        """Synchronise, free the cache and reset the peak-memory counter of the device."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        """Peak bytes allocated on the device since :meth:`reset`."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def budget(self) -> int:
        """What may be allocated in all: what is allocated now + a fraction of the free memory."""
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        return torch.cuda.memory_allocated(self.device) + int(self.fraction * free)


def memory_meter(device: torch.device):
    """A peak-memory meter for ``device``, or None where there is none (the CPU)."""
    return CudaMemory(device) if device.type == "cuda" else None


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


def oom_advice(err: BaseException, prior) -> str:
    """The message of an out-of-memory error that no back-off can fix."""
    ckpt = prior.acceleration.checkpointing
    state = (
        "with gradient checkpointing on"
        if ckpt
        else "gradient checkpointing is not available for this denoiser"
    )
    tips = ["free GPU memory held elsewhere", "use a smaller prior or subject input size"]
    if prior.dtype == torch.float32:
        tips.insert(0, "cast the prior's weights once (prior.accelerate(weights='bf16'))")
    return f"{err}\n-> out of memory with one row (batch size 1; {state}). Try: " + "; ".join(tips)


class MemoryPolicy:
    """Batch size and out-of-memory handling of one ``sample`` call on ``prior``.

    ``scope`` is the call's exit stack: checkpointing turned on here is undone when it closes.
    """

    def __init__(self, prior, scope: contextlib.ExitStack):
        self.prior, self.scope = prior, scope

    @property
    def device(self) -> torch.device:
        """The prior's device (the memory that is fitted)."""
        return self.prior.device

    def batch_size(self, batch_size, num_rows: int, run_probe: Callable[[int], None]) -> int:
        """The first batch size: an int as given, ``None`` (all rows, at most 16) or ``"auto"``
        (fit to the free CUDA memory with ``run_probe(b)``, which runs b rows of the sampler's
        most memory-hungry unit; all rows, at most 16, on the CPU)."""
        if batch_size == "auto":
            return self.auto_batch_size(num_rows, run_probe) if num_rows else 1
        if batch_size is None:
            return max(1, min(num_rows, DEFAULT_MAX_BATCH))
        if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
            return batch_size
        raise UserValueError(
            f"batch_size must be a positive int, 'auto' or None, got {batch_size!r}"
        )

    def auto_batch_size(self, num_rows: int, run_probe: Callable[[int], None]) -> int:
        """The largest batch whose measured peak (probe runs at b = 1 and 2, extrapolated
        linearly) fits the free memory, at most ``num_rows`` and 64; all rows, at most 16, where
        memory cannot be measured (the CPU).
        """
        meter = memory_meter(self.device)
        if meter is None:
            return min(num_rows, DEFAULT_MAX_BATCH)
        peaks: dict[int, int] = {}

        def peak_bytes(b: int) -> int:
            if b not in peaks:
                meter.reset()
                try:
                    run_probe(b)
                    peaks[b] = meter.peak()
                except torch.OutOfMemoryError:
                    peaks[b] = _DOES_NOT_FIT
            return peaks[b]

        budget = meter.budget()
        if peak_bytes(1) >= budget and self.may_checkpoint():
            self.checkpoint(f"one row needs more than the {budget / 2**30:.1f} GiB available")
            peaks.clear()
        return fit_batch_size(peak_bytes, budget, num_rows)

    def may_checkpoint(self) -> bool:
        """Whether gradient checkpointing of the prior can still be turned on."""
        return not self.prior.acceleration.checkpointing and self.prior.supports_checkpointing()

    def checkpoint(self, why: str) -> None:
        """Turn on the prior's gradient checkpointing for the rest of this call
        (``may_checkpoint()`` must hold). Only memory decides: it costs about one extra forward
        per guided step."""
        self.scope.enter_context(self.prior.checkpointing(True, auto=True))
        warn(
            f"{why}: gradient checkpointing of the prior is on for this call (less memory, "
            "about one extra forward per guided step); prior.accelerate(checkpointing=True) "
            "keeps it on"
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def after_oom(self, rows: int, first_batch: int, say) -> int:
        """The batch size to retry with after ``rows`` rows ran out of memory (``say`` prints a
        line). Called after the ``except`` block, so the failed batch's tensors are freed;
        with one row, only when :meth:`may_checkpoint` (else :func:`oom_advice` is raised)."""
        if rows > 1:
            size = max(1, rows // 2)
            say(f"out of memory: retrying with batch size {size}")
        else:
            self.checkpoint("out of memory with one row (batch size 1)")
            size = first_batch  # with checkpointing a larger batch may fit again
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return size

    def run_in_batches(self, rows, batch_size: int, run, put, bar) -> int:
        """Run ``rows`` in batches of ``batch_size``: ``run(chunk)`` samples a chunk,
        ``put(chunk, *out)`` keeps its output. A batch that runs out of CUDA memory is retried
        smaller (:meth:`after_oom`); finished batches are never redone. Returns the last batch
        size."""
        done, size = 0, batch_size
        while done < len(rows):
            chunk = rows[done : done + size]
            bar_before = bar.n
            try:
                out = run(chunk)
            except torch.OutOfMemoryError as err:
                if len(chunk) == 1 and not self.may_checkpoint():
                    raise torch.OutOfMemoryError(oom_advice(err, self.prior)) from err
                out = None
            if out is None:
                # out of memory; handled here, after the except block, whose traceback holds
                # the failed batch's tensors until it ends
                size = self.after_oom(len(chunk), batch_size, bar.write)
                bar.n = bar_before  # the retry counts the rows' steps again
                bar.refresh()
                continue
            put(chunk, *out)
            done += len(chunk)
        return size
