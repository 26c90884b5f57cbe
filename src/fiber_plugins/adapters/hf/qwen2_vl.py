"""Qwen2-VL's vision tower as a subject: only its weights read from a full checkpoint folder, the
image processor's smart resize and patch layout redone differentiably in torch, and an objective
on its merged embeddings or hidden states (one tower call for the whole batch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._utils import require, suggest
from ...errors import MissingFileError, UserKeyError, UserTypeError, UserValueError
from ...objectives.distances import Distance
from ...objectives.preprocess import Preprocess
from ...objectives.selection import Index
from .._common import _first_line, _label, _transformers, _Wrapper, hub_offline
from ..lens import Token
from .loading import _load_processor, _quiet
from .objective import OutputObjective, check_output_token
from .outputs import _HIDDEN, _choices
from .qwen2_vl_preprocessing import Qwen2VLPreprocess, _pair

_DOWNLOAD = "huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir ./Qwen2-VL-2B-Instruct"
_MODELING = "transformers.models.qwen2_vl.modeling_qwen2_vl"


def _vision_weights(folder: Path, expected: set[str]) -> dict[str, torch.Tensor]:
    """The tower's tensors (keys ``visual.*`` or ``model.visual.*``, prefix removed) from the
    folder's safetensors files; strict: a missing or unexpected key is an error."""
    safe_open, where = require("safetensors").safe_open, str(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in [*folder.glob("*.bin"), *folder.glob("*.pt")])
        why = f"only pickle weights ({pickled[0]}), never unpickled" if pickled else "no weights"
        raise UserValueError(f"{where!r} has {why}; it needs *.safetensors: `{_DOWNLOAD}`")
    keys: dict[str, Path] = {}
    for file in files:  # reads the headers only
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    prefix = next(
        (p for p in ("model.visual.", "visual.") if any(k.startswith(p) for k in keys)), ""
    )
    if not prefix:
        raise UserValueError(
            f"no vision weights (visual.* or model.visual.*) in {where!r}; `{_DOWNLOAD}`"
        )
    found = {k[len(prefix) :]: f for k, f in keys.items() if k.startswith(prefix)}
    found = {k: f for k, f in found.items() if not k.endswith("inv_freq")}  # not persistent
    for what, bad in (("missing", expected - set(found)), ("unexpected", set(found) - expected)):
        if bad:
            raise UserValueError(
                f"{len(bad)} {what} vision weight(s) in {where!r}, the first "
                f"{prefix}{sorted(bad)[0]}; config.json does not match the weights"
            )
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(found.values())):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            out.update({k: f.get_tensor(prefix + k) for k, at in found.items() if at == file})
    return out


def qwen2_vl_vision_subject(
    folder: str | Path, dtype: torch.dtype | str | None = None
) -> tuple[nn.Module, Qwen2VLPreprocess]:
    """Qwen2-VL's vision tower and its preprocessing, from a local full-model folder.

    Only ``Qwen2VisionTransformerPretrainedModel(config.vision_config)`` is built and only its
    weights are read (never the language model); nothing is downloaded or unpickled.

    Parameters
    ----------
    folder:
        Written by ``save_pretrained`` of a Qwen2-VL model or by ``huggingface-cli download
        Qwen/Qwen2-VL-2B-Instruct --local-dir FOLDER``: ``config.json`` (model_type
        ``qwen2_vl``), ``*.safetensors`` (sharded or not), ``preprocessor_config.json``.
    dtype:
        The tower's dtype (a torch dtype or its name); default float32.

    Returns
    -------
    (model, preprocess)
        The tower in eval mode (``model(hidden_states=(N, C*T*P*P), grid_thw=(B, 3))``) and
        its :class:`Qwen2VLPreprocess`.

    Raises
    ------
    MissingFileError
        ``folder`` does not exist.
    UserValueError
        No config.json, not Qwen2-VL, no preprocessor_config.json, no safetensors, or a
        missing or unexpected vision weight (the first is named).
    """
    tf = _transformers()
    path, where = Path(folder).expanduser(), str(folder)
    if not path.exists():
        raise MissingFileError(f"Qwen2-VL folder {where!r} does not exist; `{_DOWNLOAD}`")
    if not (path / "config.json").is_file():
        raise UserValueError(f"{where!r} has no config.json; give the folder of `{_DOWNLOAD}`")
    try:
        kind = json.loads((path / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise UserValueError(f"cannot read {where}/config.json: {_first_line(err)}") from None
    if kind != "qwen2_vl":
        raise UserValueError(
            f"{where!r} holds a {kind!r} model, not Qwen2-VL (model_type 'qwen2_vl'); use "
            f"hf_subject(folder) for other vision models, or `{_DOWNLOAD}`"
        )
    if not (path / "preprocessor_config.json").is_file():
        raise UserValueError(
            f"{where!r} has no preprocessor_config.json (the image processor); save it with "
            f"processor.save_pretrained(folder) or `{_DOWNLOAD}`"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserValueError(f"dtype must be a float dtype such as torch.bfloat16, got {dtype!r}")
    with hub_offline(), _quiet(tf):
        config = tf.Qwen2VLConfig.from_pretrained(str(path), local_files_only=True)
        cls = require(_MODELING).Qwen2VisionTransformerPretrainedModel
        with require("transformers.initialization").no_init_weights():  # all read below
            model = cls._from_config(config.vision_config, dtype=dtype or torch.float32)
    try:
        model.load_state_dict(_vision_weights(path, set(model.state_dict())), strict=True)
    except RuntimeError as err:  # shapes
        raise UserValueError(f"the vision weights in {where!r} do not fit config.json") from err
    processor = _load_processor(str(path), "Qwen2-VL")
    return model.eval(), Qwen2VLPreprocess.from_processor(processor)


class _Tower(_Wrapper):
    """Images -> (smart resize) -> patches -> one tower call; returns its ``key`` output."""

    def __init__(self, model: nn.Module, qwen: Qwen2VLPreprocess, resize: bool, key: str):
        super().__init__(model)
        self.qwen, self.resize, self.key = qwen, resize, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:  # prior space -> normalised images at the processor's size
            x = self.qwen.at_size(self.qwen.size_for(*x.shape[-2:]))(x)
        patches, grid = self.qwen.patchify(x)
        return self.model(hidden_states=patches, grid_thw=grid)[self.key]


class Qwen2VLObjective(OutputObjective):
    """:class:`OutputObjective` on Qwen2-VL's vision tower (built by :func:`qwen2_vl_objective`).

    The tower's (B*tokens, D) output, or a hooked block's, is read back as (B, tokens, D) before
    the token reduction and the index. Without a fixed ``image_size`` the smart resize runs in
    the subject and :attr:`preprocess` is the identity.

    Parameters
    ----------
    *args, **kwargs:
        :class:`OutputObjective`'s.
    qwen:
        The :class:`Qwen2VLPreprocess`, stored by :meth:`describe`.
    image_size:
        The fixed (H, W) model input, or ``None``.
    """

    def __init__(self, *args: Any, qwen: Qwen2VLPreprocess, image_size: Any, **kwargs: Any):
        self.qwen, self.image_size = qwen, image_size
        super().__init__(*args, **kwargs)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, D) output for prior-space images ``x`` (B, C, H, W)."""
        act = super().activation(x)
        return act.reshape(x.shape[0], -1, act.shape[-1])

    def describe(self) -> dict:
        """JSON-safe: :meth:`OutputObjective.describe` plus ``qwen2_vl`` and ``image_size``."""
        size = None if self.image_size is None else list(self.image_size)
        return {**super().describe(), "qwen2_vl": self.qwen.to_dict(), "image_size": size}


def _tower(model: nn.Module) -> Any:
    cls = require(_MODELING).Qwen2VisionTransformerPretrainedModel
    inner = getattr(model, "model", None)
    for candidate in (model, getattr(model, "visual", None), getattr(inner, "visual", None)):
        if isinstance(candidate, cls):
            return candidate
    raise UserTypeError(
        f"model must be Qwen2-VL's vision tower (from qwen2_vl_vision_subject) or a Qwen2-VL "
        f"model holding one, got {type(model).__name__}"
    )


def qwen2_vl_objective(
    model: nn.Module,
    preprocess: Qwen2VLPreprocess | Any,
    output: str = "embeddings",
    token: Token = "all",
    index: Index = None,
    image_size: int | tuple[int, int] | None = None,
    distance: str | Distance = "l2",
    name: str | None = None,
) -> Qwen2VLObjective:
    """Fiber objective on Qwen2-VL's vision tower, one tower call for the whole batch.

    phi(x) for prior-space images (B, 3, H, W): resized to the processor's smart-resize size
    for (H, W) (or ``image_size``), normalised and patchified as :class:`Qwen2VLPreprocess`
    does, run through the tower with ``grid_thw`` repeated per image, read back as (B, tokens,
    D), then the token reduction and ``index``.

    Parameters
    ----------
    model:
        The tower (from :func:`qwen2_vl_vision_subject`) or a Qwen2-VL model holding one.
    preprocess:
        A :class:`Qwen2VLPreprocess`, or the Qwen2-VL image processor to read it from.
    output:
        ``'embeddings'``: the merger's output (B, HW / (P m)^2, hidden_size), the tokens the
        language model gets; ``'last_hidden_state'`` (B, HW / P^2, embed_dim);
        ``'hidden_states.N'``: transformers' ``hidden_states[N]`` (0 the patch embeddings, i the
        output of ``blocks[i - 1]``, negative N from the end; hooked). Per-patch tokens are in
        the processor's merge-window order.
    token:
        ``'all'`` (default), ``'mean'``, ``'max'`` or an int position (there is no CLS token).
    index:
        Selection after the token reduction (see :func:`fiber_plugins.objectives.select`).
    image_size:
        A fixed model input (H, W) (or int), multiples of P * m; then :attr:`preprocess` fixes
        the size (references are read at their own resolution).
    distance, name:
        As in :func:`~fiber_plugins.adapters.hf.hf_objective`.

    Returns
    -------
    Qwen2VLObjective
        (B, K) features equal to ``model(hidden_states=pixel_values, grid_thw=image_grid_thw)``
        on ``processor(images)``, per image, reduced and selected.

    Raises
    ------
    UserKeyError
        An unknown ``output`` (the valid names are listed).
    UserValueError
        An unknown token or ``'cls'``, an ``image_size`` off the patch grid, or patch sizes
        that differ from the tower's.
    """
    tower = _tower(model)
    qwen = preprocess
    if not isinstance(qwen, Qwen2VLPreprocess):
        qwen = Qwen2VLPreprocess.from_processor(preprocess)
    config = tower.config
    ours = (qwen.patch_size, qwen.temporal_patch_size, qwen.merge_size)
    theirs = (config.patch_size, config.temporal_patch_size, config.spatial_merge_size)
    if ours != theirs:
        raise UserValueError(
            f"the preprocessing's (patch, temporal patch, merge) sizes {ours} differ from the "
            f"tower's {theirs}; use the processor saved with the model"
        )
    size = None if image_size is None else _pair(image_size)
    if size is not None and (min(size) <= 0 or any(s % qwen.factor for s in size)):
        near = tuple(max(qwen.factor, round(s / qwen.factor) * qwen.factor) for s in size)
        raise UserValueError(
            f"image_size {image_size!r} must be multiples of {qwen.factor} (patch_size * "
            f"merge_size); e.g. {near}"
        )
    if not isinstance(output, str):
        raise UserTypeError(f"output must be a name, got {type(output).__name__}")
    depth = len(tower.blocks)
    names = ["embeddings", "last_hidden_state", *(f"hidden_states.{i}" for i in range(depth + 1))]
    key, match = output, _HIDDEN.match(output)
    if match and -(depth + 1) <= int(match.group(1)) <= depth:
        key = f"hidden_states.{int(match.group(1)) % (depth + 1)}"
    if key not in names:
        raise UserKeyError(
            f"unknown output {output!r} of Qwen2-VL's vision tower; valid: {_choices(names)}"
            f"{suggest(output, names)}"
        )
    check_output_token(tower, output, None, token)
    layer = None
    if key.startswith("hidden_states."):
        pos = int(key.split(".")[1])
        layer = tower.patch_embed if pos == 0 else tower.blocks[pos - 1]
    return Qwen2VLObjective(
        _Tower(
            tower,
            qwen,
            size is None,
            "pooler_output" if key == "embeddings" else "last_hidden_state",
        ),
        output,
        token=token,
        index=index,
        preprocess=Preprocess(value_range=(-1.0, 1.0)) if size is None else qwen.at_size(size),
        distance=distance,
        name=name or _label(tower, output, token, index),
        default_token="all",
        layer=layer,
        adapter="qwen2_vl",
        qwen=qwen,
        image_size=size,
    )
