"""A text prompt to the fixed conditioning of a Stable Diffusion prior, with the folder's own
tokenizer and text encoder(s) (transformers), as the diffusers pipelines encode it: SD 1.x/2.x
(one encoder) and SDXL (two encoders, the pooled embedding of the second)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MissingFileError, UserTypeError, UserValueError
from ..weights import check_safetensors
from ._files import PICKLE_SUFFIXES, read_json

# (tokenizer folder, text encoder folder) of SD 1.x/2.x and of SDXL's second encoder
_SD_PARTS = ("tokenizer", "text_encoder")
_SDXL_PARTS = ("tokenizer_2", "text_encoder_2")


def check_prompt_args(prompt: object, clip_skip: object) -> None:
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


def check_text_parts(
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
        if index.is_file() and read_json(index).get("requires_aesthetics_score"):
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
        entry = read_json(index).get(sub)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers":
            name = entry[1]
    config = root / sub / "config.json"
    if name is None and sub.startswith("text_encoder") and config.is_file():
        names = read_json(config).get("architectures") or [None]
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
        pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
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


def encode_prompt(
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


def encode_prompt_sdxl(
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
