"""The networks' precision during sampling: which autocast a call runs under, and the warning
for half precision on the CPU. One owner for every sampler (``FiberSampler.autocast``)."""

from __future__ import annotations

import contextlib

import torch

from .._utils import warn

HALF = (torch.bfloat16, torch.float16)


def network_autocast(prior, want_bf16: bool):
    """Autocast of the prior's and the subject's forwards.

    Parameters
    ----------
    prior: the :class:`~fiber_plugins.DiffusionPrior`; its weight dtype and device decide.
    want_bf16: the sampler's ``config.autocast`` (bf16 autocast on fp32 weights).

    Returns
    -------
    A context manager: autocast in the prior's weight dtype when its weights are half precision
    (``prior.accelerate(weights="bf16")``, so normalisations and softmax stay fp32), bf16
    autocast when ``want_bf16``, else a no-op.
    """
    if prior.dtype in HALF:
        return torch.autocast(prior.device.type, dtype=prior.dtype)
    if want_bf16:
        return torch.autocast(prior.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def warn_half_on_cpu(prior, want_bf16: bool) -> None:
    """Warn once per call when half-precision networks would run on the CPU."""
    if prior.device.type == "cpu" and (prior.dtype in HALF or want_bf16):
        warn(
            "bf16/fp16 networks on the CPU: CPUs without native bf16 kernels run them many "
            "times slower than fp32 (see docs/performance.md); use fp32 on the CPU and keep "
            "half precision for the GPU"
        )
