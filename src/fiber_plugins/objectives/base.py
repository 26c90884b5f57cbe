"""`FiberObjective`: the one central abstraction.

An objective maps a batch of images in the prior's image space ([-1, 1], (B, C, H, W)) to
features phi(x) of shape (B, K), compares them with a target y* = phi(x*) by a distance d, and
returns one fiber loss per sample. Samplers only call :meth:`FiberObjective.loss` inside
:meth:`FiberObjective.attached`; adapters only build objectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._utils import frozen, suggest, warn
from ..errors import UserKeyError, UserStateError, UserTypeError, UserValueError
from .distances import Distance, get_distance
from .preprocess import Preprocess, as_preprocess
from .selection import Index, check_reduction, reduce, select

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .weighted import WeightedSum

Target = Any  # a (B, K) tensor for a single objective, a tuple of them for a sum


class _StopForward(Exception):
    """Raised by a capture hook to skip the rest of the subject model (its output is unused)."""


def find_module(model: nn.Module, name: str) -> nn.Module:
    """Look up a submodule by dotted name, with a 'closest names' hint when it does not exist.

    Parameters
    ----------
    model:
        The model to search (any ``nn.Module``).
    name:
        A dotted submodule name as in ``model.named_modules()``, e.g. ``"layer4.1"``; ``""`` is
        the model itself.

    Returns
    -------
    nn.Module
        The submodule.

    Raises
    ------
    UserKeyError
        ``name`` is not a submodule of ``model`` (the message lists the closest names).
    """
    modules = dict(model.named_modules())
    if name not in modules:
        raise UserKeyError(
            f"unknown layer {name!r} in {type(model).__name__}{suggest(name, [n for n in modules if n])}"
        )
    return modules[name]


class FiberObjective:
    """phi(x) from a callable, a model's output, or a model's layer, plus target and distance.

    Parameters
    ----------
    subject:
        An ``nn.Module`` (the subject model) or any callable ``f(x) -> Tensor``.
    layer:
        For a module subject: a dotted submodule name (``"layer4.1"``) or the submodule itself.
        Its output (or input, with ``capture="input"``) is recorded with a forward hook;
        ``None`` uses the model's output.
    index:
        Selection after the reduction: int / list of ints (channels), slice, tuple (one index per
        non-batch dimension) or a callable ``(B, ...) -> (B, ...)``; see :func:`select`.
    reduction:
        'none', 'auto', 'spatial_mean', 'spatial_max' ((B, C, H, W) -> (B, C)), 'cls',
        'token_mean', 'token_max' ((B, N, D) -> (B, D)); see :func:`reduce`.
    distance:
        'l2' (squared L2 summed per sample, the paper's Eq. 3), 'l1', 'cosine', 'kl' or a callable
        ``d(features (B, K), target (B, K) or (1, K)) -> (B,)``.
    preprocess:
        :class:`Preprocess` from the prior's space into the subject's input (default: [-1, 1] ->
        [0, 1], same size), or a dict of its fields. Pass ``IDENTITY`` to feed [-1, 1] images
        unchanged.
    capture:
        With a ``layer``: ``"output"`` records the layer's output (the first element of a tuple
        output), ``"input"`` its first positional input (a forward pre-hook).
    name:
        Label used in logs and reports (default: built from the subject, layer and index).

    Attributes
    ----------
    model:
        The subject when it is an ``nn.Module``, else ``None``.
    layer, layer_name:
        The hooked submodule and its dotted name (``None`` when phi is the model's output).

    Examples
    --------
    >>> obj = FiberObjective(resnet, layer="layer4", index=1656, reduction="spatial_mean")  # doctest: +SKIP
    >>> y_star = obj.target(reference)            # (1, K)
    >>> with obj.attached():
    ...     loss = obj.loss(images, y_star)      # (B,)
    """

    def __init__(
        self,
        subject: nn.Module | Callable[[torch.Tensor], torch.Tensor],
        layer: str | nn.Module | None = None,
        index: Index = None,
        reduction: str = "none",
        distance: str | Distance = "l2",
        preprocess: Preprocess | dict | None = None,
        capture: str = "output",
        name: str | None = None,
    ):
        if not callable(subject):
            raise UserTypeError(
                f"subject must be an nn.Module or a callable, got {type(subject).__name__}"
            )
        if capture not in ("output", "input"):
            raise UserValueError(f"capture must be 'output' or 'input', got {capture!r}")
        self.subject = subject
        self.model = subject if isinstance(subject, nn.Module) else None
        if layer is not None and self.model is None:
            raise UserTypeError("layer= needs an nn.Module subject, not a plain callable")
        self.layer_name: str | None = None
        self.layer: nn.Module | None = None
        if isinstance(layer, str):
            assert self.model is not None  # checked above: a layer needs a module subject
            self.layer_name = layer
            self.layer = find_module(self.model, layer)
        elif isinstance(layer, nn.Module):
            assert self.model is not None  # checked above: a layer needs a module subject
            names = {id(m): n for n, m in self.model.named_modules()}
            if id(layer) not in names:
                raise UserValueError(
                    f"layer {type(layer).__name__} is not a submodule of the subject"
                )
            self.layer, self.layer_name = layer, names[id(layer)]
        elif layer is not None:
            raise UserTypeError(f"layer must be a name or a module, got {type(layer).__name__}")
        self.index = index
        self.reduction = check_reduction(reduction)
        self.distance_name = (
            distance if isinstance(distance, str) else getattr(distance, "__name__", "custom")
        )
        self.distance = get_distance(distance)
        self.preprocess = as_preprocess(preprocess)
        self.capture = capture
        self.name = name or self._default_name()
        self._depth = 0
        self._handle: RemovableHandle | None = None
        self._saved: list = []
        self._value: torch.Tensor | None = None
        self._capturing = False

    def _default_name(self) -> str:
        base = (
            type(self.subject).__name__
            if self.model is not None
            else getattr(self.subject, "__name__", "phi")
        )
        if self.layer_name is not None:
            base += f":{self.layer_name}" + (":input" if self.capture == "input" else "")
        if self.index is not None and not callable(self.index):
            base += f"[{self.index}]"
        return base

    @property
    def where(self) -> str:
        """Where phi is read, for messages.

        Returns
        -------
        str
            ``"layer 'NAME'"``, or ``"the output"`` without a layer.
        """
        return f"layer {self.layer_name!r}" if self.layer_name is not None else "the output"

    # ------------------------------------------------------------------ hooks and model state
    @contextlib.contextmanager
    def attached(self) -> Iterator[FiberObjective]:
        """Install the capture hook and put the model in eval mode without parameter gradients.

        Everything is undone in ``finally``: the hook is removed and each module's train/eval flag
        and each parameter's ``requires_grad`` are restored, also when the body raises.
        Re-entrant: nested uses install once. For a plain callable subject nothing is installed.

        Returns
        -------
        Iterator[FiberObjective]
            A context manager that yields this objective.
        """
        if self.model is None or self._depth > 0:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        model = self.model
        self._depth += 1
        try:
            training = [
                m for m in model.modules() if m.training and not getattr(m, "_fiber_wrapper", False)
            ]
            if training:
                warn(
                    f"{type(training[0]).__name__} is in train mode; sampling runs it in eval mode "
                    "(dropout off, batch-norm statistics frozen) and restores train mode after"
                )
            with frozen(model):
                if self.layer is not None:
                    if self.capture == "input":
                        self._handle = self.layer.register_forward_pre_hook(self._pre_hook)
                    else:
                        self._handle = self.layer.register_forward_hook(self._hook)
                yield self
        finally:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            self._value = None
            self._depth -= 1

    # the hooks act only while this objective runs its own forward, so several objectives can be
    # attached to one model at once (a weighted sum of layers)
    def _hook(self, module, args, output):
        if self._capturing:
            self._value = output[0] if isinstance(output, (tuple, list)) else output
            raise _StopForward

    def _pre_hook(self, module, args):
        if self._capturing:
            self._value = args[0] if isinstance(args, (tuple, list)) else args
            raise _StopForward

    # ------------------------------------------------------------------ phi
    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The raw activation (before reduction/selection) for prior-space images ``x``.

        Parameters
        ----------
        x:
            (B, C, H, W) images in the prior's space, [-1, 1]; :attr:`preprocess` maps them to
            the subject's input.

        Returns
        -------
        torch.Tensor
            The layer's output or input (the first element of a tuple), or the subject's output
            (the first element of a tuple, or its ``.logits``), as recorded: (B, ...) for a
            subject that keeps the batch dimension first (checked by :meth:`features`), e.g.
            (B, C, h, w) for a conv layer or (B, N, D) for transformer tokens.

        Raises
        ------
        UserStateError
            The layer was not called during the forward pass.
        UserTypeError
            phi gave something other than a tensor.
        """
        with self.attached():
            inp = self.preprocess(x)
            out: object
            if self.layer is None:
                out = self.subject(inp)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                elif hasattr(out, "logits"):
                    out = out.logits
            else:
                self._value = None
                self._capturing = True
                try:
                    with contextlib.suppress(_StopForward):  # the hook ends the forward early
                        self.subject(inp)
                finally:
                    self._capturing = False
                out, self._value = self._value, None
                if out is None:
                    raise UserStateError(
                        f"{self.where} was not called during the forward pass of "
                        f"{type(self.subject).__name__}; pick a layer on the path to the output"
                    )
            if not isinstance(out, torch.Tensor):
                raise UserTypeError(f"phi must return a tensor, got {type(out).__name__}")
            return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (B, K) features of prior-space images x (B, C, H, W) in [-1, 1].

        The :meth:`activation`, reduced (:attr:`reduction`), selected (:attr:`index`) and
        flattened to one row per image.

        Parameters
        ----------
        x:
            (B, C, H, W) images in the prior's space, [-1, 1].

        Returns
        -------
        torch.Tensor
            (B, K) float32 features, differentiable with respect to ``x``.

        Raises
        ------
        UserValueError
            The activation does not keep the batch dimension first, or the reduction / index
            does not fit its shape.
        """
        with self.attached():  # an index callable may hold modules too (an SAE)
            act = self.activation(x)
            if act.dim() == 0 or act.shape[0] != x.shape[0]:
                raise UserValueError(
                    f"phi returned shape {tuple(act.shape)} for a batch of {x.shape[0]} images; "
                    "it must keep the batch dimension first"
                )
            act = reduce(act, self.reduction, self.where)
            act = select(act, self.index, self.where)
            return act.reshape(act.shape[0], -1).float()

    def target(self, reference: torch.Tensor) -> torch.Tensor:
        """y* = phi(x*) for reference images (R, C, H, W) in the prior's space; no gradient.

        Parameters
        ----------
        reference:
            (R, C, H, W) reference images x* in the prior's space, [-1, 1].

        Returns
        -------
        torch.Tensor
            (R, K) float32 targets, computed under ``torch.no_grad`` (see :meth:`target_of`).
        """
        with torch.no_grad():
            return self.target_of(self.features(reference))

    def seed_row(self, row: int) -> int:
        """The row key that seeds reference row ``row``'s samples: the row itself (a
        :class:`~fiber_plugins.objectives.units.UnitSet` seeds each unit's rows as a call with
        that unit alone would).

        Parameters
        ----------
        row:
            The reference row of the call.

        Returns
        -------
        int
            ``row``.
        """
        return row

    def target_of(self, features: torch.Tensor) -> torch.Tensor:
        """The target y* of references whose features (R, K) are given (detached). The sampler
        computes the references' features once, with a graph for its gradient check, and takes
        the target from them; objectives whose target is more than phi(x*) (a mask, as for
        Captum's per-example targets) override this.

        Parameters
        ----------
        features:
            (R, K) features phi(x*) of R references, as :meth:`features` gives them.

        Returns
        -------
        torch.Tensor
            (R, K) targets y*: ``features`` detached from the graph.
        """
        return features.detach()

    def check_target(self, target: torch.Tensor, width: int) -> torch.Tensor:
        """Validate an explicit target against the feature width and return it as (R, K).

        The width must match and every entry must be finite (a NaN or inf target gives a NaN
        loss and gradient, which the sampler would follow without a word).

        Parameters
        ----------
        target:
            (K,) or (R, K) target values: a tensor or anything ``torch.as_tensor`` takes.
        width:
            K, the number of features this objective gives per image.

        Returns
        -------
        torch.Tensor
            (R, K) float32 targets ((1, K) for a (K,) vector).

        Raises
        ------
        UserTypeError
            ``target`` is not numeric.
        UserValueError
            Its shape is not (K,) or (R, K), or it holds a NaN or inf.
        """
        try:
            t = torch.as_tensor(target, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise UserTypeError(
                f"target must be a tensor of numbers, got {type(target).__name__}"
            ) from None
        one_vector = t.dim() == 1
        if one_vector:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[1] != width:
            raise UserValueError(
                f"target has shape {tuple(t.shape)} but {self.name} gives {width} features per "
                f"image; pass a ({width},) or (R, {width}) tensor"
            )
        bad = (~torch.isfinite(t)).nonzero()
        if len(bad):
            row, col = (int(i) for i in bad[0])
            where = f"index {col}" if one_vector else f"index ({row}, {col})"
            raise UserValueError(
                f"target for {self.name} has {len(bad)} non-finite value(s), the first "
                f"{t[row, col].item()} at {where}; a target must be finite (check the vector's "
                "source)"
            )
        return t

    def loss(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """Fiber loss d(phi(x), y*) per sample: (B,). ``target`` is (B, K) or (1, K).

        Parameters
        ----------
        x:
            (B, C, H, W) images in the prior's space, [-1, 1].
        target:
            (B, K) targets, one per image, or (1, K) shared by all (a tuple of them for a
            :class:`WeightedSum`).

        Returns
        -------
        torch.Tensor
            (B,) fiber loss of each image, differentiable with respect to ``x``.
        """
        return self.distance(self.features(x), target)

    def distance_between(self, features, target) -> torch.Tensor:
        """The distance d between given features and targets (no forward pass).

        Parameters
        ----------
        features:
            (B, K) features, as :meth:`features` gives them.
        target:
            (B, K) or (1, K) targets.

        Returns
        -------
        torch.Tensor
            (B,) distance of each row.
        """
        return self.distance(features, target)

    # ------------------------------------------------------------------ composition
    def terms(self) -> list[tuple[float, FiberObjective]]:
        """The weighted terms of this objective, as a :class:`WeightedSum` combines them.

        Returns
        -------
        list[tuple[float, FiberObjective]]
            ``[(1.0, self)]`` for a single objective.
        """
        return [(1.0, self)]

    def __mul__(self, weight: float) -> WeightedSum:
        from .weighted import WeightedSum

        return WeightedSum([(float(weight) * w, o) for w, o in self.terms()])

    __rmul__ = __mul__

    def __add__(self, other: FiberObjective) -> WeightedSum:
        if not isinstance(other, FiberObjective):
            return NotImplemented
        from .weighted import WeightedSum

        return WeightedSum(self.terms() + other.terms())

    def describe(self) -> dict:
        """The objective's settings, as stored with a run (JSON-serialisable).

        Returns
        -------
        dict
            ``name``, ``layer``, ``capture``, ``index`` (its repr; ``None`` for none or a
            callable), ``reduction``, ``distance`` (its name) and ``preprocess`` (a dict).
        """
        return {
            "name": self.name,
            "layer": self.layer_name,
            "capture": self.capture,
            "index": None if self.index is None or callable(self.index) else repr(self.index),
            "reduction": self.reduction,
            "distance": self.distance_name,
            "preprocess": self.preprocess.to_dict(),
        }

    def __repr__(self) -> str:
        return f"FiberObjective({self.name!r}, reduction={self.reduction!r}, distance={self.distance_name!r})"
