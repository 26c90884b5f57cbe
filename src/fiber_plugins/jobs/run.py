"""Running a plan into a store: this process's share of the chunks, each one sampler call on a
:class:`~fiber_plugins.objectives.units.UnitSet`, committed to the index when complete.

Under ``torchrun`` (or ``accelerate launch``) every process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``, takes the chunks ``c`` with ``c % WORLD_SIZE == RANK``, samples on
``cuda:LOCAL_RANK`` when there is CUDA, and writes only its own chunks: no collectives. A chunk's
samples depend on the plan alone (its units, references, seeds and batch size), never on the
number of processes or on restarts.
"""

from __future__ import annotations

import os
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._utils import resolve_device, to_model_range
from ..errors import RunInterrupted, UserError
from ..samplers.run_folder import RUN_FILE, remove_run
from ..samplers.store import Store, is_store
from .plan import Plan
from .work import Work


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's / accelerate's environment (0, 1, 0
    without one)."""
    env = os.environ
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError(
            f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {env.get('RANK')!r}, "
            f"{env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}"
        ) from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def default_device(local_rank: int) -> str:
    """``cuda:LOCAL_RANK`` when CUDA is there, else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def run_device(device: str | None, local_rank: int) -> str:
    """This process's device: ``None`` or ``"auto"`` is :func:`default_device`; any other name
    is read by :func:`~fiber_plugins._utils.resolve_device`, so an unknown device (``tpu9``) or
    one this machine lacks (``cuda`` without CUDA) is a one-line error. ``cuda`` without an
    index is this process's own GPU, ``cuda:LOCAL_RANK``, as by default."""
    if device is None or device == "auto":
        return default_device(local_rank)
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return default_device(local_rank)
    return str(resolved)


def version() -> str:
    """The installed package version."""
    try:
        return metadata.version("fiber-plugins")
    except metadata.PackageNotFoundError:
        return "unknown"


def passes_per_sample(plan: Plan) -> dict:
    """Network passes one sample costs, by the sampler's algorithm (forward / backward; for
    noise optimisation the most it can cost, as it stops early at its threshold)."""
    s = plan["sampler"]
    t, n = s["steps"], s["inner_steps"]
    if s["method"] == "ndtm":  # per step: 1 prior fwd, N x (prior + subject fwd+bwd)
        return {"prior_fwd": t * (1 + n), "prior_bwd": t * n, "subject_fwd": t * n,
                "subject_bwd": t * n}  # fmt: skip
    if s["method"] == "dps":
        return {"prior_fwd": t, "prior_bwd": t, "subject_fwd": t, "subject_bwd": t}
    # noise optimisation: at most max_iters iterations, each a whole T-step decode
    k = plan.sampler_config().max_iters
    return {"prior_fwd": t * k, "prior_bwd": t * k, "subject_fwd": k, "subject_bwd": k}


def dry_run(work: Work) -> dict:
    """The job's size and compute, before anything is sampled."""
    size = work.size()
    per = passes_per_sample(work.plan)
    return {**size, "passes_per_sample": per,
            "passes": {k: v * size["samples"] for k, v in per.items()}}  # fmt: skip


def _sampler(plan: Plan, prior, units):
    from ..samplers import DPSSampler, NDTMSampler, NoiseOptSampler

    config = plan.sampler_config()  # the config the plan was checked with when it was read
    method = plan["sampler"]["method"]
    if method == "ndtm":
        return NDTMSampler(prior, units, config)
    if method == "dps":
        return DPSSampler(prior, units, config)
    return NoiseOptSampler(prior, units, config)


class Extras:
    """The per-row additions of the index: nearest-neighbour fiber loss over the plan's pool
    (pool features computed once for all units) and the labeller's verdict."""

    def __init__(self, plan: Plan, work: Work, image_size):
        self.pool_features = None
        self.labeller = None
        base = plan.settings.get("baseline")
        if base:
            pool = _images(plan, base["pool"], base["pool_size"], image_size)
            with work.units.attached(), torch.no_grad():
                dev = work._device()
                self.pool_features = torch.cat(
                    [work.units.features(to_model_range(p.to(dev))).cpu() for p in pool.split(64)]
                )
        lab = plan.settings.get("labeller")
        if lab:
            from ..objectives.base import FiberObjective
            from ..specs.subjects import load_subject

            model, pre = load_subject(
                lab["spec"], plan.path(lab["weights"]) if lab.get("weights") else None
            )
            self.labeller = FiberObjective(model.to(work._device()), preprocess=pre)

    def nearest(self, work: Work, unit: int, target: torch.Tensor) -> float | None:
        """min over the pool of d(phi_unit(pool), y*_unit)."""
        if self.pool_features is None:
            return None
        a, b = work.units._blocks()[unit]
        full = torch.full((1, self.pool_features.shape[1]), float("nan"))
        full[0, a:b] = target
        bound = work.units.bind([unit])
        return float(bound.distance_between(self.pool_features, full).min())

    def labels(self, images01: torch.Tensor) -> torch.Tensor | None:
        if self.labeller is None:
            return None
        model = self.labeller.model
        dev = next(model.parameters()).device if model is not None else torch.device("cpu")
        with torch.no_grad():
            return torch.cat(
                [
                    self.labeller.target(to_model_range(x.to(dev))).argmax(1).cpu()
                    for x in images01.split(64)
                ]
            )


def _images(plan: Plan, source: str, count: int, size) -> torch.Tensor:
    from ..images import as_reference_batch
    from .work import DATASETS, dataset_images

    if source in DATASETS:
        return torch.stack(
            [torch.as_tensor(r.image) for r in dataset_images(source, list(range(count)))]
        )
    folder = Path(plan.path(source))
    files = sorted(
        str(p) for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )
    if not files:
        raise UserError(f"plan {plan.source}: no pool images in {str(folder)!r}")
    return as_reference_batch(files[:count], size=size)


def run_plan(
    plan: Plan,
    out: str | Path,
    rank: int | None = None,
    world: int | None = None,
    device: str | None = None,
    replan: bool = False,
    progress: bool = True,
) -> dict:
    """Run this process's share of ``plan`` into the store ``out``; committed chunks are skipped,
    an interrupted chunk resumes, a chunk that crashed is tried again (``run.retries`` times in
    all, then committed as failed). Returns counts of this process's work: ``failed_chunks``
    lists the chunks that crashed in this run (their errors are in ``STORE/attempts/``),
    ``committed_failed`` counts those committed as failed, ``first_error`` is the first error.

    The plan's subject, units, prior, pool and labeller are loaded (and so checked) before a
    new store is written, so a run refused with a one-line error leaves no store behind."""
    env_rank, env_world, local = distributed_rank()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    device = run_device(device, local)
    # Everything the plan names is loaded and checked before the store is written: a plan that
    # fails (a unit its layer does not have, a prior or pool that is not there) leaves no store
    # behind that would then refuse the corrected plan as "another plan".
    Store.check_new(out)  # a file or a folder of other files: refused before models load
    work = Work(plan, device)  # the subject, the references, one pass that checks the units
    chunks = work.chunks()
    mine = [c for c in range(len(chunks)) if c % world == rank]
    manifest = {
        "plan": plan.settings,
        "plan_hash": plan.hash(),
        "version": version(),
        "num_units": work.units.num_units,
        "units": list(work.units.labels),
        "labeller": (plan.settings.get("labeller") or {}).get("spec"),
    }
    store: Store | None = None
    committed: set[int] = set()
    if is_store(out):
        # this plan's store, or one refused as another plan's; --replan rewrites its manifest
        # only once everything has loaded
        store = None if replan else Store.create_or_open(out, manifest)
        committed = (store or Store.open(out)).committed()
    pending = [c for c in mine if c not in committed]
    stats: dict[str, Any] = {"rank": rank, "world": world, "chunks": len(mine), "done_before": len(mine) - len(pending),
             "committed": 0, "failed_attempts": 0, "samples": 0, "failed_chunks": [],
             "committed_failed": 0, "first_error": None}  # fmt: skip
    if not pending:
        if store is None and is_store(out):
            Store.create_or_open(out, manifest, replan=replan)
        return stats
    prior = _prior(plan, device)
    if plan["prior"]["dtype"] != "fp32":
        prior.accelerate(weights=plan["prior"]["dtype"])
    # the units again, at the size and channels the sampler reads
    work.check_units(prior.image_size, prior.image_channels)
    extras = Extras(plan, work, prior.image_size)
    if store is None:
        store = Store.create_or_open(out, manifest, replan=replan)
    bar = tqdm(total=sum(len(chunks[c]) for c in mine), initial=sum(len(chunks[c]) for c in mine if c not in pending),
               desc=f"rank {rank}/{world}", unit="unit", position=rank, disable=not progress)  # fmt: skip
    start = time.perf_counter()
    try:
        for c in pending:
            rows = _run_chunk(plan, work, store, extras, prior, c, chunks[c], device, stats)
            stats["samples"] += sum(1 for r in rows if r["status"] == "ok")
            bar.update(len(chunks[c]))
            hours = (time.perf_counter() - start) / 3600
            bar.set_postfix(samples_per_hour=f"{stats['samples'] / max(hours, 1e-9):.0f}",
                            store=f"{len(store.committed())}/{len(chunks)} chunks")  # fmt: skip
    finally:
        bar.close()
    return stats


def _prior(plan: Plan, device: str):
    spec = plan.path(plan["prior"]["path"])
    if spec.startswith("zoo:"):
        from .. import zoo

        return zoo.load_prior(spec[4:], device=device)
    from ..priors.loading import load_prior

    return load_prior(spec).to(device)


def _run_chunk(plan, work, store, extras, prior, c, units, device, stats) -> list[dict]:
    s = plan["sampler"]
    chunk_set = work.chunk_units(units)
    references = {i: [r.image for r in work.references[u]] for i, u in enumerate(units)}
    folder = store.chunk_dir(c)
    retries = plan["run"]["retries"]
    t0 = time.perf_counter()
    resume = (folder / RUN_FILE).is_file()
    if not resume and folder.is_dir():
        # a start killed before run.json was written (only this process writes this chunk):
        # its partial files go, and the chunk starts afresh
        remove_run(folder)
    try:
        result = _sampler(plan, prior, chunk_set).sample(
            references=references, n=s["n"], seed=plan.seed, batch_size=s["batch_size"],
            progress=False, out=folder, resume=resume,
        )  # fmt: skip
    except (KeyboardInterrupt, RunInterrupted):
        raise
    except Exception as err:  # a crash of the chunk, not a failed sample: retried on a rerun
        stats["failed_attempts"] += 1
        stats["failed_chunks"].append(c)
        message = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        stats["first_error"] = stats["first_error"] or message
        attempts = store.record_attempt(c, message + "\n" + traceback.format_exc(limit=3))
        if attempts <= retries:
            print(
                f"chunk {c} failed (attempt {attempts} of {retries + 1}, retried on the next run): {message}"
            )
            return []
        rows = _failed_rows(plan, work, store, c, units, message, device)
        store.commit(c, rows)
        stats["committed"] += 1
        stats["committed_failed"] += 1
        return rows
    seconds = (time.perf_counter() - t0) / max(1, result.failed.numel())
    rows = _rows(plan, work, store, extras, result, c, units, seconds, device)
    store.commit(c, rows)
    stats["committed"] += 1
    return rows


def _common(plan, store, c, device) -> dict:
    return {"chunk": c, "device": str(device), "version": version(), "plan_hash": plan.hash()}


def _rows(plan, work, store, extras, result, c, units, seconds, device) -> list[dict]:
    n = plan["sampler"]["n"]
    row_unit = result.config["objective"]["units"]["row_units"]
    spans = result.config["objective"]["units"]["spans"]
    file = str(Path("chunks") / f"{c:06d}" / "samples.safetensors")
    flat = result.images.reshape(-1, *result.images.shape[2:])
    sample_labels = extras.labels(flat)
    ref_labels = extras.labels(result.references) if sample_labels is not None else None
    seen: dict[int, int] = {}
    rows = []
    for r, local in enumerate(row_unit):
        u = units[local]
        ref_row = seen.get(u, 0)
        seen[u] = ref_row + 1
        a, b = spans[local]
        nn = extras.nearest(work, u, result.targets[r, a:b])
        for m in range(n):
            failed = bool(result.failed[r, m])
            kept = None
            if sample_labels is not None and ref_labels is not None and not failed:
                kept = bool(sample_labels[r * n + m] == ref_labels[r])
            rows.append({
                "unit": work.units.labels[u], "unit_index": u,
                "reference": work.references[u][ref_row].id, "reference_row": r,
                "sample": m, "seed": plan.seed, "file": file, "slot": r * n + m,
                "fiber_loss": None if failed else float(result.fiber_loss[r, m]),
                "nearest_neighbour": nn, "label_kept": kept,
                "status": "failed" if failed else "ok",
                "reason": result.reason(r, m) if failed else None,
                "seconds": seconds, **_common(plan, store, c, device),
            })  # fmt: skip
    return rows


def _failed_rows(plan, work, store, c, units, message, device) -> list[dict]:
    n = plan["sampler"]["n"]
    return [
        {
            "unit": work.units.labels[u],
            "unit_index": u,
            "reference": ref.id,
            "reference_row": -1,
            "sample": m,
            "seed": plan.seed,
            "file": "",
            "slot": -1,
            "fiber_loss": None,
            "nearest_neighbour": None,
            "label_kept": None,
            "status": "failed",
            "reason": f"the chunk failed {plan['run']['retries'] + 1} times: {message}",
            "seconds": None,
            **_common(plan, store, c, device),
        }  # fmt: skip
        for u in units
        for ref in work.references[u]
        for m in range(n)
    ]
