"""OpenCLIP adapter: image embeddings and vision-tower layers of OpenCLIP models.

An OpenCLIP user embeds images with ``model.encode_image(preprocess(image))``.
:func:`open_clip_objective` gives that embedding (normalised or not) as a
:class:`~fiber_plugins.FiberObjective`, or the output of any layer of the vision tower by its
module name (``visual.transformer.resblocks.3``), with the token reductions of
:mod:`fiber_plugins.adapters.lens` (``'cls'``, ``'mean'``, ``'max'``, an int position,
``'all'``).

The preprocessing is OpenCLIP's own eval transform (``Resize`` / ``CenterCrop`` /
``Normalize``, from ``create_model_and_transforms``) turned into a differentiable
:class:`~fiber_plugins.objectives.Preprocess` by :func:`preprocess_from_transform`.

Nothing is downloaded: :func:`open_clip_subject` builds the architecture with
``create_model_and_transforms(arch, pretrained=None)`` (random init, no tower weights) and
loads a local weights file with the package's one safe loader
(:func:`fiber_plugins.weights.read_state_dict`: safetensors, or a torch state dict read with
``weights_only=True``). open_clip is imported lazily
(``pip install 'fiber-plugins[openclip]'``).

Examples
--------
>>> model, pre = open_clip_subject("ViT-B-32", weights="ViT-B-32.safetensors")  # doctest: +SKIP
>>> obj = open_clip_objective(model, preprocess=pre)                              # embedding
>>> obj = open_clip_objective(model, layer="visual.transformer.resblocks.6", token="mean")
"""

from __future__ import annotations

from .loading import CONFIG_FILE as CONFIG_FILE
from .loading import WEIGHTS_FILES as WEIGHTS_FILES
from .loading import open_clip_subject
from .objective import OUTPUTS, is_open_clip_model, open_clip_objective, open_clip_outputs
from .preprocessing import preprocess_from_transform

# as before the split; CONFIG_FILE and WEIGHTS_FILES are not in __all__ but importable from
# here (imported ``as`` themselves above)
__all__ = [
    "OUTPUTS",
    "open_clip_subject",
    "open_clip_objective",
    "open_clip_outputs",
    "is_open_clip_model",
    "preprocess_from_transform",
]
