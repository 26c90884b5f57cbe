"""Many units, many GPUs: plans (TOML) expanded into work units and chunks, run into a resumable
store, sharded under torchrun or as submitit array jobs (see docs/scaling.md)."""

from .plan import Plan
from .run import dry_run, run_plan
from .work import Work

__all__ = ["Plan", "Work", "dry_run", "run_plan"]
