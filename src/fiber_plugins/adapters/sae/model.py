"""`SparseAutoencoder`: a small SAE to train, save and load in SAELens' file layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ...errors import MissingFileError, UserValueError

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
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        self.reset_parameters()

    @property
    def d_in(self) -> int:
        """Width of the activations the SAE reads."""
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        """Number of SAE features."""
        return self.W_enc.shape[1]

    def reset_parameters(self) -> None:
        """Unit-norm decoder rows, encoder = decoder transposed, zero biases."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
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
        """Reconstruction of ``x`` (..., d_in): decode(encode(x)), (..., d_in)."""
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
        from ...weights import read_safetensors

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
