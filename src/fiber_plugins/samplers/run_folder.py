"""The run folder: where a sampling run writes its rows as they finish, so nothing is lost.

One format for a finished ``result.save(dir)``, a streaming ``sampler.sample(..., out=dir)``, a
many-unit call (a :class:`~fiber_plugins.objectives.units.UnitSet`) and each chunk of a plan's
store. A *row* is one (unit, reference, sample). A call on one objective has one unit, ``"0"``; a
unit set's call names each reference row's unit by its label (``row_units`` in the manifest).
Files:

``run.json``
    The manifest: format version, status (``running`` / ``interrupted`` / ``complete``), the
    run's fingerprint (sampler, settings, objective, prior, seed, n, a hash of the references or
    targets), the units, the row count, timestamps.
``inputs.safetensors``
    What the rows were sampled against: ``references`` (R, C, H, W) in [0, 1] when given, and the
    targets ``target_0``, ``target_1``, ... (R, K_i).
``index.parquet``
    One line per finished row: unit, reference, sample, file, slot, fiber_loss, failed, reason.
    ``file``/``slot`` say where the row's image and loss trace are.
``shards/NNNNNN.safetensors``
    One file per finished batch while the run goes on: ``images`` (B, C, H, W), ``loss_trace``
    (B, T).
``samples.safetensors``, ``metrics.json``, ``grid.png``
    Written when the run is complete (all rows in one file; the shards are then removed).

Every file is written to a temporary name and renamed, and a shard is written before the index
names it, so a run killed at any instant (SIGKILL included) leaves an index that names only whole
files; a resumed run redoes exactly the rows the index lacks. ``overwrite`` removes the files
above (and the report files ``evaluation.json``, ``report.html``) and nothing else.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._utils import check_writable_folder
from ..errors import UserValueError

FORMAT = 1
RUN_FILE = "run.json"
INDEX_FILE = "index.parquet"
INPUTS_FILE = "inputs.safetensors"
SHARD_DIR = "shards"
SAMPLES_FILE = "samples.safetensors"
METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
# written by reporting (evaluate_run, write_report) into the run's folder
EVALUATION_FILE = "evaluation.json"
FLAGGED_GRID_FILE = "grid_flagged.png"
REPORT_FILE = "report.html"
# every name a run and its report may write; ``overwrite`` removes these and nothing else
RUN_FILES = (
    RUN_FILE,
    INDEX_FILE,
    INPUTS_FILE,
    SHARD_DIR,
    SAMPLES_FILE,
    METRICS_FILE,
    GRID_FILE,
    EVALUATION_FILE,
    FLAGGED_GRID_FILE,
    REPORT_FILE,
    "trace.png",
    "lowpass.png",
    "invariance.png",
    "colours.png",
)
DEFAULT_UNIT = "0"


def _unit_list(row_units: list[str] | None, num_references: int, n: int) -> list[dict]:
    """The manifest's units: name, reference rows and samples per row, in first-seen order."""
    if row_units is None:
        return [{"name": DEFAULT_UNIT, "num_references": num_references, "n": n}]
    counts: dict[str, int] = {}
    for name in row_units:
        counts[str(name)] = counts.get(str(name), 0) + 1
    return [{"name": k, "num_references": v, "n": n} for k, v in counts.items()]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once, at import: setting it (the only way to read it) is process-wide, so doing that
# while other threads create files would race
_UMASK = _read_umask()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``
    (an observer sees the old file or the new one, never half of one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file owner-only; give it the mode a plain open() would (umask)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str)))


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def tensor_digest(*tensors) -> str:
    """A short hash of tensors' float32 values (to recognise the same references on resume)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            continue
        t = t.detach().float().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _status(path: Path) -> str | None:
    try:
        return json.loads((path / RUN_FILE).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def describe_folder(path: Path) -> str:
    """One phrase about the run in ``path`` (status, rows), for messages."""
    try:
        run = json.loads((path / RUN_FILE).read_text())
        done = run.get("rows_done", "?")
        return f"{run.get('status', '?')} run, {done} of {run.get('num_rows', '?')} rows"
    except (OSError, ValueError):
        return "run"


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds (part of) a run: run.json, samples.safetensors or metrics.json."""
    return any((path / name).exists() for name in (RUN_FILE, SAMPLES_FILE, METRICS_FILE))


def check_out_dir(
    path, *, overwrite: bool = False, resume: bool = False, can_resume: bool = True
) -> str:
    """Check an output folder before any model is loaded; returns ``"new"``, ``"resume"`` or
    ``"overwrite"``.

    The folder must be creatable and writable, and free of an earlier run unless ``resume``
    (finish it) or ``overwrite`` (replace the whole earlier run) says what to do with it. A
    folder that holds other files is never written into. The refusal offers ``--resume`` only
    for an unfinished run and where the caller can resume (``can_resume``: not the demo).
    """
    if overwrite and resume:
        raise UserValueError("give overwrite or resume, not both")
    path = Path(path)
    try:
        return _check_out_dir(path, overwrite, resume, can_resume)
    except OSError as err:  # a name too long, a path the system will not create, ...
        raise UserValueError(
            f"cannot use output folder {str(path)!r}: {err.strerror or err}; give another folder"
        ) from None


def _check_out_dir(path: Path, overwrite: bool, resume: bool, can_resume: bool) -> str:
    check_writable_folder(path)
    if not path.is_dir():
        return "new"
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if not holds_run(path):
        if entries:
            raise UserValueError(
                f"output folder {str(path)!r} is not empty and holds no run "
                f"({', '.join(entries[:3])}{' ...' if len(entries) > 3 else ''}); give a new "
                "or empty folder"
            )
        return "new"
    foreign = [e for e in entries if e not in RUN_FILES]
    if foreign and (overwrite or resume):
        raise UserValueError(
            f"output folder {str(path)!r} holds files that are not part of a run "
            f"({', '.join(foreign[:3])}); give a new folder"
        )
    if resume:
        return "resume"
    if overwrite:
        return "overwrite"
    finish = ""
    if can_resume and _status(path) != "complete":
        finish = ", --resume (resume=True) to finish it,"
    raise UserValueError(
        f"output folder {str(path)!r} holds an earlier {describe_folder(path)}; pass "
        f"--overwrite (overwrite=True) to replace it{finish} or give a new folder"
    )


def remove_run(path: Path) -> None:
    """Remove every file of the run in ``path`` (and its report), nothing else."""
    for name in RUN_FILES:
        p = path / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# Settings a sampler gained after run folders existed, with the value every earlier run had:
# a run written before the setting existed resumes under that value (and only under it).
LATER_SETTINGS: dict[str, dict[str, Any]] = {"ndtm": {"optimiser": "adam"}}


def with_later_settings(fingerprint: dict) -> dict:
    """``fingerprint`` with the settings its sampler gained later (:data:`LATER_SETTINGS`)
    filled in at their earlier value where it does not record them."""
    later = LATER_SETTINGS.get(str(fingerprint.get("sampler")), {})
    settings = fingerprint.get("settings")
    if not later or not isinstance(settings, dict):
        return fingerprint
    return {**fingerprint, "settings": {**later, **settings}}


class RunFolder:
    """A run folder being written (see the module docstring for the format).

    Use :meth:`start` to begin or resume a run, :meth:`commit` after each finished batch,
    :meth:`mark` for the status and :meth:`finish` when every row is done.
    """

    def __init__(self, path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._index: list[dict] = []

    # ------------------------------------------------------------------ starting
    @classmethod
    def start(
        cls,
        path,
        fingerprint: dict,
        num_references: int,
        n: int,
        references: torch.Tensor | None,
        targets: tuple[torch.Tensor, ...],
        mode: str = "new",
        extra: dict | None = None,
        row_units: list[str] | None = None,
    ) -> RunFolder:
        """Begin a new run in ``path`` (``mode`` from :func:`check_out_dir`) or reopen the run to
        resume it; a resumed run must have the same ``fingerprint``. ``row_units`` names the unit
        of each reference row (default: one unit, ``"0"``)."""
        path = Path(path)
        if mode == "resume" and (path / RUN_FILE).is_file():
            folder = cls.open(path)
            folder._check_fingerprint(fingerprint)
            folder._drop_orphans()
            folder.mark("running", resumed_at=_now())
            return folder
        if mode == "resume" and holds_run(path):
            raise UserValueError(
                f"cannot resume {str(path)!r}: it holds a run without {RUN_FILE} (written by an "
                "older version); pass --overwrite or give a new folder"
            )
        if mode == "overwrite":
            remove_run(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"target_{i}": t.float() for i, t in enumerate(targets)}
        if references is not None:
            tensors["references"] = references.float()
        _save_tensors(path / INPUTS_FILE, tensors)
        manifest = {
            "format": FORMAT,
            "status": "running",
            "created": _now(),
            "fingerprint": fingerprint,
            "units": _unit_list(row_units, num_references, n),
            "num_rows": num_references * n,
            "rows_done": 0,
            "num_targets": len(targets),
            **({"row_units": list(row_units)} if row_units is not None else {}),
            **(extra or {}),
        }
        folder = cls(path, manifest)
        folder._write_index()
        _write_json(path / RUN_FILE, manifest)
        return folder

    @classmethod
    def open(cls, path) -> RunFolder:
        """Open an existing run folder (for reading or resuming)."""
        path = Path(path)
        try:
            manifest = json.loads((path / RUN_FILE).read_text())
        except (OSError, ValueError) as err:
            raise UserValueError(
                f"{str(path)!r} is not a readable run folder ({RUN_FILE}: {type(err).__name__})"
            ) from None
        if manifest.get("format") != FORMAT:
            raise UserValueError(
                f"run folder {str(path)!r} has format {manifest.get('format')!r}; this version "
                f"reads format {FORMAT}"
            )
        folder = cls(path, manifest)
        folder._index = folder._read_index()
        return folder

    def _check_fingerprint(self, fingerprint: dict) -> None:
        old = with_later_settings(self.manifest.get("fingerprint", {}))
        keys = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if keys:
            k = keys[0]
            was, now = old.get(k), fingerprint.get(k)
            if isinstance(was, dict) and isinstance(now, dict):  # name the entries that differ
                sub = sorted(j for j in set(was) | set(now) if was.get(j) != now.get(j))
                detail = "; ".join(f"{j}: run {was.get(j)!r}, now {now.get(j)!r}" for j in sub)
            else:
                detail = f"{k}: run {was!r}, now {now!r}"
            raise UserValueError(
                f"cannot resume {str(self.path)!r}: this call differs from the run in "
                f"{', '.join(keys)} ({detail}); "
                "repeat the run's own settings, or pass --overwrite / a new folder"
            )

    def _drop_orphans(self) -> None:
        """Remove shards that a killed run wrote but never entered in the index."""
        named = {e["file"] for e in self._index}
        shard_dir = self.path / SHARD_DIR
        if shard_dir.is_dir():
            for p in shard_dir.iterdir():
                if f"{SHARD_DIR}/{p.name}" not in named:
                    p.unlink()

    def unit_of(self, row: int) -> str:
        """The unit label of reference row ``row``."""
        names = self.manifest.get("row_units")
        return DEFAULT_UNIT if names is None else str(names[row])

    # ------------------------------------------------------------------ the index
    def _write_index(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("unit", pa.string()),
                ("reference", pa.int64()),
                ("sample", pa.int64()),
                ("file", pa.string()),
                ("slot", pa.int64()),
                ("fiber_loss", pa.float64()),
                ("failed", pa.bool_()),
                ("reason", pa.string()),
            ]
        )
        table = pa.Table.from_pylist(self._index, schema=schema)
        atomic_write(self.path / INDEX_FILE, lambda p: pq.write_table(table, str(p)))

    def _read_index(self) -> list[dict]:
        import pyarrow.parquet as pq

        p = self.path / INDEX_FILE
        if not p.is_file():
            return []
        return pq.read_table(str(p)).to_pylist()

    @property
    def index(self) -> list[dict]:
        """The index entries written so far, one dict per finished row."""
        return list(self._index)

    def done(self) -> set[tuple[int, int]]:
        """The (reference, sample) rows already written."""
        return {(e["reference"], e["sample"]) for e in self._index}

    # ------------------------------------------------------------------ writing
    def commit(self, rows, images, fiber_loss, loss_trace, failed, reasons) -> None:
        """Write one finished batch: its shard first, then the index that names it."""
        shard_dir = self.path / SHARD_DIR
        shard_dir.mkdir(exist_ok=True)
        number = 1 + max(
            (int(Path(e["file"]).stem) for e in self._index if e["file"].startswith(SHARD_DIR)),
            default=-1,
        )
        name = f"{SHARD_DIR}/{number:06d}.safetensors"
        _save_tensors(
            self.path / name, {"images": images.float(), "loss_trace": loss_trace.float()}
        )
        for k, (r, m) in enumerate(rows):
            self._index.append(
                {
                    "unit": self.unit_of(int(r)),
                    "reference": int(r),
                    "sample": int(m),
                    "file": name,
                    "slot": k,
                    "fiber_loss": None if bool(failed[k]) else float(fiber_loss[k]),
                    "failed": bool(failed[k]),
                    "reason": reasons[k] if bool(failed[k]) else None,
                }
            )
        self._write_index()
        self.manifest["rows_done"] = len(self._index)
        self.manifest["updated"] = _now()
        _write_json(self.path / RUN_FILE, self.manifest)

    def mark(self, status: str, **extra) -> None:
        """Record the run's status (``running``, ``interrupted``, ``complete``) and notes."""
        self.manifest.update(status=status, updated=_now(), **extra)
        _write_json(self.path / RUN_FILE, self.manifest)

    # ------------------------------------------------------------------ reading
    def inputs(self) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
        """(references or None, targets) as written at the start of the run."""
        from safetensors.torch import load_file

        t = load_file(str(self.path / INPUTS_FILE))
        num = int(self.manifest.get("num_targets", 1))
        return t.get("references"), tuple(t[f"target_{i}"] for i in range(num))

    def rows(self):
        """Yield (reference, sample, image, loss_trace, fiber_loss, failed, reason) per written row."""
        from safetensors.torch import load_file

        cache: dict[str, dict] = {}
        for e in self._index:
            if e["file"] not in cache:
                cache = {e["file"]: load_file(str(self.path / e["file"]))}
            data = cache[e["file"]]
            loss = e["fiber_loss"]
            yield (
                e["reference"],
                e["sample"],
                data["images"][e["slot"]],
                data["loss_trace"][e["slot"]],
                float("nan") if loss is None else float(loss),
                bool(e["failed"]),
                e["reason"],
            )

    # ------------------------------------------------------------------ finishing
    def finish(self, images, loss_trace, fiber_loss, failed, reasons, metrics: dict) -> None:
        """All rows done: one ``samples.safetensors`` (R*M rows, reference-major), an index
        naming it, ``metrics.json``, status ``complete``; then the shards go.

        images (R, M, C, H, W), loss_trace (R, M, T), fiber_loss and failed (R, M), reasons an
        R x M nested list of str or None.
        """
        R, M = images.shape[:2]
        _save_tensors(
            self.path / SAMPLES_FILE,
            {
                "images": images.reshape(R * M, *images.shape[2:]).float(),
                "loss_trace": loss_trace.reshape(R * M, -1).float(),
            },
        )
        self._index = [
            {
                "unit": self.unit_of(r),
                "reference": r,
                "sample": m,
                "file": SAMPLES_FILE,
                "slot": r * M + m,
                "fiber_loss": None if bool(failed[r, m]) else float(fiber_loss[r, m]),
                "failed": bool(failed[r, m]),
                "reason": reasons[r][m] if bool(failed[r, m]) else None,
            }
            for r in range(R)
            for m in range(M)
        ]
        self._write_index()
        _write_json(self.path / METRICS_FILE, metrics)
        self.manifest["rows_done"] = len(self._index)
        self.mark("complete", finished=_now())
        shutil.rmtree(self.path / SHARD_DIR, ignore_errors=True)
