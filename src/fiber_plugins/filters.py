"""The ideal (brick-wall) low-pass filter in the Fourier domain (thesis Sec. 4.4; DESIGN 4.2).

Used by initial-noise optimisation (a second fiber-loss term on the low-passed image keeps the
solution from hiding in imperceptible high frequencies) and by the low-pass robustness curve of
:mod:`fiber_plugins.evaluation`. A base module: it imports nothing of the package but the errors,
so samplers and evaluation can both use it.
"""

from __future__ import annotations

import torch

from .errors import UserTypeError, UserValueError


def lowpass_mask(
    size: tuple[int, int], cutoff: float, device=None, dtype=torch.float32
) -> torch.Tensor:
    """The (H, W // 2 + 1) 0/1 mask, on the ``rfft2`` grid, of the frequencies that are kept.

    A frequency (f_y, f_x) in cycles per pixel (``torch.fft.fftfreq``, Nyquist = 0.5) is kept when
    its radius relative to Nyquist, sqrt(f_y^2 + f_x^2) / 0.5, is <= ``cutoff``.
    """
    cutoff = _check_cutoff(cutoff)
    h, w = size
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64).view(1, -1)
    radius = (fy.pow(2) + fx.pow(2)).sqrt() / 0.5
    return (radius <= cutoff + 1e-9).to(dtype)


def lowpass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Ideal radial low-pass filter of images ``x`` (..., H, W); differentiable.

    Parameters
    ----------
    x:
        Real images (..., H, W), any leading dimensions (B, C, H, W typically). The transform is
        computed in float32 (float64 inputs stay float64) and cast back to ``x.dtype``.
    cutoff:
        In (0, 1]: the radius of the kept disc as a fraction of the Nyquist frequency (0.5
        cycles per pixel). ``cutoff=1`` means *no filtering* and returns ``x`` unchanged; it is
        the one value where the diagonal corner frequencies outside the Nyquist disc (radius up to
        sqrt(2)) are kept too, so the filter is exactly the identity there.

    Returns
    -------
    The filtered images, same shape and dtype as ``x``. The mean (frequency 0) is always kept,
    so a constant image is unchanged at every cutoff.

    Examples
    --------
    >>> checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4)   # frequency (0.5, 0.5)
    >>> lowpass(checker + 0.3, 0.5).allclose(torch.full((8, 8), 0.3))
    True
    """
    cutoff = _check_cutoff(cutoff)
    if x.dim() < 2:
        raise UserValueError(f"lowpass needs images (..., H, W), got shape {tuple(x.shape)}")
    if cutoff >= 1.0:
        return x
    work = x if x.dtype == torch.float64 else x.float()
    size = (work.shape[-2], work.shape[-1])
    mask = lowpass_mask(size, cutoff, device=work.device, dtype=work.dtype)
    spectrum = torch.fft.rfft2(work, norm="ortho")
    out = torch.fft.irfft2(spectrum * mask, s=size, norm="ortho")
    return out.to(x.dtype)


def _check_cutoff(cutoff) -> float:
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        raise UserTypeError(f"cutoff must be a number in (0, 1], got {cutoff!r}") from None
    if not 0.0 < value <= 1.0:
        raise UserValueError(
            f"cutoff must be in (0, 1] (a fraction of the Nyquist frequency), got {cutoff!r}"
        )
    return value
