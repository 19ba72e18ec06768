"""Separable Gaussian filtering of 1D/2D/3D tensors (degradation, baselines, particles)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ldm.errors import UserError


def gaussian_kernel1d(
    sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalised 1D Gaussian kernel, radius round(truncate * sigma) (scipy.ndimage convention)."""
    if sigma < 0:
        raise UserError(f"Gaussian sigma must be >= 0, got {sigma}")
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-12)) ** 2) if sigma > 0 else (x == 0).double()
    return (k / k.sum()).to(dtype)


def gaussian_blur(
    x: torch.Tensor,
    sigma: float | Sequence[float],
    truncate: float = 4.0,
    mode: str = "reflect",
) -> torch.Tensor:
    """Blur the trailing spatial axes of ``x`` with a per-axis Gaussian (separable convolution).

    ``x`` is ``(*spatial)``, ``(C, *spatial)`` or ``(B, C, *spatial)``; the number of spatial
    axes is ``len(sigma)`` for a sequence, else ``x.ndim`` for 1-3 dims or ``x.ndim - 2``.
    Border handling follows ``mode`` ('reflect' mirrors without repeating the edge, like
    ``scipy.ndimage`` 'mirror'; 'replicate'; 'constant' zero-pads).
    """
    if isinstance(sigma, (int, float)):
        nsp = x.ndim if x.ndim <= 3 else x.ndim - 2
        sigmas = [float(sigma)] * nsp
    else:
        sigmas = [float(s) for s in sigma]
        nsp = len(sigmas)
    if not 1 <= nsp <= 3 or x.ndim < nsp:
        raise UserError(
            f"gaussian_blur needs 1-3 spatial axes, got sigma={sigma} for shape {tuple(x.shape)}"
        )
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-nsp:])  # (N, 1, *spatial)
    if not y.is_floating_point():
        y = y.float()
    conv = (F.conv1d, F.conv2d, F.conv3d)[nsp - 1]
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        k = gaussian_kernel1d(s, truncate, y.dtype).to(y.device)
        r = (k.numel() - 1) // 2
        size = y.shape[2 + axis]
        kshape = [1, 1] + [1] * nsp
        kshape[2 + axis] = k.numel()
        pad = [0, 0] * nsp  # F.pad order: last axis first
        pad[2 * (nsp - 1 - axis)] = r
        pad[2 * (nsp - 1 - axis) + 1] = r
        if mode == "reflect" and r >= size:
            # reflect padding needs r < size: axes shorter than the kernel radius replicate instead
            y = F.pad(y, pad, mode="replicate")
        else:
            y = F.pad(y, pad, mode=mode)
        y = conv(y, k.reshape(kshape))
    return y.reshape(shape)


def gaussian_sigma_for_fwhm(fwhm: float) -> float:
    """Sigma of a Gaussian with the given full width at half maximum."""
    return fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
