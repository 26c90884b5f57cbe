"""The one table of shipped models, filled by :func:`register_model` (timm's pattern).

Each shipped model is a loader function decorated with its name; :func:`list_models`,
:func:`~fiber_plugins.zoo.load`, :func:`~fiber_plugins.zoo.asset_dir` and the table in the
package docstring all read this table, so adding a model is one decorated function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserKeyError

# loader(folder, device) -> model: the folder holds the weights; device is None (leave the
# model where it was built, the CPU) or a device name / torch.device
Loader = Callable[[Path, Any], Any]


@dataclass(frozen=True)
class ZooEntry:
    """One shipped model: its name, where its weights live and how they are loaded.

    name: the name ``zoo.load`` takes (``color-mnist-prior``).
    folder: the weights' folder under the package's ``assets/`` (``color_mnist/prior``).
    train: the ``fiber-plugins train`` model that writes the folder (``prior``).
    loader: ``loader(folder, device) -> model``.
    summary: one line for the table of models (the loader's docstring's first line).
    prior: whether the model is a prior for the samplers (a ``DiffusionPrior`` or a conditional
        fiber model), which ``--prior zoo:NAME`` and plans' ``prior.path`` accept.
    input_size: (C, H, W) of the images a subject model takes (``fiber-plugins targets`` runs
        one forward pass of that size); None for models that are not subjects.
    """

    name: str
    folder: str
    train: str
    loader: Loader
    summary: str
    prior: bool = False
    input_size: tuple[int, int, int] | None = None


_MODELS: dict[str, ZooEntry] = {}


def register_model(
    name: str,
    *,
    folder: str,
    train: str,
    prior: bool = False,
    input_size: tuple[int, int, int] | None = None,
) -> Callable[[Loader], Loader]:
    """Decorator: add ``loader(folder, device) -> model`` to the zoo under ``name``.

    >>> @register_model("color-mnist-classifier", folder="color_mnist/classifier",
    ...                 train="classifier")  # doctest: +SKIP
    ... def color_mnist_classifier(folder, device):
    ...     '''small CNN digit classifier on coloured images'''
    ...     return load_state(DigitCNN(), folder, device)
    """

    def add(loader: Loader) -> Loader:
        if name in _MODELS:
            raise ValueError(f"zoo model {name!r} is registered twice")
        summary = (loader.__doc__ or "").strip().splitlines()
        _MODELS[name] = ZooEntry(
            name,
            folder,
            train,
            loader,
            summary[0] if summary else "",
            prior=prior,
            input_size=input_size,
        )
        return loader

    return add


def list_models() -> list[str]:
    """The names of the shipped models, in the order they were registered."""
    return list(_MODELS)


def model_entry(name: str) -> ZooEntry:
    """The table's entry for ``name``; an unknown name raises with close names and the list."""
    if name not in _MODELS:
        from .._utils import suggest

        raise UserKeyError(
            f"unknown shipped model {name!r}{suggest(name, _MODELS)}; available: {list(_MODELS)}"
        )
    return _MODELS[name]


def prior_names() -> list[str]:
    """The names of the shipped priors (``prior=True``), in the order they were registered."""
    return [e.name for e in _MODELS.values() if e.prior]


def trainers() -> dict[str, str]:
    """``fiber-plugins train`` model -> the folder it writes under the package's ``assets/``
    (models that share weights, like the subject and the autoencoder, share one trainer)."""
    return {e.train: e.folder for e in _MODELS.values()}


def models_table() -> str:
    """The reStructuredText table of every registered model (name, what it is)."""
    rows = [(f"``{e.name}``", e.summary) for e in _MODELS.values()]
    width = max(len(r[0]) for r in rows) if rows else 4
    rule = f"{'=' * width}  {'=' * 58}"
    lines = [rule, f"{'name':{width}s}  what", rule]
    lines += [f"{n:{width}s}  {s}" for n, s in rows]
    return "\n".join([*lines, rule])
