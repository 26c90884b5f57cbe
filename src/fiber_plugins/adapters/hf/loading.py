"""`hf_subject`: a transformers vision model and its image processor read offline from a local
folder (or the local Hugging Face cache), the class to load chosen from ``config.json`` (a
multimodal model's vision tower), and `is_hf_model`, which recognises a transformers model."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._utils import suggest, warn
from ...errors import MissingFileError, UserTypeError, UserValueError
from ...objectives.preprocess import Preprocess, as_preprocess
from .._common import _first_line, _transformers, hub_offline
from .preprocessing import preprocess_from_processor


@contextlib.contextmanager
def _quiet(tf: Any) -> Iterator[None]:
    """transformers' loading reports and progress bars off for the block (restored after): the
    adapter reports what matters (missing weights) as one warning of its own."""
    logging = tf.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def is_hf_model(model: object) -> bool:
    """Whether ``model`` is a transformers model (an instance of a class defined in transformers,
    or a subclass of one); transformers itself is not imported."""
    return isinstance(model, nn.Module) and any(
        c.__module__.startswith("transformers.") for c in type(model).__mro__
    )


def _load_processor(folder: str | None, what: str) -> Any:
    tf = _transformers()
    if not folder:
        raise UserValueError(
            f"{what} has no folder to read its image processor from; pass processor= or "
            "preprocess=Preprocess(...)"
        )
    try:
        with hub_offline(), _quiet(tf):
            return tf.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserValueError(
            f"no image processor for {what} in {folder!r} ({_first_line(err)[:120]}); "
            "save it next to config.json with processor.save_pretrained(folder), or pass "
            "processor= / preprocess=Preprocess(...)"
        ) from None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def _model_class(tf: Any, config: Any, model_class: Any) -> tuple[Any, Any]:
    """(class to load, config to load it with): the class ``config.architectures`` names, or a
    multimodal model's vision tower (CLIPModel -> CLIPVisionModelWithProjection, SiglipModel ->
    SiglipVisionModel), or ``AutoModel``."""
    if model_class is not None:
        if isinstance(model_class, str):
            cls = getattr(tf, model_class, None)
            if not isinstance(cls, type):
                names = [n for n in dir(tf) if n.endswith(("Model", "Classification"))]
                raise UserValueError(
                    f"unknown transformers class {model_class!r}{suggest(model_class, names)}"
                )
            return cls, None
        return model_class, None
    archs = list(getattr(config, "architectures", None) or [])
    name = archs[0] if archs else None
    vision = getattr(config, "vision_config", None)
    if name and name.endswith("Model") and vision is not None:
        prefix = name[: -len("Model")]
        for candidate in (f"{prefix}VisionModelWithProjection", f"{prefix}VisionModel"):
            cls = getattr(tf, candidate, None)
            if isinstance(cls, type):
                vision = type(vision).from_dict(vision.to_dict())
                if candidate.endswith("WithProjection") and hasattr(config, "projection_dim"):
                    vision.projection_dim = config.projection_dim
                return cls, vision
    cls = getattr(tf, name, None) if name else None
    if isinstance(cls, type):
        return cls, config
    return tf.AutoModel, config


def hf_subject(
    path_or_model: str | Path | nn.Module,
    model_class: str | type | None = None,
    processor: Any = None,
    preprocess: Preprocess | dict | None = None,
) -> tuple[nn.Module, Preprocess]:
    """A transformers vision model from a local folder and the :class:`Preprocess` it expects.

    Parameters
    ----------
    path_or_model:
        A folder written by ``save_pretrained`` or ``huggingface-cli download ... --local-dir``
        (``config.json``, weights, ``preprocessor_config.json``), a Hub id that is already in
        the local Hugging Face cache, or a loaded transformers model (left as it is). Loaded
        with ``local_files_only=True`` in float32 and put in eval mode; nothing is downloaded.
    model_class:
        The transformers class (or its name) to load; default: the class in
        ``config.architectures`` (``ViTForImageClassification``, ``Dinov2Model``, ...), and for
        a multimodal folder (``CLIPModel``, ``SiglipModel``) its vision tower
        (``CLIPVisionModelWithProjection``, ``SiglipVisionModel``).
    processor:
        The image processor; default: ``AutoImageProcessor.from_pretrained(folder)``.
    preprocess:
        A :class:`Preprocess` (or dict) to use instead of the processor's.

    Returns
    -------
    (model, preprocess)
        The model in eval mode and :func:`preprocess_from_processor` of its processor.

    Raises
    ------
    MissingFileError
        A folder path that does not exist.
    UserValueError
        A folder without ``config.json`` or weights, a Hub id not in the cache (the message
        says how to download it once), a model that takes no ``pixel_values``, or no image
        processor.
    """
    tf = _transformers()
    if isinstance(path_or_model, nn.Module):
        if not is_hf_model(path_or_model):
            raise UserTypeError(
                f"{type(path_or_model).__name__} is not a transformers model; use "
                "FiberObjective(model, ...) for other modules"
            )
        model = path_or_model
        folder = getattr(model, "name_or_path", None) or None
    elif isinstance(path_or_model, (str, Path)):
        model, folder = _load_model(tf, str(path_or_model), model_class)
    else:
        raise UserTypeError(
            f"path_or_model must be a folder, a Hub id or a transformers model, got "
            f"{type(path_or_model).__name__}"
        )
    if preprocess is not None:
        return model, as_preprocess(preprocess)
    if processor is None:
        processor = _load_processor(folder, type(model).__name__)
    return model, preprocess_from_processor(processor)


def _load_model(tf: Any, text: str, model_class: Any) -> tuple[nn.Module, str]:
    path = Path(text).expanduser()
    if path.is_file():
        raise UserValueError(
            f"Hugging Face model {text!r} is a file; give the folder that holds config.json"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserValueError(
                f"Hugging Face model folder {text!r} has no config.json; give a folder written "
                "by save_pretrained or `huggingface-cli download ORG/NAME --local-dir FOLDER`"
            )
        source, hub_id = str(path), False
    elif _looks_like_path(text):
        raise MissingFileError(
            f"Hugging Face model folder {text!r} does not exist; give a folder written by "
            "save_pretrained (config.json, model.safetensors, preprocessor_config.json)"
        )
    else:
        source, hub_id = text, True  # a Hub id: only the local cache is read
    tail = text.rstrip("/").split("/")[-1] or "model"
    try:
        with hub_offline(), _quiet(tf):
            config = tf.AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as err:
        if hub_id:
            raise UserValueError(
                f"Hugging Face model {text!r}: no such folder here and not in the local Hugging "
                f"Face cache (fiber-plugins never downloads); download it once with "
                f"`huggingface-cli download {text} --local-dir ./{tail}` and use the folder "
                f"./{tail}"
            ) from None
        raise UserValueError(
            f"cannot read the config of {text!r} ({_first_line(err)[:160]})"
        ) from None
    except (ValueError, KeyError) as err:
        raise UserValueError(
            f"transformers {tf.__version__} cannot read the config of {text!r} "
            f"({_first_line(err)[:120]}); remote code is never run: upgrade transformers or "
            "load the model yourself and pass it"
        ) from None
    cls, cls_config = _model_class(tf, config, model_class)
    if "pixel_values" not in inspect.signature(cls.forward).parameters:
        raise UserValueError(
            f"{cls.__name__} (from {text!r}) takes no pixel_values: it is not a vision model; "
            "give a vision model folder or model_class= a vision class"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if cls_config is not None:
        kwargs["config"] = cls_config
    try:
        with hub_offline(), _quiet(tf):
            model, info = cls.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserValueError(
            f"cannot load {cls.__name__} from {text!r} ({_first_line(err)[:160]}); the folder "
            "needs config.json and its weights (model.safetensors)"
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        warn(
            f"{len(missing)} weight(s) of {cls.__name__} are not in {text!r} and were initialised "
            f"at random (e.g. {missing[:3]}); outputs that use them are meaningless"
        )
    return model.eval(), source
