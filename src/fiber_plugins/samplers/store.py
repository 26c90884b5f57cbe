"""The store of a plan: many run folders, one per chunk of units, and an index over all of them.

A plan (``fiber-plugins run PLAN --out STORE``) samples thousands of units; its store extends the
run folder (:mod:`.run_folder`) instead of replacing it. Files:

``store.json``
    The manifest: ``format``, ``kind`` (``"fiber-store"``), the normalised ``plan`` and its
    ``plan_hash``, the package ``version``, ``created``, ``num_units``, the unit ``units``
    labels in plan order, the ``labeller`` (or null).
``chunks/NNNNNN/``
    An ordinary run folder: the one sampler call of chunk NNNNNN (a few units, each at its
    references). It is written row batch by row batch, so a killed chunk resumes where it
    stopped.
``index/NNNNNN.parquet``
    Chunk NNNNNN's rows, written once the chunk is complete: one line per (unit, reference,
    sample) with ``unit``, ``unit_index``, ``reference``, ``reference_row``, ``sample``,
    ``seed``, ``chunk``, ``file``/``slot`` (where the sample's image is), ``fiber_loss``,
    ``nearest_neighbour``, ``label_kept``, ``status`` (``ok`` / ``failed``), ``reason``,
    ``seconds``, ``device``, ``version``, ``plan_hash``. Readable with pyarrow, pandas
    (``pd.read_parquet("STORE/index")``) and ``datasets`` (``load_dataset("parquet",
    data_files="STORE/index/*.parquet")``).
``attempts/NNNNNN.json``
    The errors of a chunk's failed attempts (a crash, not a failed sample), for the retry limit.

A chunk is committed when its index file exists: the file is written to a temporary name and
renamed, after the chunk's run folder is complete, so a store killed at any instant holds only
whole chunks in its index. Each chunk is written by exactly one process.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._utils import check_writable_folder
from ..errors import UserValueError
from .run_folder import _now, _write_json, atomic_write

STORE_FORMAT = 1
STORE_FILE = "store.json"
CHUNK_DIR = "chunks"
INDEX_DIR = "index"
ATTEMPT_DIR = "attempts"

INDEX_COLUMNS = (
    ("unit", "string"),
    ("unit_index", "int64"),
    ("reference", "string"),
    ("reference_row", "int64"),
    ("sample", "int64"),
    ("seed", "int64"),
    ("chunk", "int64"),
    ("file", "string"),
    ("slot", "int64"),
    ("fiber_loss", "float64"),
    ("nearest_neighbour", "float64"),
    ("label_kept", "bool_"),
    ("status", "string"),
    ("reason", "string"),
    ("seconds", "float64"),
    ("device", "string"),
    ("version", "string"),
    ("plan_hash", "string"),
)


def is_store(path: str | Path) -> bool:
    """Whether ``path`` holds a plan's store (its ``store.json``)."""
    return (Path(path) / STORE_FILE).is_file()


class Store:
    """A plan's store on disk (see the module docstring for the files)."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    # ------------------------------------------------------------------ opening
    @classmethod
    def create_or_open(cls, path: str | Path, manifest: dict, replan: bool = False) -> Store:
        """Open the store in ``path`` if it was written for the same plan (its ``plan_hash``),
        else start it. A store of another plan is refused unless ``replan``, which keeps the
        committed chunks and records the new plan (chunks are numbered by plan position, so
        only a plan whose chunks are unchanged should be continued that way)."""
        path = Path(path)
        cls.check_new(path)
        if is_store(path):
            store = cls.open(path)
            old = store.manifest.get("plan_hash")
            if old != manifest["plan_hash"]:
                if not replan:
                    changed = _changed_keys(store.manifest.get("plan", {}), manifest["plan"])
                    raise UserValueError(
                        f"store {str(path)!r} was written by another plan (changed: "
                        f"{', '.join(changed) or 'the plan hash'}); use a new --out, or pass "
                        "--replan to continue it with the new settings"
                    )
                store.manifest.update(manifest, replanned=_now())
                _write_json(path / STORE_FILE, store.manifest)
            return store
        path.mkdir(parents=True, exist_ok=True)
        full = {"format": STORE_FORMAT, "kind": "fiber-store", "created": _now(), **manifest}
        if not is_store(path):  # several ranks may start at once: each writes the same manifest
            _write_json(path / STORE_FILE, full)
        return cls.open(path)

    @staticmethod
    def check_new(path: str | Path) -> None:
        """Refuse a ``path`` no store can be written to: a file, or a folder of other files
        (a folder holding a store passes; :meth:`create_or_open` checks its plan). Cheap: called
        before any model loads."""
        path = Path(path)
        check_writable_folder(path, "store")
        if not path.is_dir() or is_store(path):
            return
        ours = (CHUNK_DIR, INDEX_DIR, ATTEMPT_DIR)  # another process may be starting it now
        foreign = [
            p
            for p in path.iterdir()
            if p.name not in ours and not p.name.startswith(f".{STORE_FILE}.")
        ]
        if foreign:
            raise UserValueError(
                f"{str(path)!r} is not empty and holds no store ({foreign[0].name}); give an "
                "empty or new folder"
            )

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open an existing store."""
        path = Path(path)
        try:
            manifest = json.loads((path / STORE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise UserValueError(
                f"{str(path)!r} is not a readable store ({STORE_FILE}: {type(err).__name__})"
            ) from None
        if manifest.get("format") != STORE_FORMAT or manifest.get("kind") != "fiber-store":
            raise UserValueError(
                f"{str(path)!r} holds a store of format {manifest.get('format')!r}; this version "
                f"reads format {STORE_FORMAT}"
            )
        return cls(path, manifest)

    # ------------------------------------------------------------------ chunks
    def chunk_dir(self, chunk: int) -> Path:
        """The run folder of chunk ``chunk``."""
        return self.path / CHUNK_DIR / f"{chunk:06d}"

    def index_file(self, chunk: int) -> Path:
        """The index file of chunk ``chunk`` (present once it is committed)."""
        return self.path / INDEX_DIR / f"{chunk:06d}.parquet"

    def committed(self) -> set[int]:
        """The chunks whose index is written."""
        folder = self.path / INDEX_DIR
        if not folder.is_dir():
            return set()
        return {int(p.stem) for p in folder.glob("*.parquet") if p.stem.isdigit()}

    def attempts(self, chunk: int) -> list[str]:
        """The errors of chunk ``chunk``'s failed attempts so far."""
        p = self.path / ATTEMPT_DIR / f"{chunk:06d}.json"
        if not p.is_file():
            return []
        return list(json.loads(p.read_text()).get("errors", []))

    def record_attempt(self, chunk: int, error: str) -> int:
        """Record a failed attempt of chunk ``chunk``; returns the number of attempts so far."""
        errors = [*self.attempts(chunk), error]
        (self.path / ATTEMPT_DIR).mkdir(exist_ok=True)
        _write_json(self.path / ATTEMPT_DIR / f"{chunk:06d}.json", {"errors": errors})
        return len(errors)

    def commit(self, chunk: int, rows: list[dict]) -> Path:
        """Write chunk ``chunk``'s index (``rows``: one dict per index line) atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _arrow_kinds()])
        table = pa.Table.from_pylist(rows, schema=schema)
        (self.path / INDEX_DIR).mkdir(exist_ok=True)
        target = self.index_file(chunk)
        atomic_write(target, lambda p: pq.write_table(table, str(p)))
        return target

    # ------------------------------------------------------------------ reading
    def index(self):
        """All committed rows as one pyarrow Table (chunks in order)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = sorted((self.path / INDEX_DIR).glob("*.parquet"))
        if not files:
            schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _arrow_kinds()])
            return schema.empty_table()
        return pa.concat_tables([pq.read_table(str(p)) for p in files])


def _arrow_kinds() -> tuple[tuple[str, str], ...]:
    """(column, pyarrow type factory name) of the index."""
    return INDEX_COLUMNS


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys
