"""Where finished rows go: the call's result arrays and, with ``out=``, the run folder; and what
an interrupt (SIGINT, SIGTERM) does to them."""

from __future__ import annotations

import contextlib
import math
import signal
import threading

import torch

from ..errors import RunInterrupted
from .run_folder import RunFolder
from .run_folder import _now as _run_folder_now

TARGET_NOT_FINITE = (
    "the target phi(reference) holds NaN/inf (the subject's output at this reference is not finite)"
)


class RowStore:
    """The (R, n) rows of one call: images (R, n, C, H, W), fiber losses, loss traces (R, n, T),
    failure flags and reasons; every batch put here is also committed to ``folder`` (when the
    call writes a run folder), and a resumed run's finished rows are read back from it."""

    def __init__(self, num_refs: int, n: int, image_shape, T: int, folder: RunFolder | None):
        self.num_refs, self.n, self.folder = num_refs, n, folder
        self.images = torch.zeros(num_refs, n, *image_shape)
        self.losses = torch.full((num_refs, n), math.nan)
        self.traces = torch.full((num_refs, n, T), math.nan)
        self.failed = torch.zeros(num_refs, n, dtype=torch.bool)
        self.reasons: list[list[str | None]] = [[None] * n for _ in range(num_refs)]
        self.done: set[tuple[int, int]] = set()
        if folder is not None:
            for r, m, img, tr, loss, bad, why in folder.rows():
                self._set(r, m, img, loss, tr, bad, why)
            self.done = folder.done()

    @classmethod
    def for_call(
        cls, num_refs, n, image_shape, T, *, out, mode, config, references, targets
    ) -> RowStore:
        """The store of one ``sample`` call; with ``out``, its run folder is started (or, with
        ``mode="resume"``, reopened after checking that the call repeats the run)."""
        folder = None
        if out is not None:
            from .result import run_fingerprint

            folder = RunFolder.start(
                out,
                run_fingerprint(config, n, references, targets.parts),
                num_refs,
                n,
                references,
                targets.parts,
                mode=mode,
                extra={"config": config, "targets_tuple": targets.summed},
                row_units=row_unit_labels(config),
            )
        return cls(num_refs, n, image_shape, T, folder)

    def _set(self, r, m, img, loss, trace, bad, why) -> None:
        self.images[r, m], self.losses[r, m], self.traces[r, m] = img, loss, trace
        self.failed[r, m] = bool(bad)
        self.reasons[r][m] = why if bool(bad) else None

    def pending(self, bad_reference: torch.Tensor) -> list[tuple[int, int]]:
        """The rows still to sample, reference-major; rows of a reference whose target is not
        finite are failed (and committed) at once instead."""
        rows: list[tuple[int, int]] = []
        skipped: list[tuple[int, int]] = []
        for r in range(self.num_refs):
            for m in range(self.n):
                if (r, m) in self.done:
                    continue
                (skipped if bool(bad_reference[r]) else rows).append((r, m))
        if skipped:
            k = len(skipped)
            self.put(
                skipped,
                torch.zeros(k, *self.images.shape[2:]),
                torch.full((k,), math.nan),
                torch.full((k, self.traces.shape[-1]), math.nan),
                torch.ones(k, dtype=torch.bool),
                [TARGET_NOT_FINITE] * k,
            )
        return rows

    def put(self, rows, images, losses, traces, failed, reasons) -> None:
        """One finished batch: failed rows' images are zeroed and losses NaN."""
        images, losses = images.clone(), losses.clone()
        images[failed] = 0.0
        losses[failed] = math.nan
        for k, (r, m) in enumerate(rows):
            self._set(r, m, images[k], losses[k], traces[k], failed[k], reasons[k])
        if self.folder is not None:
            self.folder.commit(rows, images, losses, traces, failed, reasons)
        self.done.update(rows)

    def interrupted(self) -> RunInterrupted:
        """Record the run as interrupted; the exception that says how to finish it."""
        if self.folder is None:
            raise RuntimeError("interrupted() needs a run folder (out=...)")
        total = self.num_refs * self.n
        have = len(self.folder.done())
        self.folder.mark("interrupted", interrupted=_run_folder_now())
        return RunInterrupted(
            f"interrupted: {have} of {total} rows are written to {str(self.folder.path)!r}; "
            "finish the run with --resume (sample(..., out=..., resume=True))",
            run_dir=self.folder.path,
            done=have,
            total=total,
        )


@contextlib.contextmanager
def sigterm_as_interrupt(active: bool):
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


def row_unit_labels(config: dict) -> list[str] | None:
    """The unit label of each reference row of a call on a unit set (None for one objective)."""
    units = config.get("objective", {}).get("units")
    if not units or units.get("row_units") is None:
        return None
    return [units["labels"][u] for u in units["row_units"]]
