"""`hf_objective` and `OutputObjective`: a named output of a model (the hf wrapper's, or a
hooked layer's) as phi, after a token reduction and an index selection, with the token checks
shared with the open_clip adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..._utils import suggest
from ...errors import UserKeyError, UserTypeError, UserValueError
from ...objectives.base import FiberObjective
from ...objectives.distances import Distance
from ...objectives.preprocess import Preprocess, as_preprocess
from ...objectives.selection import Index, select
from .._common import _label, _Wrapper
from ..lens import Token, check_token, reduce_tokens
from .loading import _load_processor, is_hf_model
from .outputs import _HIDDEN, _choices, _probe_shape, _run, hf_outputs, hidden_layers
from .preprocessing import preprocess_from_processor


class _HFOutput(_Wrapper):
    def __init__(self, model: nn.Module, output: str | None):
        super().__init__(model)
        self.output = output  # None: a hook records the output (hidden states)

    def forward(self, x: torch.Tensor) -> Any:
        out = _run(self.model, x)
        return out if self.output is None else out[self.output]


def has_class_token(model: nn.Module) -> bool:
    """Whether the model prepends a class token (a parameter named ``cls_token`` or
    ``class_embedding``), i.e. whether token 0 of its hidden states is a CLS token."""
    return any(n.endswith(("cls_token", "class_embedding")) for n, _ in model.named_parameters())


class OutputObjective(FiberObjective):
    """A :class:`FiberObjective` on a named output of a model: token reduction, then index.

    phi(x) = select(reduce_tokens(out), index) flattened to (B, K), where ``out`` is the named
    output (the subject's output, or the output of ``layer``). The token reduction applies to
    (B, tokens, D) outputs only; other shapes are selected and flattened as they are.

    Parameters
    ----------
    subject:
        The module that computes the output (a wrapper holding the user's model).
    output:
        The output's name, as the user gave it (used in messages and reports).
    token:
        ``None`` (the default token: ``default_token``), ``'cls'``, ``'mean'``, ``'max'``, an
        int position or ``'all'``; only for (B, tokens, D) outputs.
    index:
        Selection after the token reduction (see :func:`fiber_plugins.objectives.select`).
    default_token:
        The token used when ``token`` is None: ``'cls'`` for models with a class token,
        ``'mean'`` for those without (SigLIP).
    layer:
        A submodule of ``subject`` whose output is the named output (recorded with a hook), or
        ``None`` for the subject's own output.
    capture:
        With a ``layer``: ``"output"`` or ``"input"`` (its first positional input).
    adapter:
        The adapter's name, stored by :meth:`describe`.
    """

    def __init__(
        self,
        subject: nn.Module,
        output: str,
        token: Token | None = None,
        index: Index = None,
        preprocess: Preprocess | dict | None = None,
        distance: str | Distance = "l2",
        name: str | None = None,
        default_token: Token = "cls",
        layer: nn.Module | None = None,
        capture: str = "output",
        adapter: str = "hf",
    ):
        self.output = output
        self.token = None if token is None else check_token(token)
        self.default_token = default_token
        self.output_index = index
        self.adapter = adapter
        super().__init__(
            subject,
            layer=layer,
            index=self._select,
            reduction="none",
            distance=distance,
            preprocess=preprocess,
            capture=capture,
            name=name,
        )
        if layer is not None:
            self.layer_name = output  # messages quote the user's name, not the wrapper's path

    @property
    def where(self) -> str:
        """``"output 'NAME'"``, for messages."""
        return f"output {self.output!r}"

    def _select(self, act: torch.Tensor) -> torch.Tensor:
        if act.dim() == 3:
            token = self.default_token if self.token is None else self.token
            act = reduce_tokens(act, token, 1, self.where)
        elif self.token not in (None, "all"):
            raise UserValueError(
                f"token={self.token!r} needs (B, tokens, D) but {self.where} has shape "
                f"{tuple(act.shape)}; leave token unset"
            )
        return select(act, self.output_index, self.where)

    def describe(self) -> dict:
        """JSON-safe description: the base objective's plus adapter, output, token and index."""
        out = super().describe()
        out.update(
            adapter=self.adapter,
            output=self.output,
            token=self.token,
            index=None
            if self.output_index is None or callable(self.output_index)
            else repr(self.output_index),
        )
        return out


def check_output_token(
    model: nn.Module, output: str, shape: Sequence[int] | None, token: Token | None
) -> Token:
    """The default token of ``model``, after refusing a token that cannot apply: a token for an
    output without a token axis (``shape`` is not (B, tokens, D)), or ``'cls'`` for a model
    without a class token. Returns the token used when ``token`` is None."""
    default: Token = "cls" if has_class_token(model) else "mean"
    if token is None:
        return default
    check_token(token)
    if shape is not None and len(shape) != 3 and token != "all":
        raise UserValueError(
            f"token={token!r} needs (B, tokens, D) but output {output!r} of "
            f"{type(model).__name__} has shape {tuple(shape)}; leave token unset"
        )
    if token == "cls" and default != "cls":
        raise UserValueError(
            f"{type(model).__name__} has no CLS token (all its tokens are patches); use "
            "token='mean', 'max', an int position or 'all'"
        )
    return default


def hf_objective(
    model: nn.Module,
    output: str = "pooler_output",
    token: Token | None = None,
    index: Index = None,
    preprocess: Preprocess | dict | None = None,
    processor: Any = None,
    distance: str | Distance = "l2",
    name: str | None = None,
) -> OutputObjective:
    """Fiber objective on a named output of a transformers vision model.

    Parameters
    ----------
    model:
        A transformers vision model (``ViTModel``, ``ViTForImageClassification``,
        ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``Dinov2Model``,
        ``SiglipVisionModel``, ...), e.g. from :func:`hf_subject`.
    output:
        ``pooler_output``, ``image_embeds``, ``last_hidden_state``, ``hidden_states.N``
        (N = 0 the embeddings, N = i the output of layer i; negative N counts from the end),
        ``logits``: any name :func:`hf_outputs` lists for the model. An unknown name raises a
        KeyError listing the model's outputs.
    token:
        For (B, tokens, D) outputs (``last_hidden_state``, ``hidden_states.N``): ``'cls'``
        (position 0), ``'mean'``, ``'max'``, an int position or ``'all'``; default ``'cls'``,
        or ``'mean'`` for models without a class token (SigLIP). Refused for other outputs.
    index:
        Selection after the token reduction: an int / list of ints picks dimensions (classes
        of ``logits``), a tuple one entry per remaining dimension.
    preprocess, processor:
        The preprocessing (a :class:`Preprocess` or dict), or the image processor it is made
        from (:func:`preprocess_from_processor`); default: the processor saved in the model's
        folder (``model.name_or_path``).
    distance:
        'l2' (default), 'l1', 'cosine', 'kl' or a callable.
    name:
        Label for logs and reports (default ``"<class>:<output>[:token][index]"``).

    Returns
    -------
    OutputObjective
        Features (B, K) equal to ``model(**processor(images))[output]`` (or
        ``.hidden_states[N]``) reduced and selected.

    Raises
    ------
    UserKeyError
        ``output`` is not an output of the model (the valid names are listed).
    UserValueError
        A token for an output without tokens, ``'cls'`` for a model without a class token.
    """
    if not is_hf_model(model):
        raise UserTypeError(
            f"model must be a transformers model, got {type(model).__name__}; use "
            "FiberObjective(model, ...) for other modules"
        )
    if not isinstance(output, str):
        raise UserTypeError(f"output must be a name, got {type(output).__name__}")
    if preprocess is not None:
        pre = as_preprocess(preprocess)
    else:
        if processor is None:
            processor = _load_processor(
                getattr(model, "name_or_path", None) or None, type(model).__name__
            )
        pre = preprocess_from_processor(processor)
    base = _probe_shape(model, None)
    shape = (1, pre.channels or base[1], *pre.output_size((base[-2], base[-1])))
    outputs = dict(hf_outputs(model, shape))
    key = output
    match = _HIDDEN.match(output)
    if match:
        count = sum(1 for n in outputs if _HIDDEN.match(n))
        pos = int(match.group(1))
        if -count <= pos < count:
            key = f"hidden_states.{pos % count}"
    if key not in outputs:
        raise UserKeyError(
            f"unknown output {output!r} of {type(model).__name__}; valid: "
            f"{_choices(list(outputs))}{suggest(output, list(outputs))}"
        )
    default = check_output_token(model, output, outputs[key], token)
    layer: nn.Module | None = None
    capture = "output"
    hidden = _HIDDEN.match(key)
    if hidden:  # read with a hook on the encoder layer; the rest of the model is skipped
        pos = int(hidden.group(1))
        layers = hidden_layers(model)
        layer, capture = (layers[0], "input") if pos == 0 else (layers[pos - 1], "output")
    return OutputObjective(
        _HFOutput(model, None if hidden else key),
        output,
        token=token,
        index=index,
        preprocess=pre,
        distance=distance,
        name=name or _label(model, output, token, index),
        default_token=default,
        layer=layer,
        capture=capture,
        adapter="hf",
    )
