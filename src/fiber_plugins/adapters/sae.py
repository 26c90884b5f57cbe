"""Sparse-autoencoder features as fiber objectives, and a small SAE to train or load.

phi(x) = SAE features of the activation at one hook (or layer) of the subject model, reduced over
tokens and restricted to the chosen features: :func:`sae_objective`. The SAE is used duck-typed,
so three kinds work without any of their packages being imported here.

The SAE contract
----------------
``encode(x)`` maps activations (..., d_in) to features (..., d_sae) and returns either

* a tensor of feature activations: :class:`SparseAutoencoder` below and SAELens ``SAE`` objects
  (``sae_lens.SAE.encode``), or
* a tuple ``(sae_in, feature_acts)`` or ``(sae_in, feature_acts, hidden_pre)``: vit-prisma's
  ``SparseAutoencoder.encode`` (``vit_prisma.sae``; ``encode(x, return_hidden_pre=True)`` gives
  the three-tuple). The features are element 1.

The widths come from ``cfg.d_in`` / ``cfg.d_sae``, ``d_in`` / ``d_sae`` attributes, or the shape of
``W_enc`` (d_in, d_sae). For ``pre_activation=True`` the pre-activation (the encoder output before
ReLU / TopK / JumpReLU) is taken from, in this order: a ``pre_activation(x)`` method; vit-prisma's
``encode(x, return_hidden_pre=True)``; the hook point SAELens (``hook_sae_acts_pre``) or vit-prisma
(``hook_hidden_pre``) runs it through inside ``encode``; else ``(x - b_dec) @ W_enc + b_enc``
(``+ b_gate``, the gate, for a gated SAE; the input through SAELens' ``process_sae_in`` or
vit-prisma's ``run_time_activation_norm_fn_in`` where the SAE has them).

Why pre-activations: a ReLU or TopK feature that is inactive on the current image has zero
gradient, so a fiber loss on that feature cannot move the image towards activating it. Matching
the pre-activation is a stricter target (it also fixes how far below threshold an inactive
feature sits) that always has a gradient.

Examples
--------
>>> _, cache = model.run_with_cache(images)                          # doctest: +SKIP
>>> sae.encode(cache["blocks.5.hook_resid_post"])[:, 0, 1234]        # what the user has
>>> obj = sae_objective(model, "blocks.5.hook_resid_post", sae, features=1234, token="cls")
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import frozen
from ..errors import MissingFileError, UserIndexError, UserTypeError, UserValueError
from ..objectives.distances import Distance
from ..objectives.preprocess import Preprocess
from .lens import HookObjective, Token, reduce_tokens

__all__ = [
    "SparseAutoencoder",
    "SAEObjective",
    "sae_objective",
    "sae_features",
    "sae_pre_activation",
    "sae_widths",
]

CONFIG_FILE = "cfg.json"  # the same file names as SAELens' save_model
WEIGHTS_FILE = "sae_weights.safetensors"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


class SparseAutoencoder(nn.Module):
    """A plain ReLU sparse autoencoder: features = relu((x - b_dec) @ W_enc + b_enc).

    Parameters
    ----------
    d_in:
        Width of the activations it encodes (d_model of a residual-stream hook).
    d_sae:
        Number of features.

    Attributes
    ----------
    W_enc: (d_in, d_sae); b_enc: (d_sae,); W_dec: (d_sae, d_in); b_dec: (d_in,)
        The same names and layout as SAELens and vit-prisma, so their standard-SAE weights load
        with :meth:`load` / ``load_state_dict``.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for label, value in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserValueError(f"{label} must be a positive int, got {value!r}")
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self.reset_parameters()

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def reset_parameters(self) -> None:
        """Unit-norm decoder rows, encoder = decoder transposed, zero biases."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_enc.copy_(self.W_dec.t())
            self.b_enc.zero_()
            self.b_dec.zero_()

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise UserValueError(
                f"the SAE encodes width {self.d_in} but got activations of shape "
                f"{tuple(x.shape)} (width {x.shape[-1]})"
            )

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc + b_enc: (..., d_in) -> (..., d_sae)."""
        self._check(x)
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations relu(pre_activation(x)): (..., d_in) -> (..., d_sae)."""
        return torch.relu(self.pre_activation(x))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """features @ W_dec + b_dec: (..., d_sae) -> (..., d_in)."""
        return features @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into the folder ``path``."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "architecture": "standard",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "apply_b_dec_to_input": True,
            "activation_fn": "relu",
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        state = {k: getattr(self, k).detach().cpu().contiguous() for k in _TENSORS}
        save_file(state, str(folder / WEIGHTS_FILE))
        return folder

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> SparseAutoencoder:
        """Load a folder written by :meth:`save` (or a SAELens standard ReLU SAE folder)."""
        from ..weights import read_safetensors

        folder = Path(path)
        cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise MissingFileError(f"no {p.name} in {str(folder)!r}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserValueError(f"{cfg_path} is not valid JSON ({err}); re-save the SAE") from None
        if not isinstance(cfg, dict):
            raise UserValueError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object")
        arch = cfg.get("architecture", "standard")
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        norm = cfg.get("normalize_activations", "none")
        if arch != "standard" or act != "relu" or not cfg.get("apply_b_dec_to_input", True):
            raise UserValueError(
                f"{str(folder)!r} holds a {arch!r} SAE with activation {act!r}; SparseAutoencoder "
                "loads standard ReLU SAEs only: load it with its own package and pass that"
            )
        if norm not in (None, "none"):
            raise UserValueError(
                f"{str(folder)!r} normalises activations ({norm!r}), which SparseAutoencoder "
                "does not do; load it with its own package and pass that"
            )
        state = read_safetensors(weights_path, device=device, what="SAE weights file")
        missing = [k for k in _TENSORS if k not in state]
        if missing:
            raise UserValueError(f"{weights_path} lacks tensors {missing}; found {sorted(state)}")
        d_in, d_sae = (int(v) for v in state["W_enc"].shape)
        if (cfg.get("d_in", d_in), cfg.get("d_sae", d_sae)) != (d_in, d_sae):
            raise UserValueError(
                f"{cfg_path} says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')} but W_enc has "
                f"shape {(d_in, d_sae)}"
            )
        if dtype is None:
            dtype = getattr(torch, str(cfg.get("dtype", "float32")), state["W_enc"].dtype)
        sae = cls(d_in, d_sae, dtype=dtype, device=device)
        sae.load_state_dict({k: state[k] for k in _TENSORS})
        return sae


# ---------------------------------------------------------------------------- duck-typed SAE
def _as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def sae_widths(sae: Any) -> tuple[int | None, int | None]:
    """(d_in, d_sae) of any SAE following the contract; None where it cannot be told."""
    cfg = getattr(sae, "cfg", None)
    d_in = _as_int(getattr(cfg, "d_in", None)) or _as_int(getattr(sae, "d_in", None))
    d_sae = _as_int(getattr(cfg, "d_sae", None)) or _as_int(getattr(sae, "d_sae", None))
    w = getattr(sae, "W_enc", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        d_in = d_in or int(w.shape[0])
        d_sae = d_sae or int(w.shape[1])
    return d_in, d_sae


def _sae_hook_name(sae: Any) -> str | None:
    cfg = getattr(sae, "cfg", None)
    for holder, attr in ((cfg, "hook_point"), (cfg, "hook_name"), (sae, "hook_name")):
        value = getattr(holder, attr, None)
        if isinstance(value, str):
            return value
    meta = getattr(cfg, "metadata", None)  # SAELens >= 6 keeps it in cfg.metadata
    value = getattr(meta, "hook_name", None)
    return value if isinstance(value, str) else None


def _sae_dtype(sae: Any) -> torch.dtype | None:
    w = getattr(sae, "W_enc", None)
    return w.dtype if isinstance(w, torch.Tensor) else None


def sae_features(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """Feature activations of ``x`` (..., d_in) -> (..., d_sae) under the SAE contract."""
    out = sae.encode(x)
    if isinstance(out, (tuple, list)):  # vit-prisma: (sae_in, feature_acts[, hidden_pre])
        if len(out) < 2 or not isinstance(out[1], torch.Tensor):
            raise UserTypeError(
                f"{type(sae).__name__}.encode returned a {len(out)}-tuple; the contract is a "
                "tensor of features or (sae_in, feature_acts[, hidden_pre])"
            )
        return out[1]
    if not isinstance(out, torch.Tensor):
        raise UserTypeError(
            f"{type(sae).__name__}.encode returned {type(out).__name__}, not a tensor"
        )
    return out


def _capture(module: nn.Module, run) -> torch.Tensor | None:
    seen: list[torch.Tensor] = []

    def hook(mod, args, output):
        if not seen and isinstance(output, torch.Tensor):
            seen.append(output)

    handle = module.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen[0] if seen else None


def sae_pre_activation(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """Encoder pre-activations of ``x`` (..., d_in) -> (..., d_sae); see the module docstring."""
    method = getattr(sae, "pre_activation", None)
    if callable(method):
        return method(x)
    try:
        params = inspect.signature(sae.encode).parameters
    except (TypeError, ValueError):
        params = {}
    if "return_hidden_pre" in params:  # vit-prisma's standard SAE
        out = sae.encode(x, return_hidden_pre=True)
        if isinstance(out, (tuple, list)) and len(out) >= 3:
            return out[2]
    for attr in ("hook_sae_acts_pre", "hook_hidden_pre"):  # SAELens, vit-prisma
        point = getattr(sae, attr, None)
        if isinstance(point, nn.Module):
            pre = _capture(point, lambda: sae.encode(x))
            if pre is not None:
                return pre
    w = getattr(sae, "W_enc", None)
    # a gated SAE's features are on where the gate pre-activation is positive
    bias = getattr(sae, "b_gate", None)
    bias = bias if isinstance(bias, torch.Tensor) else getattr(sae, "b_enc", None)
    if isinstance(w, torch.Tensor) and isinstance(bias, torch.Tensor):
        process = getattr(sae, "process_sae_in", None)
        if callable(process):  # SAELens: dtype, input normalisation, minus b_dec
            sae_in = process(x)
        else:
            norm = getattr(sae, "run_time_activation_norm_fn_in", None)  # vit-prisma
            sae_in = norm(x) if callable(norm) else x
            b_dec = getattr(sae, "b_dec", None)
            sae_in = sae_in - b_dec if isinstance(b_dec, torch.Tensor) else sae_in
        return sae_in @ w + bias
    raise UserTypeError(
        f"cannot compute pre-activations of {type(sae).__name__}: give it a pre_activation(x) "
        "method, a hook_sae_acts_pre / hook_hidden_pre hook point, or W_enc and b_enc"
    )


def _check_features(features: Any, d_sae: int | None) -> list[int] | slice | None:
    if features is None or isinstance(features, slice):
        return features
    if isinstance(features, bool):
        raise UserTypeError(f"features must be None, an int or a list of ints, got {features!r}")
    if isinstance(features, int):
        ids = [features]
    elif isinstance(features, torch.Tensor) and features.dim() <= 1:
        ids = [int(i) for i in features.reshape(-1).tolist()]
    elif isinstance(features, Sequence) and not isinstance(features, str):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in features):
            raise UserTypeError(f"features must be ints, got {list(features)!r}")
        ids = [int(i) for i in features]
    else:
        raise UserTypeError(
            f"features must be None, an int, a list of ints or a slice, got {type(features).__name__}"
        )
    if not ids:
        raise UserValueError("features is empty; pass None for all features")
    if d_sae is not None:
        for i in ids:
            if not -d_sae <= i < d_sae:
                raise UserIndexError(
                    f"feature {i} is out of range for an SAE with {d_sae} features "
                    f"(valid: 0..{d_sae - 1})"
                )
    return ids


class SAEObjective(HookObjective):
    """SAE features at a hook: encode(tokens) -> token reduction -> feature selection.

    The activation is flattened to (B, tokens, width) (heads and d_head of ``attn.hook_z`` are
    joined; the 4-d output of a plain submodule, a (B, C, H, W) map, is refused), checked
    against the SAE's ``d_in``, encoded per token, reduced over tokens and
    restricted to ``features``. For 'cls' or one position only that token is encoded; 'mean' and
    'max' pool the features of all tokens (not the features of the pooled activation).
    While attached the SAE, like the model, is in eval mode without parameter gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        hook: str,
        sae: Any,
        features: int | Sequence[int] | slice | None = None,
        pre_activation: bool = False,
        token: Token = "cls",
        preprocess: Preprocess | dict | None = None,
        distance: str | Distance = "l2",
        name: str | None = None,
    ):
        if not callable(getattr(sae, "encode", None)):
            raise UserTypeError(
                f"sae must have an encode(x) method (SparseAutoencoder, a SAELens SAE or a "
                f"vit-prisma SparseAutoencoder), got {type(sae).__name__}"
            )
        self.sae = sae
        self.use_pre_activation = bool(pre_activation)
        self.d_in, self.d_sae = sae_widths(sae)
        self.features_index = _check_features(features, self.d_sae)
        label = f"{type(model).__name__}:{hook}:{token}:sae"
        if self.features_index is not None:
            label += f"[{features}]"
        label += ":pre" if self.use_pre_activation else ""
        super().__init__(
            model,
            hook,
            token=token,
            index=None,
            preprocess=preprocess,
            distance=distance,
            name=name or label,
            adapter="sae",
            allow_modules=True,
        )
        self.hook_index = features
        hooks = getattr(model, "hook_dict", None)
        # a named hook point of a hooked transformer has a token axis at dim 1 (attn.hook_z's
        # (B, pos, heads, d_head) joins heads x d_head); a plain submodule's 4-d output is a map
        self.on_hook_point = isinstance(hooks, Mapping) and hook in hooks

    @contextlib.contextmanager
    def attached(self) -> Iterator[SAEObjective]:
        with super().attached(), frozen(self.sae):
            yield self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # the SAE runs in the selection step, after the model's forward: keep it frozen there too
        with self.attached():
            return super().features(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _sae_dtype(self.sae)
        if dtype is not None and x.dtype != dtype:
            x = x.to(dtype)
        if self.use_pre_activation:
            return sae_pre_activation(self.sae, x)
        return sae_features(self.sae, x)

    def _select(self, act: torch.Tensor) -> torch.Tensor:
        act = self.convert(act)
        if act.dim() > 3 and not self.on_hook_point:
            # (B, C, H, W) read as (B, C, H*W) would encode channels as tokens, silently wrong
            shape = ", ".join(["B", *(str(n) for n in act.shape[1:])])
            raise UserValueError(
                f"{self.where} has output ({shape}): no token axis; an SAE reads (B, tokens, d) "
                "or (B, d) activations (a transformer block's output): pick such a layer, or "
                "wrap the model so that the layer gives (B, H*W, C) tokens"
            )
        if act.dim() > 3:
            act = act.flatten(2)
        width = act.shape[-1]
        if self.d_in is not None and width != self.d_in:
            own = _sae_hook_name(self.sae)
            hint = f" (the SAE was trained on {own!r})" if own else ""
            raise UserValueError(
                f"SAE input width {self.d_in} does not match {self.where}, whose activations have "
                f"width {width} (shape {tuple(act.shape)}); pick the hook the SAE was "
                f"trained on{hint}"
            )
        if self.token in ("mean", "max"):
            feats = reduce_tokens(self.encode(act), self.token, 1, self.where)
        else:
            feats = self.encode(reduce_tokens(act, self.token, 1, self.where))
        if self.d_sae is not None and feats.shape[-1] != self.d_sae:
            raise UserValueError(
                f"{type(self.sae).__name__}.encode returned width {feats.shape[-1]}, "
                f"expected d_sae={self.d_sae}"
            )
        if self.features_index is not None:
            feats = feats[..., self.features_index]
        return feats

    def describe(self) -> dict:
        out = super().describe()
        out.update(
            sae=type(self.sae).__name__,
            d_in=self.d_in,
            d_sae=self.d_sae,
            pre_activation=self.use_pre_activation,
        )
        return out


def sae_objective(
    model: nn.Module,
    hook: str,
    sae: Any,
    features: int | Sequence[int] | slice | None = None,
    pre_activation: bool = False,
    token_reduction: Token = "cls",
    preprocess: Preprocess | dict | None = None,
    distance: str | Distance = "l2",
    name: str | None = None,
) -> SAEObjective:
    """Fiber objective on SAE features of the activation at ``hook``.

    Parameters
    ----------
    model:
        The subject: a ``HookedViT`` / ``HookedRootModule`` (``hook`` is a key of
        ``model.hook_dict``) or any ``nn.Module`` (``hook`` is a submodule name whose output is
        recorded, e.g. ``"blocks.5"`` of a timm ViT).
    hook:
        Where the SAE reads its input, e.g. ``"blocks.5.hook_resid_post"``.
    sae:
        :class:`SparseAutoencoder`, a SAELens ``SAE`` or a vit-prisma ``SparseAutoencoder``
        (see the contract in the module docstring).
    features:
        ``None`` (the whole code, d_sae values), one feature id or a list of ids.
    pre_activation:
        Match encoder pre-activations instead of feature activations (nonzero gradient where a
        ReLU / TopK feature is inactive).
    token_reduction:
        ``'cls'`` (position 0), ``'mean'`` / ``'max'`` of the per-token features, an int patch
        position, or ``'all'`` (every token's features).
    preprocess, distance:
        As for :class:`~fiber_plugins.FiberObjective`.

    Returns
    -------
    SAEObjective
        Features (B, K): K = number of selected features (times tokens for 'all').

    Raises
    ------
    KeyError
        Unknown hook name (closest names quoted).
    IndexError
        A feature id outside 0..d_sae-1.
    ValueError
        (on the first forward) the hook's width differs from the SAE's ``d_in``, or a plain
        submodule gives a (B, C, H, W) map, which has no token axis.
    """
    return SAEObjective(
        model, hook, sae, features, pre_activation, token_reduction, preprocess, distance, name
    )
