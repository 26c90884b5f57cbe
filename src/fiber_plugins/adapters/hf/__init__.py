"""Hugging Face transformers adapter: vision models from a local folder, outputs by name.

A transformers user reads a vision model's outputs by name from ``model(**processor(images))``:
``pooler_output``, ``image_embeds``, ``last_hidden_state``, ``hidden_states[N]``, ``logits``.
:func:`hf_objective` takes the same names (``hidden_states.N`` for the N-th hidden state) and
returns a :class:`~fiber_plugins.FiberObjective` whose features equal that output, after a
token reduction (``'cls'``, ``'mean'``, ``'max'``, an int position or ``'all'``, as in
:mod:`fiber_plugins.adapters.lens`) for (B, tokens, D) outputs and an index selection.

The preprocessing is the model's own image processor (``preprocessor_config.json`` in the
folder) turned into a differentiable :class:`~fiber_plugins.objectives.Preprocess` by
:func:`preprocess_from_processor`.

Nothing is downloaded: :func:`hf_subject` loads a folder written by ``save_pretrained`` (or
``huggingface-cli download ORG/NAME --local-dir FOLDER``) with ``local_files_only=True``; a Hub
id is read from the local Hugging Face cache only. transformers is imported lazily
(``pip install 'fiber-plugins[hf]'``); remote code is never run.

Tested with ViTModel, ViTForImageClassification, CLIPVisionModel,
CLIPVisionModelWithProjection (also loaded from a full CLIPModel folder), Dinov2Model and
SiglipVisionModel.

Examples
--------
>>> model, pre = hf_subject("./dinov2-base")                          # doctest: +SKIP
>>> hf_outputs(model)[:2]                                             # doctest: +SKIP
[('last_hidden_state', (1, 257, 768)), ('pooler_output', (1, 768))]
>>> obj = hf_objective(model, "pooler_output", preprocess=pre)        # doctest: +SKIP
>>> obj = hf_objective(model, "hidden_states.6", token="mean", index=42, preprocess=pre)
"""

from __future__ import annotations

from .._common import hub_offline as hub_offline
from .loading import hf_subject, is_hf_model
from .objective import OutputObjective, hf_objective
from .objective import check_output_token as check_output_token
from .objective import has_class_token as has_class_token
from .outputs import hf_outputs
from .outputs import hidden_layers as hidden_layers
from .preprocessing import preprocess_from_processor
from .qwen2_vl import (
    Qwen2VLObjective,
    Qwen2VLPreprocess,
    qwen2_vl_objective,
    qwen2_vl_vision_subject,
)

# as before the split; hub_offline, hidden_layers, has_class_token and check_output_token are
# not in __all__ but importable from here (imported ``as`` themselves above)
__all__ = [
    "OutputObjective",
    "Qwen2VLObjective",
    "Qwen2VLPreprocess",
    "hf_subject",
    "hf_objective",
    "hf_outputs",
    "is_hf_model",
    "preprocess_from_processor",
    "qwen2_vl_objective",
    "qwen2_vl_vision_subject",
]
