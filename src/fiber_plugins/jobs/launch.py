"""SLURM through submitit: a plan's chunks as an array of jobs, requeued on preemption or timeout.

Job i of K runs :func:`~fiber_plugins.jobs.run.run_plan` as rank i of K; the store makes every
job resumable, so a requeued job simply continues. ``local=True`` uses submitit's
``LocalExecutor`` (local processes), which is how the tests run it.
"""

from __future__ import annotations

from pathlib import Path

from .._utils import require
from ..errors import UserValueError


class PlanJob:
    """A picklable callable: rank ``rank`` of ``world`` of a plan; submitit requeues it with
    :meth:`checkpoint` (the store resumes where it stopped)."""

    def __init__(
        self, plan_path: str, out: str, world: int, replan: bool, device: str | None = None
    ):
        self.plan_path, self.out, self.world, self.replan = plan_path, out, world, replan
        self.device = device

    def __call__(self, rank: int) -> dict:
        from .plan import Plan
        from .run import run_plan

        return run_plan(Plan.load(self.plan_path), self.out, rank=rank, world=self.world,
                        device=self.device, replan=self.replan, progress=False)  # fmt: skip

    def checkpoint(self, rank: int):
        """Requeue the same rank (submitit calls this on preemption and timeout)."""
        helpers = require("submitit.helpers")
        return helpers.DelayedSubmission(
            PlanJob(self.plan_path, self.out, self.world, self.replan, self.device), rank
        )


def submit(
    plan_path: str | Path,
    out: str | Path,
    jobs: int = 1,
    local: bool = False,
    replan: bool = False,
    slurm: dict | None = None,
    wait: bool = True,
    device: str | None = None,
) -> list[dict]:
    """Submit ``jobs`` array jobs for the plan and (by default) wait for them.

    Parameters
    ----------
    plan_path, out:
        The plan file and the store.
    jobs:
        Array size K: job i runs the chunks c with c % K == i.
    local:
        submitit's LocalExecutor instead of SLURM.
    slurm:
        submitit parameters (``partition``, ``gpus_per_node``, ``timeout_min``, ...), passed to
        ``executor.update_parameters`` with the ``slurm_`` prefix where submitit needs it.
    wait:
        Wait for the jobs and return their counts (else return ``[]`` at once).
    device:
        The device of every job (default: ``cuda:LOCAL_RANK`` where CUDA is there, else cpu),
        checked by each job on its own machine.
    """
    submitit = require("submitit")
    if jobs < 1:
        raise UserValueError(f"--jobs must be >= 1, got {jobs}")
    folder = Path(out).parent / f".{Path(out).name}.submitit"
    if local:
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=int((slurm or {}).get("timeout_min", 60)))
    else:
        executor = submitit.AutoExecutor(folder=str(folder))
        executor.update_parameters(**{("slurm_" + k if k in _SLURM_ONLY else k): v
                                      for k, v in (slurm or {}).items()})  # fmt: skip
    task = PlanJob(str(Path(plan_path).resolve()), str(Path(out).resolve()), jobs, replan, device)
    submitted = executor.map_array(task, list(range(jobs)))
    if not wait:
        return []
    return [job.result() for job in submitted]


_SLURM_ONLY = {"partition", "account", "qos", "constraint", "exclude", "array_parallelism"}
