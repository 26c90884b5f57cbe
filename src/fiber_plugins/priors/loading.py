"""Load a `DiffusionPrior` from a diffusers folder or a Hugging Face Hub id."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from ..errors import MissingFileError, UserTypeError, UserValueError
from ..weights import check_safetensors
from .prior import DENOISERS, DiffusionPrior
from .schedules import schedule_family

_DENOISER_DIRS = ("unet", "transformer")
_LAYOUT_HELP = (
    "a prior folder is what a diffusers pipeline's save_pretrained writes: 'scheduler/' "
    "(scheduler_config.json), 'unet/' or 'transformer/' (config.json + weights) and, for latent "
    "priors, 'vae/'"
)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserValueError(f"{path} is not valid JSON ({err}); re-save it") from None
    if not isinstance(data, dict):
        raise UserValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object; re-save it"
        )
    return data


# suffixes that mark a string as a file name, not a Hub id (Hub ids may contain dots: 'x/v1.5')
_FILE_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".yaml", ".yml", ".txt", ".npz",
    ".npy", ".pkl", ".onnx", ".gguf", ".zip", ".tar", ".gz",
)  # fmt: skip
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
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
    cls_name = _read_json(cfg_file).get("_class_name", default_class)
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
    _check_prompt_args(prompt, clip_skip)
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
    sched_cfg = _read_json(sched_file)
    schedule_family(sched_cfg.get("_class_name"), str(sched_file))  # before loading any weights

    den_dir = next((root / d for d in _DENOISER_DIRS if (root / d).is_dir()), None)
    if den_dir is None and (root / "config.json").exists():
        den_dir = root
    if den_dir is None:
        raise MissingFileError(
            f"prior folder {str(root)!r} has no 'unet/' or 'transformer/' model; {_LAYOUT_HELP}"
        )
    den_cfg = _read_json(den_dir / "config.json") if (den_dir / "config.json").is_file() else {}
    text_conditioned = den_cfg.get("_class_name") == "UNet2DConditionModel"
    if text_conditioned:  # before loading any weights: what the conditioning will be made of
        _check_text_parts(root, den_cfg, conditioning, pooled, prompt, clip_skip)
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
            conditioning, pooled = _encode_prompt_sdxl(root, text, clip_skip, device)
        else:
            conditioning = _encode_prompt(root, text, clip_skip, device)
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


# ---------------------------------------------------------------------- text conditioning
# (tokenizer folder, text encoder folder) of SD 1.x/2.x and of SDXL's second encoder
_SD_PARTS = ("tokenizer", "text_encoder")
_SDXL_PARTS = ("tokenizer_2", "text_encoder_2")


def _check_prompt_args(prompt: object, clip_skip: object) -> None:
    if prompt is not None and not isinstance(prompt, str):
        raise UserTypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if clip_skip is not None and (
        isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0
    ):
        raise UserValueError(
            f"clip_skip must be an int >= 0 (layers skipped from the text encoder's end, as in "
            f"diffusers; 1: the penultimate layer), got {clip_skip!r}"
        )


def _has_parts(root: Path, parts: tuple[str, str]) -> bool:
    return all((root / p).is_dir() for p in parts)


def _check_text_parts(
    root: Path,
    den_cfg: dict,
    conditioning: object,
    pooled: object,
    prompt: str | None,
    clip_skip: int | None,
) -> None:
    """One line when the folder cannot make the conditioning that was asked for."""
    sdxl = den_cfg.get("addition_embed_type") == "text_time"
    parts = _SDXL_PARTS if sdxl else _SD_PARTS
    names = f"{parts[1]}/ + {parts[0]}/"
    if conditioning is not None:
        for what, value in (("prompt", prompt), ("clip_skip", clip_skip)):
            if value is not None:
                raise UserValueError(
                    f"{what}= and conditioning= exclude each other ({what} is encoded by the "
                    "folder's text encoder, conditioning replaces it); give one of them"
                )
        return  # DiffusionPrior checks its shape (and pooled= for SDXL)
    if pooled is not None:
        raise UserValueError(
            "pooled= goes with conditioning= (both come from the same prompt); give both, or "
            "neither to encode the prompt with the folder's text encoders"
        )
    if not _has_parts(root, parts):
        dim = den_cfg.get("encoder_hid_dim") or den_cfg.get("cross_attention_dim")
        dim = dim if isinstance(dim, int) else "D"
        what = f"prompt={prompt!r} needs" if prompt is not None else "its conditioning comes from"
        extra = " and pooled= (the (1, P) pooled text embedding)" if sdxl else ""
        kind = "an SDXL-style (addition_embed_type 'text_time')" if sdxl else "a"
        raise UserValueError(
            f"prior folder {str(root)!r} has {kind} UNet2DConditionModel but no {names} "
            f"({what} the text encoder); pass conditioning= (a (1, L, {dim}) text embedding "
            f"tensor){extra}, or use a full pipeline folder (with {names})"
        )
    if sdxl:
        index = root / "model_index.json"
        if index.is_file() and _read_json(index).get("requires_aesthetics_score"):
            raise UserValueError(
                f"prior folder {str(root)!r} is an SDXL refiner (requires_aesthetics_score: its "
                "time ids hold an aesthetic score, and it is trained for the last denoising "
                "steps only); use an SDXL base folder"
            )


def _component_class(root: Path, sub: str, default: str):
    """The transformers class of ``root/sub``: model_index.json's, else config.json's
    ``architectures``, else ``default`` (an Auto class)."""
    transformers = _transformers()
    name = None
    index = root / "model_index.json"
    if index.is_file():
        entry = _read_json(index).get(sub)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers":
            name = entry[1]
    config = root / sub / "config.json"
    if name is None and sub.startswith("text_encoder") and config.is_file():
        names = _read_json(config).get("architectures") or [None]
        name = names[0]
    cls = getattr(transformers, str(name), None) if name else None
    return cls if cls is not None else getattr(transformers, default)


def _transformers():
    from .._utils import require

    return require("transformers")


def _load_tokenizer(root: Path, sub: str):
    cls = _component_class(root, sub, "AutoTokenizer")
    try:
        return cls.from_pretrained(root / sub)
    except (OSError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserValueError(
            f"transformers cannot load the tokenizer in {str(root / sub)!r} ({first}); re-save "
            "it with the pipeline's save_pretrained"
        ) from None


def _load_text_encoder(root: Path, sub: str, device: torch.device | None):
    folder = root / sub
    tensors = sorted(folder.glob("*.safetensors"))
    if not tensors:
        pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise UserValueError(
                f"text encoder weights {str(pickles[0])!r} are refused: pickles are not loaded "
                "(unpickling can run code); convert them to safetensors: load the model in a "
                "session you trust and save_pretrained(folder, safe_serialization=True)"
            )
        raise MissingFileError(
            f"text encoder folder {str(folder)!r} has no weights (*.safetensors); re-save the "
            "pipeline with save_pretrained"
        )
    for file in tensors:
        check_safetensors(file, what="text encoder weights file")
    cls = _component_class(root, sub, "AutoModel")
    bars = _transformers().utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # a bar per (small) text encoder is noise on the command line
    try:
        # float32 whatever the checkpoint's dtype (transformers 5 keeps it by default): the
        # embedding is computed once, and fp16 weights upcast exactly
        encoder = cls.from_pretrained(folder, use_safetensors=True).float()
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserValueError(
            f"transformers cannot load {str(folder)!r} as {cls.__name__} ({first}); its "
            "config.json and weights must come from one save_pretrained"
        ) from None
    finally:
        if shown:
            bars.enable_progress_bar()
    return encoder.to(device or "cpu").eval().requires_grad_(False)


def _tokenize(tokenizer, prompt: str, folder: Path):
    """The pipeline's tokenization: padded to model_max_length, truncated (with its warning)."""
    from .._utils import warn

    length = tokenizer.model_max_length
    inputs = tokenizer(
        prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    n = len(tokenizer(prompt).input_ids)
    if n > length:
        warn(
            f"the prompt is {n} tokens; {str(folder)!r} reads the first {length} (the rest is "
            "dropped, as the diffusers pipeline drops it)"
        )
    return inputs


def _hidden_state(out, index: int, clip_skip: int, folder: Path) -> torch.Tensor:
    states = out.hidden_states
    if index > len(states):
        raise UserValueError(
            f"clip_skip={clip_skip} skips more layers than the text encoder in {str(folder)!r} "
            f"has ({len(states) - 1})"
        )
    return states[-index]


def _encode_prompt(
    root: Path, prompt: str, clip_skip: int | None, device: torch.device | None
) -> torch.Tensor:
    """(1, L, D): StableDiffusionPipeline.encode_prompt(prompt, ..., clip_skip)[0]."""
    tokenizer = _load_tokenizer(root, "tokenizer")
    encoder = _load_text_encoder(root, "text_encoder", device)
    dev = encoder.device
    inputs = _tokenize(tokenizer, prompt, root / "tokenizer")
    ids = inputs.input_ids.to(dev)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(dev)
    with torch.no_grad():
        if clip_skip is None:
            embeds = encoder(ids, attention_mask=mask)[0]
        else:
            # the final layer norm, as the pipeline applies it (transformers 5's CLIPTextModel
            # holds it directly, older ones in .text_model)
            norm = getattr(encoder, "final_layer_norm", None) or getattr(
                getattr(encoder, "text_model", None), "final_layer_norm", None
            )
            if norm is None:
                raise UserValueError(
                    f"clip_skip= needs a CLIP text encoder (with a final_layer_norm); "
                    f"{str(root / 'text_encoder')!r} holds a {type(encoder).__name__}: drop "
                    "clip_skip="
                )
            out = encoder(ids, attention_mask=mask, output_hidden_states=True)
            embeds = norm(_hidden_state(out, clip_skip + 1, clip_skip, root / "text_encoder"))
    return embeds.float().cpu()


def _encode_prompt_sdxl(
    root: Path, prompt: str, clip_skip: int | None, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """((1, L, D1 + D2), (1, P)): StableDiffusionXLPipeline.encode_prompt's prompt_embeds and
    pooled_prompt_embeds (the penultimate hidden states, or ``clip_skip`` more layers back)."""
    parts = [_SD_PARTS] if _has_parts(root, _SD_PARTS) else []
    parts.append(_SDXL_PARTS)
    states, pooled = [], None
    for tok_dir, enc_dir in parts:
        tokenizer = _load_tokenizer(root, tok_dir)
        encoder = _load_text_encoder(root, enc_dir, device)
        ids = _tokenize(tokenizer, prompt, root / tok_dir).input_ids.to(encoder.device)
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:  # the projection (CLIPTextModelWithProjection)
            pooled = out[0]
        skip = 0 if clip_skip is None else clip_skip
        states.append(_hidden_state(out, skip + 2, skip, root / enc_dir))
        del encoder
    if pooled is None:
        raise UserValueError(
            f"{str(root / 'text_encoder_2')!r} gives no pooled text embedding (an SDXL pipeline "
            "needs a CLIPTextModelWithProjection there); re-save the pipeline, or pass "
            "conditioning= and pooled="
        )
    return torch.cat(states, dim=-1).float().cpu(), pooled.float().cpu()
