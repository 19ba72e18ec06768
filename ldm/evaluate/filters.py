"""Separable Gaussian filtering of 1D/2D/3D tensors (degradation, baselines, particles, SSIM).

Each axis is filtered by adding shifted, weighted views of the tensor (``narrow`` + ``add_``)
into one output, with the borders handled separately. On CPU this is several times faster
than ``F.conv3d`` with a 1-channel input and a (k, 1, 1) kernel, which takes a slow,
memory-hungry path; it also skips the padded copy of the whole tensor (``F.pad``'s reflect
kernel was slow in the same measurements). Memory: the output plus 2 r border planes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.core.errors import UserError

MODES = ("reflect", "replicate", "constant")


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


def _blur_axis(y: torch.Tensor, weights: list[float], dim: int, mode: str) -> torch.Tensor:
    """Correlate ``y`` along ``dim`` with a symmetric odd-length kernel ``weights`` (radius r).

    out[i] = w[r] y[i] + sum_{d=1..r} w[r - d] (y[i - d] + y[i + d]), where an index outside
    the axis is mirrored (reflect), clamped (replicate) or a zero (constant). Interior taps are
    shifted views of ``y``; only the border taps read a mirrored copy of r planes per side, so
    no padded copy of the whole tensor is made.
    """
    r = (len(weights) - 1) // 2
    size = y.shape[dim]
    reflect = mode == "reflect" and r < size  # a single mirror needs r < size, else replicate
    if reflect:
        left = y.narrow(dim, 1, r).flip(dim)  # y[r], ..., y[1]
        right = y.narrow(dim, size - 1 - r, r).flip(dim)  # y[size-2], ..., y[size-1-r]
    out = y * weights[r]  # centre tap, a fresh tensor
    for d in range(1, r + 1):
        w = weights[r - d]
        m = min(d, size)  # border positions per side whose tap at distance d falls outside
        if m < size:
            out.narrow(dim, m, size - m).add_(y.narrow(dim, 0, size - m), alpha=w)  # y[i - d]
            out.narrow(dim, 0, size - m).add_(y.narrow(dim, m, size - m), alpha=w)  # y[i + d]
        if reflect:  # y[-k] = y[k], y[size-1+k] = y[size-1-k]
            out.narrow(dim, 0, d).add_(left.narrow(dim, r - d, d), alpha=w)
            out.narrow(dim, size - d, d).add_(right.narrow(dim, 0, d), alpha=w)
        elif mode != "constant":  # replicate: the edge value, broadcast over the border
            out.narrow(dim, 0, m).add_(y.narrow(dim, 0, 1), alpha=w)
            out.narrow(dim, size - m, m).add_(y.narrow(dim, size - 1, 1), alpha=w)
    return out


def gaussian_blur(
    x: torch.Tensor,
    sigma: float | Sequence[float],
    truncate: float = 4.0,
    mode: str = "reflect",
) -> torch.Tensor:
    """Blur the trailing spatial axes of ``x`` with a per-axis Gaussian (separable filter).

    ``x`` is ``(*spatial)``, ``(C, *spatial)`` or ``(B, C, *spatial)``; the number of spatial
    axes is ``len(sigma)`` for a sequence, else ``x.ndim`` for 1-3 dims or ``x.ndim - 2``.
    Border handling follows ``mode`` ('reflect' mirrors without repeating the edge, like
    ``scipy.ndimage`` 'mirror'; 'replicate'; 'constant' zero-pads). Kernel radius is
    ``int(truncate * sigma + 0.5)`` per axis; integer inputs are blurred as float32.
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
    if any(not s >= 0 for s in sigmas):
        raise UserError(f"gaussian_blur: every sigma must be >= 0, got {sigma}")
    if mode not in MODES:
        raise UserError(f"gaussian_blur: mode must be one of {', '.join(MODES)}, got {mode!r}")
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-nsp:])  # (N, 1, *spatial)
    if not y.is_floating_point():
        y = y.float()
    for axis, s in enumerate(sigmas):
        if s == 0:
            continue
        weights = gaussian_kernel1d(s, truncate, torch.float64).tolist()
        if len(weights) > 1:
            y = _blur_axis(y, weights, 2 + axis, mode)
    return y.reshape(shape)
