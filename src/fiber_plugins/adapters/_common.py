"""What the hf and open_clip adapters share: offline Hub access and the lazy transformers
import used while loading, the first line of a loader's error for one-line messages, and the
wrapper module that holds the user's model and the default label of their objectives."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from .._utils import require
from ..objectives.selection import Index
from .lens import Token


def _transformers() -> Any:
    return require("transformers")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Turn Hugging Face Hub access off for the block (``HF_HUB_OFFLINE``), restored after.

    transformers and open_clip read files through ``huggingface_hub``; inside this block every
    read is served from local files or the local cache, and a missing file is an error instead
    of a download.
    """
    try:
        constants: Any = importlib.import_module("huggingface_hub.constants")
    except ImportError:  # no hub client installed: nothing can be downloaded anyway
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


class _Wrapper(nn.Module):
    """Holds the user's model as a submodule, so that FiberObjective.attached() freezes and
    restores it; the wrapper's own train flag is not the user's (``_fiber_wrapper``)."""

    _fiber_wrapper = True
    model: Any

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training


def _label(model: nn.Module, output: str, token: Token | None, index: Index) -> str:
    label = f"{type(model).__name__}:{output}"
    if token is not None:
        label += f":{token}"
    if index is not None and not callable(index):
        label += f"[{index}]"
    return label
