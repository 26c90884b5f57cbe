"""Plans: one TOML file names a whole job (subject, prior, sampler, units, references), and its
deterministic expansion into work units and chunks.

A plan file::

    name = "color-mnist-channels"
    seed = 0

    [subject]               # the CLI's subject grammar
    spec = "zoo:color-mnist-classifier"

    [target]                # the target grammar; a range or list of ids = one unit each
    spec = "layer:features.8:0-15"

    [prior]
    path = "zoo:color-mnist-prior"

    [sampler]
    method = "ndtm"         # ndtm | dps | noise-opt
    steps = 4
    inner_steps = 1
    n = 2                   # samples per (unit, reference)

    [references]            # files = [...] | folder = "..." | dataset = "color-mnist:test"
    dataset = "color-mnist:test"
    count = 2               # the same `count` references for every unit, or:
    # top_k = 2             # each unit's k most activating images among `candidates` of them
    # candidates = 256

    [run]
    units_per_chunk = 8     # units per sampler call (rows of one call share the networks' passes)
    retries = 2             # a chunk that crashes is tried again on the next run, this often

    [baseline]              # optional: nearest-neighbour fiber loss over a pool
    pool = "color-mnist:train"
    pool_size = 512

    [labeller]              # optional: share of fiber samples keeping the reference's label
    spec = "zoo:color-mnist-classifier"

Relative paths are read from the plan file's folder. Every key is checked: an unknown one is
refused with the valid names, and the ``[sampler]`` settings are built into the sampler's config
class once, so every value it refuses (``guidance = nan``) is refused when the plan is read. A
``.json`` file holds the same tables as JSON (the ``plan`` of a store's ``store.json`` is one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import MissingFileError, UserValueError

SCHEMA: dict[str, dict[str, Any]] = {
    "subject": {"spec": str, "weights": str},
    "target": {"spec": str, "distance": str},
    "prior": {"path": str, "dtype": str},
    "sampler": {
        "method": str,
        "steps": int,
        "inner_steps": int,
        "guidance": float,
        "n": int,
        "batch_size": int,
    },
    "references": {
        "files": list,
        "folder": str,
        "dataset": str,
        "count": int,
        "top_k": int,
        "candidates": int,
    },
    "run": {"units_per_chunk": int, "retries": int},
    "baseline": {"pool": str, "pool_size": int},
    "labeller": {"spec": str, "weights": str},
}
TOP_LEVEL = {"name": str, "seed": int}
# [sampler] keys a method has no use for: inner_steps is NDTM's N, guidance the strength of NDTM
# and DPS; noise optimisation runs its own iterations (NoiseOptConfig.max_iters)
IGNORED_BY = {"dps": ("inner_steps",), "noise-opt": ("inner_steps", "guidance")}
DEFAULTS: dict[str, dict[str, Any]] = {
    "sampler": {
        "method": "ndtm",
        "steps": 50,
        "inner_steps": 4,
        "guidance": 1.0,
        "n": 4,
        "batch_size": 16,
    },  # fmt: skip
    "target": {"distance": "l2"},
    "prior": {"dtype": "fp32"},
    "references": {"count": 4, "candidates": 1024},
    "run": {"units_per_chunk": 64, "retries": 2},
    "baseline": {"pool_size": 1024},
}
REQUIRED = (("subject", "spec"), ("target", "spec"), ("prior", "path"))
METHODS = ("ndtm", "dps", "noise-opt")
PRIOR_DTYPES = ("fp32", "bf16", "fp16")  # the prior's weights (DiffusionPrior.accelerate)
SOURCES = ("files", "folder", "dataset")


@dataclass
class Plan:
    """A checked plan: ``settings`` holds every section with its defaults filled in; relative
    paths are resolved against ``root`` (the plan file's folder)."""

    settings: dict
    root: Path = field(default_factory=Path.cwd)
    source: str = "<dict>"

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and check a plan file: TOML, or JSON (the same tables) for a ``.json`` file."""
        p = Path(path)
        if p.is_dir():
            raise UserValueError(
                f"plan file {str(path)!r} is a folder; give a TOML plan file (or a .json one)"
            )
        if not p.is_file():
            raise MissingFileError(f"plan file {str(path)!r} does not exist")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserValueError(
                f"plan file {str(path)!r} is not a text TOML or JSON plan file (byte "
                f"{err.object[err.start]:#04x} at offset {err.start} is not UTF-8 text)"
            ) from None
        except OSError as err:
            raise UserValueError(f"cannot read plan file {str(path)!r}: {err.strerror}") from None
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserValueError(f"plan {str(path)!r} is not valid JSON: {err}") from None
            if not isinstance(data, dict):
                raise UserValueError(
                    f"plan {str(path)!r} must hold a JSON object of tables, got a "
                    f"{type(data).__name__}"
                )
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as err:
                raise UserValueError(f"plan {str(path)!r} is not valid TOML: {err}") from None
        return cls.from_dict(data, root=p.resolve().parent, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, root: str | Path = ".", source: str = "<dict>") -> Plan:
        """Check a plan given as a dict (the TOML's tables)."""
        settings: dict[str, Any] = {"name": data.get("name", Path(source).stem), "seed": 0}
        for key, value in data.items():
            if key in TOP_LEVEL:
                settings[key] = _typed(value, TOP_LEVEL[key], key, source)
            elif key in SCHEMA:
                if not isinstance(value, dict):
                    raise UserValueError(f"plan {source}: [{key}] must be a table")
                section = {**DEFAULTS.get(key, {})}
                for k, v in value.items():
                    if k not in SCHEMA[key]:
                        raise UserValueError(
                            f"plan {source}: unknown key {k!r} in [{key}]; valid: "
                            f"{sorted(SCHEMA[key])}"
                        )
                    section[k] = _typed(v, SCHEMA[key][k], f"{key}.{k}", source)
                if key == "sampler":  # a default stays (a store's normalised plan holds them)
                    unused = [
                        k
                        for k in IGNORED_BY.get(section["method"], ())
                        if k in value and value[k] != DEFAULTS["sampler"][k]
                    ]
                    if unused:  # they would be stored, hashed and change nothing
                        raise UserValueError(
                            f"plan {source}: [sampler] method {section['method']!r} does not use "
                            f"{', '.join(unused)}; leave {'them' if len(unused) > 1 else 'it'} out"
                        )
                settings[key] = section
            else:
                valid = sorted([*TOP_LEVEL, *SCHEMA])
                raise UserValueError(
                    f"plan {source}: unknown section or key {key!r}; valid: {valid}"
                )
        for name in ("sampler", "run", "references", "target", "prior"):
            settings.setdefault(name, dict(DEFAULTS.get(name, {})))
        for name, needed in REQUIRED:
            if needed not in settings.get(name, {}):
                raise UserValueError(f"plan {source}: [{name}] needs {needed} = ...")
        _check(settings, source)
        plan = cls(settings, Path(root), source)
        plan.sampler_config()  # every setting the sampler's config class checks, checked now
        return plan

    # ------------------------------------------------------------------ views
    def __getitem__(self, section: str) -> dict:
        return self.settings.get(section) or {}

    @property
    def seed(self) -> int:
        """The base seed of every sample."""
        return int(self.settings["seed"])

    def path(self, value: str) -> str:
        """A path of the plan, resolved against the plan's folder (ids such as ``zoo:...`` and
        ``color-mnist:test`` are left as they are)."""
        if ":" in value.split("/")[0] and not Path(value).exists():
            return value
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else self.root / p)

    def sampler_config(self):
        """The ``[sampler]`` settings as the sampler's own config (:class:`NDTMConfig`,
        :class:`DPSConfig` or :class:`NoiseOptConfig`), built as the run builds it, so a value
        the config refuses (``guidance = nan``, ``inner_steps = -1``) is a one-line error when
        the plan is read, not a crash of every chunk."""
        from ..errors import UserError

        s = self["sampler"]
        try:
            if s["method"] == "ndtm":
                from ..samplers.config import NDTMConfig

                return NDTMConfig(
                    num_steps=s["steps"], inner_steps=s["inner_steps"], guidance=s["guidance"]
                )
            if s["method"] == "dps":
                from ..samplers.dps import DPSConfig

                return DPSConfig(num_steps=s["steps"], guidance=s["guidance"])
            from ..samplers.noise_opt import NoiseOptConfig

            return NoiseOptConfig(num_steps=s["steps"])
        except UserError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise type(err)(f"plan {self.source}: [sampler] {first}") from None

    def fingerprint(self) -> dict:
        """What decides the samples (everything but the run's own bookkeeping)."""
        keep = {k: v for k, v in self.settings.items() if k not in ("run", "name")}
        keep["run"] = {"units_per_chunk": self["run"]["units_per_chunk"]}
        return keep

    def hash(self) -> str:
        """A short hash of :meth:`fingerprint`: a store accepts only its own plan."""
        text = json.dumps(self.fingerprint(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _typed(value: Any, kind: type, key: str, source: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UserValueError(f"plan {source}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _check(settings: dict, source: str) -> None:
    sampler, refs, run = settings["sampler"], settings["references"], settings["run"]
    if sampler["method"] not in METHODS:
        raise UserValueError(
            f"plan {source}: sampler.method {sampler['method']!r}; choose one of {list(METHODS)}"
        )
    for key in ("steps", "n", "batch_size"):
        if sampler[key] < 1:
            raise UserValueError(f"plan {source}: sampler.{key} must be >= 1, got {sampler[key]}")
    dtype = settings["prior"]["dtype"]
    if dtype not in PRIOR_DTYPES:
        raise UserValueError(
            f"plan {source}: prior.dtype {dtype!r}; choose one of {list(PRIOR_DTYPES)}"
        )
    given = [s for s in SOURCES if s in refs]
    if len(given) != 1:
        raise UserValueError(
            f"plan {source}: [references] needs exactly one of {list(SOURCES)}, got {given or 'none'}"
        )
    if "files" in refs and not refs["files"]:
        raise UserValueError(f"plan {source}: references.files is empty; list at least one image")
    if refs.get("top_k") is not None and refs["top_k"] < 1:
        raise UserValueError(f"plan {source}: references.top_k must be >= 1")
    if refs["count"] < 1:
        raise UserValueError(f"plan {source}: references.count must be >= 1")
    if run["units_per_chunk"] < 1 or run["retries"] < 0:
        raise UserValueError(
            f"plan {source}: run.units_per_chunk must be >= 1 and run.retries >= 0"
        )
