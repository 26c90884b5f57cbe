"""Reading the files of a model folder (diffusers, transformers) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserValueError

# weight files that hold pickles: never loaded, the user is asked for safetensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_json(path: Path) -> dict:
    """A JSON object from a config file; a one-line error if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserValueError(f"{path} is not valid JSON ({err}); re-save it") from None
    if not isinstance(data, dict):
        raise UserValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object; re-save it"
        )
    return data
