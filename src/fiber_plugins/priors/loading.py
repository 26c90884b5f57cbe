"""Load a `DiffusionPrior` from a diffusers folder or a Hugging Face Hub id."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from ..errors import MissingFileError, UserTypeError, UserValueError
from ..weights import check_safetensors
from ._files import PICKLE_SUFFIXES, read_json
from .prior import DENOISERS, DiffusionPrior
from .prompts import check_prompt_args, check_text_parts, encode_prompt, encode_prompt_sdxl
from .schedules import schedule_family

_DENOISER_DIRS = ("unet", "transformer")
_LAYOUT_HELP = (
    "a prior folder is what a diffusers pipeline's save_pretrained writes: 'scheduler/' "
    "(scheduler_config.json), 'unet/' or 'transformer/' (config.json + weights) and, for latent "
    "priors, 'vae/'"
)


# suffixes that mark a string as a file name, not a Hub id (Hub ids may contain dots: 'x/v1.5')
_FILE_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".yaml", ".yml", ".txt", ".npz",
    ".npy", ".pkl", ".onnx", ".gguf", ".zip", ".tar", ".gz",
)  # fmt: skip


def _looks_local(text: str) -> bool:
    """Whether a prior string that does not exist was meant as a local path, not a Hub id."""
    if text.startswith((".", "/", "~", "\\")) or text.count("/") != 1 or "\\" in text:
        return True
    if text.lower().endswith(_FILE_SUFFIXES) or Path(text).parent.is_dir():
        return True
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except ValueError:  # HFValidationError: characters a Hub id cannot have
        return True
    return False


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them at import)."""
    import os

    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which huggingface_hub says the Hub cannot be reached (offline, no network)."""
    from huggingface_hub import errors

    found: list[type[BaseException]] = [errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled]
    for name in ("httpx2", "httpx"):  # the HTTP client of the installed huggingface_hub
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "TransportError"):
            found.append(mod.TransportError)
    requests = sys.modules.get("requests")
    if requests is not None:
        found.append(requests.ConnectionError)
    return tuple(found)


def _resolve(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserValueError(f"prior {str(source)!r} is a file; {_LAYOUT_HELP}")
        return path
    text = str(source)
    if isinstance(source, str) and text.startswith("zoo:"):
        raise UserValueError(
            f"{text!r} names a shipped model, not a folder: load it with "
            f"fiber_plugins.zoo.load_prior({text[4:]!r}) and pass the prior itself"
        )
    if isinstance(source, Path) or _looks_local(text):
        raise MissingFileError(f"prior folder {text!r} does not exist; {_LAYOUT_HELP}")
    # a Hub id such as 'google/ddpm-cifar10-32': fetch configs and weights (needs the network,
    # or the Hub cache when offline)
    from huggingface_hub import errors, snapshot_download

    offline = _offline()
    try:
        return Path(
            snapshot_download(
                text,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                local_files_only=offline,
            )
        )
    except errors.RepositoryNotFoundError:  # also a gated or private repository without login
        raise UserValueError(
            f"prior {text!r} is neither a local folder nor a model on the Hugging Face Hub (a "
            "private or gated one needs 'hf auth login'); pass a local prior folder"
        ) from None
    except _unreachable_errors():
        why = "HF_HUB_OFFLINE is set" if offline else "no network"
        raise UserValueError(
            f"prior {text!r} is not a local folder, and the Hugging Face Hub cannot be reached "
            f"({why}) nor is it in the Hub cache; download it once where there is a network "
            f"('huggingface-cli download {text} --local-dir ./{text.rsplit('/', 1)[-1]}') and "
            "pass that folder"
        ) from None


def _check_weights(folder: Path) -> None:
    """Refuse pickled, truncated or misnamed weights before diffusers reads the folder."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    tensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if not tensors and pickles:
        raise UserValueError(
            f"prior weights {str(pickles[0])!r} are refused: pickles are not loaded (unpickling "
            "can run code); convert them to safetensors: load the model in a session you trust "
            "and save_pretrained(folder, safe_serialization=True)"
        )
    if not tensors:
        raise MissingFileError(
            f"prior folder {str(folder)!r} has a config.json but no weights (*.safetensors); "
            f"{_LAYOUT_HELP}"
        )
    for file in tensors:
        check_safetensors(file, what="prior weights file")
    if (
        not (folder / SAFETENSORS_WEIGHTS_NAME).is_file()
        and not (folder / SAFE_WEIGHTS_INDEX_NAME).is_file()
    ):
        raise UserValueError(
            f"prior folder {str(folder)!r} has weights {[p.name for p in tensors][:3]} but no "
            f"{SAFETENSORS_WEIGHTS_NAME!r} (a variant such as fp16 only?); re-save the model "
            "with save_pretrained(folder) and no variant"
        )


def _load_model(folder: Path, default_class: str | None = None):
    import diffusers

    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise MissingFileError(f"prior folder is missing {cfg_file}; {_LAYOUT_HELP}")
    _check_weights(folder)
    cls_name = read_json(cfg_file).get("_class_name", default_class)
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None:
        raise UserValueError(f"{cfg_file} names unknown diffusers class {cls_name!r}")
    try:
        return cls.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:
        # a config.json that does not match its weights: a ValueError with accelerate
        # installed, torch's "Error(s) in loading state_dict" RuntimeError without it
        if isinstance(err, RuntimeError) and "loading state_dict" not in str(err):
            raise
        # the first sentence only: diffusers goes on to suggest ignore_mismatched_sizes=True,
        # which would leave random weights in the prior
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        if isinstance(err, RuntimeError) and len(lines) > 1:
            lines = lines[1:]  # the first mismatching tensor, not the header
            m = re.match(
                r"size mismatch for (\S+): copying a param with shape (.+) from "
                r"checkpoint, the shape in current model is (.+?)\.?$",
                lines[0],
            )
            if m:  # said as the accelerate path says it
                lines[0] = (
                    f"{m.group(1)}: weights of shape {m.group(2)}, expected shape {m.group(3)}"
                )
        first = (lines or [type(err).__name__])[0].split(". ")[0][:300]
        raise UserValueError(
            f"diffusers cannot load {str(folder)!r} as {cls_name} ({first}); its config.json "
            "and weights must come from one save_pretrained"
        ) from None


def load_prior(
    source: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    conditioning: torch.Tensor | str | None = None,
    class_label: int | None = None,
    *,
    prompt: str | None = None,
    clip_skip: int | None = None,
    pooled: torch.Tensor | None = None,
) -> DiffusionPrior:
    """Load a prior from a local diffusers folder or a Hub id.

    The kind is detected from the folder: a ``FlowMatch*`` scheduler gives a flow-matching prior,
    a ``vae/`` folder a latent prior. A folder with a ``condition/`` subfolder is a trained
    conditional fiber model and loads as a :class:`~fiber_plugins.priors.ConditionalFiberModel`.

    Text-conditioned UNets (``UNet2DConditionModel``) sample with one fixed conditioning,
    computed once with the folder's own text encoder(s) exactly as the diffusers pipeline's
    ``encode_prompt`` computes it (needs ``transformers``):

    - SD 1.x / 2.x / SD-Turbo (``text_encoder/`` + ``tokenizer/``): the embedding of ``prompt``
      (default ``""``, the empty prompt), with the attention mask when the text encoder's config
      sets ``use_attention_mask``, and ``clip_skip`` as in diffusers (the hidden states
      ``clip_skip`` layers before the last, through the final layer norm);
    - SDXL-style UNets (``addition_embed_type="text_time"``; ``text_encoder/`` + ``tokenizer/``
      and ``text_encoder_2/`` + ``tokenizer_2/``): the concatenated penultimate hidden states of
      both encoders, the pooled embedding of ``text_encoder_2`` and the time ids (original size
      = target size = the prior's image size, crop (0, 0)), given to every denoiser call as
      ``added_cond_kwargs``.

    A folder without its text encoder(s) needs ``conditioning`` (a (1, L, D) tensor, or
    ``"zeros"``) and, for SDXL, ``pooled`` (1, P); ``prompt`` and ``conditioning`` exclude each
    other. A class-conditional ``UNet2DModel`` (``num_class_embeds``, e.g. a converted ADM
    ImageNet model) needs ``class_label``; a DiT takes one (default: its null class).

    Weights are read from ``*.safetensors`` only; a folder holding only pickles
    (``diffusion_pytorch_model.bin``) is refused, as is a scheduler outside
    ``schedules.DDPM_SCHEDULERS`` / ``schedules.FLOW_SCHEDULERS``. A string that looks like a path
    (more than one '/', a leading '.', '/' or '~', a file suffix, or an existing parent folder) is
    never sent to the Hub; a Hub id is fetched with ``snapshot_download`` (the cache only when
    ``HF_HUB_OFFLINE`` is set).

    Raises
    ------
    FileNotFoundError
        (:class:`~fiber_plugins.errors.MissingFileError`) a local folder or one of its parts is
        missing.
    ValueError
        (:class:`~fiber_plugins.errors.UserValueError`) truncated / corrupt or pickled weights, an
        unsupported scheduler, a Hub id that cannot be fetched, a text-conditioned UNet without
        text encoder or ``conditioning``, a class-conditional UNet without ``class_label``; one
        line each.

    Examples
    --------
    >>> prior = load_prior("path/to/ddpm-folder")                       # doctest: +SKIP
    >>> prior = load_prior("facebook/DiT-XL-2-256", class_label=207)     # doctest: +SKIP
    >>> prior = load_prior("path/to/sd-turbo", prompt="a photo of a dog")  # doctest: +SKIP
    """
    check_prompt_args(prompt, clip_skip)
    if device is not None:
        from .._utils import resolve_device

        device = resolve_device(str(device))  # an unknown or absent device: one line, first
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
        raise MissingFileError(
            f"prior folder {str(root)!r} is missing 'scheduler/scheduler_config.json'; {_LAYOUT_HELP}"
        )
    sched_cfg = read_json(sched_file)
    schedule_family(sched_cfg.get("_class_name"), str(sched_file))  # before loading any weights

    den_dir = next((root / d for d in _DENOISER_DIRS if (root / d).is_dir()), None)
    if den_dir is None and (root / "config.json").exists():
        den_dir = root
    if den_dir is None:
        raise MissingFileError(
            f"prior folder {str(root)!r} has no 'unet/' or 'transformer/' model; {_LAYOUT_HELP}"
        )
    den_cfg = read_json(den_dir / "config.json") if (den_dir / "config.json").is_file() else {}
    text_conditioned = den_cfg.get("_class_name") == "UNet2DConditionModel"
    if text_conditioned:  # before loading any weights: what the conditioning will be made of
        check_text_parts(root, den_cfg, conditioning, pooled, prompt, clip_skip)
    else:
        for what, value in (("prompt", prompt), ("clip_skip", clip_skip)):
            if value is not None:
                raise UserValueError(
                    f"{what}= is for text-conditioned priors (a UNet2DConditionModel with its "
                    f"text encoder); {str(den_dir)!r} holds a {den_cfg.get('_class_name')}: "
                    f"drop {what}="
                )
    denoiser = _load_model(den_dir)
    if type(denoiser).__name__ not in DENOISERS:
        raise UserTypeError(
            f"{den_dir} holds a {type(denoiser).__name__}; supported denoisers: {list(DENOISERS)}"
        )
    vae = _load_model(root / "vae") if (root / "vae").is_dir() else None
    if text_conditioned and conditioning is None:
        text = "" if prompt is None else prompt
        if den_cfg.get("addition_embed_type") == "text_time":
            conditioning, pooled = encode_prompt_sdxl(root, text, clip_skip, device)
        else:
            conditioning = encode_prompt(root, text, clip_skip, device)
    prior = DiffusionPrior(
        denoiser,
        sched_cfg,
        vae=vae,
        conditioning=conditioning,
        class_label=class_label,
        pooled=pooled,
    )
    if device is not None or dtype is not None:
        prior.to(device=device, dtype=dtype)
    return prior
