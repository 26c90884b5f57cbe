"""``fiber-plugins plan expand PLAN`` and ``fiber-plugins run PLAN --out STORE``: many units from a
plan file, sharded under torchrun or as submitit array jobs, resumable (see docs/scaling.md).

``run`` exits 0 when every chunk it tried was committed with its samples, 1 when a chunk crashed
in this run (it is tried again by the next run, or was committed as failed after its last
attempt; a line on stderr says where the errors are), 2 on a user mistake (one line, nothing
written) and 130 when interrupted."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import RunInterrupted, UserValueError

LAUNCHERS = ("none", "submitit", "submitit-local")


def cmd_plan_expand(args) -> int:
    from ..jobs.plan import Plan
    from ..jobs.work import Work

    work = Work(Plan.load(args.plan))
    size = work.size()
    print(
        f"# plan {args.plan}: {size['units']} units, {size['references']} (unit, reference) "
        f"pairs, {size['samples']} samples, {size['chunks']} chunks of "
        f"{work.plan['run']['units_per_chunk']} units; plan hash {work.plan.hash()}"
    )
    if args.json:
        json.dump(work.work_units(), sys.stdout)
        print()
        return 0
    print("unit_index\tunit\treference\tseeds (seed:row key:sample)")
    for w in work.work_units():
        seeds = " ".join(f"{s}:{r}:{m}" for s, r, m in w["seeds"])
        print(f"{w['unit_index']}\t{w['unit']}\t{w['reference']}\t{seeds}")
    return 0


def cmd_run(args) -> int:
    from ..jobs.plan import Plan

    plan = Plan.load(args.plan)
    if args.launcher != "submitit":  # SLURM jobs check --device on their own nodes
        from ..jobs.run import run_device

        run_device(args.device, 0)  # an unknown or absent device: one line, before any model
    if args.dry_run:
        from ..jobs.run import dry_run
        from ..jobs.work import Work

        cost = dry_run(Work(plan))
        per = cost["passes_per_sample"]
        print(
            f"{cost['units']} units, {cost['references']} (unit, reference) pairs, "
            f"{cost['samples']} samples in {cost['chunks']} chunks"
        )
        print(
            "per sample: "
            + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in per.items())
            + "; in all: "
            + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in cost["passes"].items())
        )
        return 0
    if args.out is None:
        raise UserValueError("give --out STORE (a new folder, or the store of this plan to resume)")
    if args.launcher != "none":
        from ..jobs.launch import submit

        results = submit(
            args.plan, args.out, jobs=args.jobs, local=args.launcher == "submitit-local",
            replan=args.replan, slurm=_slurm(args), device=args.device,
        )  # fmt: skip
        done = sum(r["committed"] for r in results)
        print(f"{len(results)} jobs finished; {done} chunks committed to {args.out}")
        return _failures(results, args.out)
    from ..jobs.run import run_plan

    try:
        stats = run_plan(plan, args.out, device=args.device, replan=args.replan)
    except RunInterrupted:
        print(
            "fiber-plugins: interrupted; the store keeps every finished batch: run the same "
            "command again to continue",
            file=sys.stderr,
        )
        return 130
    print(
        f"rank {stats['rank']}/{stats['world']}: {stats['committed']} chunks committed now, "
        f"{stats['done_before']} before, {stats['failed_attempts']} failed attempts, "
        f"{stats['samples']} samples -> {args.out}"
    )
    status = _failures([stats], args.out)
    # under torchrun a worker's non-zero status stops the other ranks: the line on stderr says
    # what crashed, and the ranks still working finish their chunks
    return 0 if stats["world"] > 1 else status


def _failures(results: list[dict], out: str) -> int:
    """Exit status 1, with one line on stderr saying where the errors are, when a chunk crashed
    in this run (of any of ``results``, one per process or job); 0 otherwise. Under torchrun
    (more than one rank) the line is printed and the status stays 0 (see ``cmd_run``)."""
    failed = sorted(c for r in results for c in r.get("failed_chunks", ()))
    if not failed:
        return 0
    tried = sum(r["chunks"] - r["done_before"] for r in results)
    final = sum(r.get("committed_failed", 0) for r in results)
    first = next((r["first_error"] for r in results if r.get("first_error")), "unknown error")
    files = [str(Path(out) / "attempts" / f"{c:06d}.json") for c in failed]
    where = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    print(
        f"fiber-plugins: {len(failed)} of {tried} chunks failed ({final} committed as failed after "
        f"their last attempt, {len(failed) - final} tried again by the next run); first error: "
        f"{first}; the errors are in {where}"
        + (" and the failed rows' reason column of the index" if final else ""),
        file=sys.stderr,
    )
    return 1


def _slurm(args) -> dict:
    out = {}
    for item in args.slurm or ():
        key, eq, value = item.partition("=")
        if not eq:
            raise UserValueError(f"--slurm {item!r} must be KEY=VALUE (e.g. partition=gpu)")
        out[key] = int(value) if value.isdigit() else value
    return out


def add_parsers(sub) -> None:
    """The ``plan`` and ``run`` commands."""
    pl = sub.add_parser("plan", help="plan files: expand one into its work units")
    psub = pl.add_subparsers(dest="plan_command", required=True)
    e = psub.add_parser("expand", help="print the deterministic list of work units and its size")
    e.add_argument("plan", help="plan file (TOML)")
    e.add_argument("--json", action="store_true", help="the work units as JSON")
    e.set_defaults(func=cmd_plan_expand)

    r = sub.add_parser(
        "run",
        help="run a plan into a store (resumable; shards under torchrun / submitit)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Under torchrun each process takes its share of the chunks:\n"
        "  torchrun --nproc_per_node 8 -m fiber_plugins.cli.main run PLAN --out STORE",
    )
    r.add_argument("plan", help="plan file (TOML)")
    r.add_argument("--out", help="the store folder")
    r.add_argument("--dry-run", action="store_true", help="print the job's size and compute only")
    r.add_argument("--launcher", choices=LAUNCHERS, default="none",
                   help="submitit: SLURM array jobs; submitit-local: local processes")  # fmt: skip
    r.add_argument("--jobs", type=int, default=1, help="array jobs for --launcher (default 1)")
    r.add_argument("--slurm", nargs="*", metavar="KEY=VALUE",
                   help="submitit SLURM parameters, e.g. partition=gpu gpus_per_node=1 timeout_min=240")  # fmt: skip
    r.add_argument("--device",
                   help="cpu, cuda, cuda:N, mps or auto (default: cuda:LOCAL_RANK when CUDA is "
                   "there, else cpu)")  # fmt: skip
    r.add_argument("--replan", action="store_true",
                   help="continue a store written by a changed plan (keeps committed chunks)")  # fmt: skip
    r.set_defaults(func=cmd_run)
