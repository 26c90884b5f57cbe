"""Load a `DiffusionPrior` from a diffusers folder or a Hugging Face Hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .prior import DENOISERS, DiffusionPrior

_DENOISER_DIRS = ("unet", "transformer")
_LAYOUT_HELP = (
    "a prior folder is what a diffusers pipeline's save_pretrained writes: 'scheduler/' "
    "(scheduler_config.json), 'unet/' or 'transformer/' (config.json + weights) and, for latent "
    "priors, 'vae/'"
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def _resolve(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"prior {str(source)!r} is a file; {_LAYOUT_HELP}")
        return path
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"prior folder {text!r} does not exist; {_LAYOUT_HELP}")
    # a Hub id such as 'google/ddpm-cifar10-32': fetch configs and weights (needs the network)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            text,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
        )
    )


def _load_model(folder: Path, default_class: str | None = None):
    import diffusers

    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"prior folder is missing {cfg_file}; {_LAYOUT_HELP}")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(
            f"prior folder {folder} has a config.json but no weights (*.safetensors); {_LAYOUT_HELP}"
        )
    cls_name = _read_json(cfg_file).get("_class_name", default_class)
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None:
        raise ValueError(f"{cfg_file} names unknown diffusers class {cls_name!r}")
    return cls.from_pretrained(folder)


def load_prior(
    source: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    conditioning: torch.Tensor | None = None,
    class_label: int | None = None,
) -> DiffusionPrior:
    """Load a prior from a local diffusers folder or a Hub id.

    The kind is detected from the folder: a ``FlowMatch*`` scheduler gives a flow-matching prior,
    a ``vae/`` folder a latent prior. For a ``UNet2DConditionModel`` the empty-prompt embedding is
    computed with the folder's ``text_encoder``/``tokenizer`` when both exist (needs
    ``transformers``), else ``conditioning`` or zeros are used. A folder with a ``condition/``
    subfolder is a trained conditional fiber model and loads as a
    :class:`~fiber_plugins.priors.ConditionalFiberModel`.

    Examples
    --------
    >>> prior = load_prior("path/to/ddpm-folder")            # doctest: +SKIP
    >>> prior = load_prior("facebook/DiT-XL-2-256")           # doctest: +SKIP
    """
    root = _resolve(source)
    from .conditional import ConditionalFiberModel, is_fiber_model_folder

    if is_fiber_model_folder(root):  # a trained conditional fiber model (has condition/)
        model = ConditionalFiberModel.from_pretrained(root)
        return model.to(device=device, dtype=dtype) if device or dtype else model
    sched_dir = root / "scheduler"
    sched_file = sched_dir / "scheduler_config.json"
    if not sched_file.exists():
        sched_file = root / "scheduler_config.json"  # a single-model folder
    if not sched_file.exists():
        raise FileNotFoundError(
            f"prior folder {str(root)!r} is missing 'scheduler/scheduler_config.json'; {_LAYOUT_HELP}"
        )
    sched_cfg = _read_json(sched_file)

    den_dir = next((root / d for d in _DENOISER_DIRS if (root / d).is_dir()), None)
    if den_dir is None and (root / "config.json").exists():
        den_dir = root
    if den_dir is None:
        raise FileNotFoundError(
            f"prior folder {str(root)!r} has no 'unet/' or 'transformer/' model; {_LAYOUT_HELP}"
        )
    denoiser = _load_model(den_dir)
    if type(denoiser).__name__ not in DENOISERS:
        raise TypeError(
            f"{den_dir} holds a {type(denoiser).__name__}; supported denoisers: {list(DENOISERS)}"
        )
    vae = _load_model(root / "vae") if (root / "vae").is_dir() else None
    if (
        conditioning is None
        and type(denoiser).__name__ == "UNet2DConditionModel"
        and (root / "text_encoder").is_dir()
        and (root / "tokenizer").is_dir()
    ):
        conditioning = _empty_prompt_embedding(root)
    prior = DiffusionPrior(
        denoiser, sched_cfg, vae=vae, conditioning=conditioning, class_label=class_label
    )
    if device is not None or dtype is not None:
        prior.to(device=device, dtype=dtype)
    return prior


def _empty_prompt_embedding(root: Path) -> torch.Tensor:
    from .._utils import require

    transformers = require("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
    enc = transformers.AutoModel.from_pretrained(root / "text_encoder")
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return enc(ids.input_ids)[0]
