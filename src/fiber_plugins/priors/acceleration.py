"""Speed settings of a prior's networks: weight precision, memory format, torch.compile.

Guided sampling spends nearly all of its time in the prior's denoiser and (latent priors) the VAE
decoder, forward *and* backward. These switches change how those networks execute, never what
they compute (up to rounding):

- ``weights="bf16"`` / ``"fp16"``: cast the weights once. Under bf16 autocast, fp32 weights are
  otherwise re-cast to bf16 in every forward (autocast caches casts only for weights that
  require grad, and a frozen prior's do not); half weights also halve their memory. The engine
  turns autocast on in the weights' dtype whenever the prior's weights are half precision, so
  normalisation layers and softmax still run in fp32; the sampler's state stays fp32.
- ``channels_last``: NHWC memory format for the convolutional networks (UNet, VAE). Faster for
  some networks and GPUs, slower for others (DESIGN 6 measured it slower for an ADM-sized UNet on
  an H100): measure before keeping it.
- ``compile="blocks"``: :func:`torch.compile` each down/mid/up block of a UNet, each transformer
  block of a DiT and each block of the VAE decoder, in place (``nn.Module.compile``). Blocks
  compile in seconds to minutes where the whole network can take longer than a session
  (DESIGN 6: a whole ADM UNet forward+backward did not finish compiling in 9 minutes).
  ``compile="full"`` compiles the whole denoiser and VAE decoder. ``compile_mode`` is passed
  through (``"reduce-overhead"`` adds CUDA graphs, ``"max-autotune"`` tunes kernels).
  ``compile=None`` undoes an earlier compilation.
- ``checkpointing``: diffusers' gradient checkpointing of the denoiser's and the VAE's blocks:
  a guided step's backward recomputes each block's forward instead of keeping its activations,
  which cuts the activation memory of one forward+backward several-fold for about one extra
  forward of compute. The sampling engine turns it on by itself, for one ``sample`` call, when a
  single row does not fit into memory without it ("only when memory needs it").

Use :meth:`fiber_plugins.DiffusionPrior.accelerate`; this module holds its parts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..errors import UserValueError

WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE = ("blocks", "full")
# submodule lists whose entries are compiled one by one with compile="blocks"
_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks")
_BLOCKS = ("mid_block",)


@dataclasses.dataclass(frozen=True, eq=False)
class Acceleration(Mapping):
    """The speed settings of a prior (``prior.acceleration``), recorded in every result.

    A frozen dataclass that also reads like the dict it is written as (``acc["weights"]``,
    ``dict(acc)``, ``acc == {...}``); the compile mode and backend appear only while something
    is compiled.

    Attributes
    ----------
    weights: 'fp32', 'bf16' or 'fp16'.
    channels_last: NHWC memory format of the UNet/VAE.
    compile: None, 'blocks' or 'full'; ``compile_mode`` and ``compile_backend`` with it.
    checkpointing: gradient checkpointing of the denoiser/VAE blocks: True, False, or 'auto'
        (on for one ``sample`` call, turned on by the engine because one row did not fit).
    """

    weights: str = "fp32"
    channels_last: bool = False
    compile: str | None = None
    compile_mode: str | None = None
    compile_backend: str | None = None
    checkpointing: bool | str = False

    def _keys(self) -> list[str]:
        keys = ["weights", "channels_last", "compile", "checkpointing"]
        if self.compile is not None:
            keys[3:3] = ["compile_mode", "compile_backend"]
        return keys

    def __getitem__(self, key: str):
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def replace(self, **changes) -> Acceleration:
        """A copy with ``changes`` (the settings are frozen: a prior swaps the whole record)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dict(self)


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    for name in _BLOCK_LISTS:
        for block in getattr(module, name, None) or ():
            yield block
    for name in _BLOCKS:
        block = getattr(module, name, None)
        if isinstance(block, nn.Module):
            yield block


def compile_targets(prior, compile: str) -> list[nn.Module]:
    """The modules that ``compile`` ('blocks' or 'full') compiles for this prior."""
    networks = [prior.denoiser]
    if prior.vae is not None:
        networks.append(prior.vae.decoder)
    if compile == "full":
        return networks
    out: list[nn.Module] = []
    for net in networks:
        found = list(_blocks(net))
        out.extend(found if found else [net])
    return out


def _uncompile(prior) -> None:
    networks = [prior.denoiser] + ([prior.vae] if prior.vae is not None else [])
    for net in networks:
        for m in net.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None


def set_weights(prior, weights: str) -> None:
    """Cast the denoiser and VAE; modules a diffusers model lists in ``_keep_in_fp32_modules``
    stay fp32 (autocast feeds them), as ``from_pretrained(torch_dtype=...)`` would keep them."""
    if weights not in WEIGHTS:
        raise UserValueError(
            f"unknown weights precision {weights!r}; choose one of {list(WEIGHTS)}"
        )
    dtype = WEIGHTS[weights]
    for net in (prior.denoiser, prior.vae):
        if net is None:
            continue
        nn.Module.to(net, dtype=dtype)  # diffusers' own .to(dtype) only adds a warning
        keep = getattr(net, "_keep_in_fp32_modules", None) or ()
        for name, module in net.named_modules():
            if any(k in name.split(".") for k in keep):
                nn.Module.to(module, dtype=torch.float32)
    names = {v: k for k, v in WEIGHTS.items()}
    prior.acceleration = prior.acceleration.replace(weights=names[dtype])


def supports_checkpointing(prior) -> bool:
    """Whether the prior's denoiser has diffusers' gradient checkpointing."""
    return bool(getattr(prior.denoiser, "_supports_gradient_checkpointing", False))


def set_checkpointing(prior, on: bool) -> None:
    """Switch diffusers' gradient checkpointing of the denoiser (and the VAE, where it has it).

    Diffusers checkpoints a block whenever ``torch.is_grad_enabled()`` and its flag is set, so
    it acts in the guided (gradient) evaluations and costs nothing in no-grad forwards.
    """
    if on and not supports_checkpointing(prior):
        raise UserValueError(
            f"{type(prior.denoiser).__name__} does not support gradient checkpointing "
            "(its _supports_gradient_checkpointing is False); use a smaller batch or bf16 weights"
        )
    for net in (prior.denoiser, prior.vae):
        if net is None or not getattr(net, "_supports_gradient_checkpointing", False):
            continue
        if on:
            net.enable_gradient_checkpointing()
        elif net.is_gradient_checkpointing:
            net.disable_gradient_checkpointing()


def set_channels_last(prior, on: bool) -> None:
    fmt = torch.channels_last if on else torch.contiguous_format
    for net in (prior.denoiser, prior.vae):
        if net is not None:
            net.to(memory_format=fmt)


def set_compile(prior, compile: str | None, mode: str | None, backend: str, dynamic: bool) -> None:
    if compile is not None and compile not in COMPILE:
        raise UserValueError(
            f"unknown compile setting {compile!r}; choose one of {list(COMPILE)} or None"
        )
    _uncompile(prior)
    if compile is not None:
        kw = {"mode": mode} if mode is not None else {}
        for module in compile_targets(prior, compile):
            module.compile(backend=backend, dynamic=dynamic, **kw)
