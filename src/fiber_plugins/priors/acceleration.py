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

Use :meth:`fiber_plugins.DiffusionPrior.accelerate`, which calls :func:`accelerate`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE = ("blocks", "full")
# submodule lists whose entries are compiled one by one with compile="blocks"
_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks")
_BLOCKS = ("mid_block",)


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
    out = []
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


def accelerate(
    prior,
    weights: str | None = None,
    channels_last: bool | None = None,
    compile: str | None = "keep",
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    dynamic: bool = False,
):
    """Apply speed settings to ``prior`` in place and return it (see the module docstring).

    Parameters
    ----------
    weights: 'fp32', 'bf16' or 'fp16'; ``None`` keeps the current dtype.
    channels_last: ``True`` / ``False`` switches the memory format; ``None`` keeps it.
    compile: 'blocks', 'full', ``None`` (undo compilation) or 'keep' (default: unchanged).
    compile_mode: torch.compile mode (``None``, 'default', 'reduce-overhead', 'max-autotune',
        'max-autotune-no-cudagraphs').
    compile_backend: torch.compile backend ('inductor'; 'aot_eager' checks tracing without
        generating code).
    dynamic: let torch.compile generate shape-generic code (default off: the engine's shapes
        are static apart from the last, smaller batch).
    """
    state = dict(prior.acceleration)
    if weights is not None:
        if weights not in WEIGHTS:
            raise ValueError(
                f"unknown weights precision {weights!r}; choose one of {list(WEIGHTS)}"
            )
        prior.to(dtype=WEIGHTS[weights])
        state["weights"] = weights
    if channels_last is not None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        prior.denoiser.to(memory_format=fmt)
        if prior.vae is not None:
            prior.vae.to(memory_format=fmt)
        state["channels_last"] = bool(channels_last)
    if compile != "keep":
        if compile is not None and compile not in COMPILE:
            raise ValueError(
                f"unknown compile setting {compile!r}; choose one of {list(COMPILE)} or None"
            )
        _uncompile(prior)
        if compile is not None:
            for module in compile_targets(prior, compile):
                kw = {"mode": compile_mode} if compile_mode is not None else {}
                module.compile(backend=compile_backend, dynamic=dynamic, **kw)
        state["compile"] = compile
        state["compile_mode"] = compile_mode if compile else None
        state["compile_backend"] = compile_backend if compile else None
    prior.acceleration = state
    return prior
