"""Classical denoising baselines for the evaluation tables.

Gaussian filter, heat diffusion, total variation (Chambolle) and non-local means (both
scikit-image, 3D with ``channel_axis=None``), BM4D when the optional package is installed.
Each has one parameter, tuned for PSNR on train patches (docs/design.md, "Metrics").
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ldm.core.errors import UserError
from ldm.evaluate.filters import gaussian_blur
from ldm.evaluate.metrics import psnr

logger = logging.getLogger(__name__)

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]
BM4D_HINT = "pip install bm4d (optional; non-commercial license)"


def _check_volume(volume: torch.Tensor, name: str) -> None:
    if volume.ndim not in (2, 3):
        raise UserError(f"{name}: expected a 2D or 3D volume, got shape {tuple(volume.shape)}")


def gaussian_denoise(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Isotropic Gaussian filter of a 2D or 3D volume (mirror borders); sigma in voxels."""
    _check_volume(volume, "gaussian_denoise")
    if not sigma >= 0:
        raise UserError(f"gaussian_denoise: sigma must be >= 0, got {sigma}")
    return gaussian_blur(volume, [float(sigma)] * volume.ndim)


def _laplacian(u: torch.Tensor) -> torch.Tensor:
    """(2 nd + 1)-point Laplacian of u (1, 1, *sp) with zero-flux (Neumann) borders.

    Per axis: u[i-1] - 2 u[i] + u[i+1], with the ghost voxel beyond an edge equal to the edge
    voxel (so the border differences vanish); shifted adds, which on CPU are far faster than a
    1-channel convolution. The Laplacian sums to 0 over the volume: the mean is preserved.
    """
    lap = torch.zeros_like(u)
    for axis in range(2, u.ndim):
        n = u.shape[axis]
        if n < 2:
            continue
        diff = u.narrow(axis, 1, n - 1) - u.narrow(axis, 0, n - 1)  # u[i+1] - u[i]
        lap.narrow(axis, 0, n - 1).add_(diff)
        lap.narrow(axis, 1, n - 1).sub_(diff)
    return lap


def _heat_steps(u: torch.Tensor, num_steps: int, dt: float) -> torch.Tensor:
    """``num_steps`` explicit Euler steps of du/dt = laplacian(u) on ``u`` of shape (1, 1, *sp)."""
    for _ in range(num_steps):
        u = u + dt * _laplacian(u)  # u^{n+1} = u^n + dt * Laplacian(u^n)
    return u


def _check_heat_args(ndim: int, num_steps: int, dt: float) -> None:
    if num_steps < 0:
        raise UserError(f"heat diffusion: num_steps must be >= 0, got {num_steps}")
    limit = 1.0 / (2 * ndim)
    if not 0 < dt <= limit:
        raise UserError(
            f"heat diffusion: dt must be in (0, {limit:g}] for a stable explicit scheme in "
            f"{ndim}D, got {dt}"
        )


def heat_diffusion(volume: torch.Tensor, num_steps: int, dt: float = 0.1) -> torch.Tensor:
    """Linear heat-equation smoothing du/dt = laplacian(u), explicit finite differences.

    Forward Euler in time, (2 ndim + 1)-point Laplacian in space, Neumann (zero-flux) borders;
    stable for dt <= 1 / (2 ndim) (von Neumann analysis of the FTCS scheme). Diffusing for time
    t = num_steps * dt approximates a Gaussian blur with sigma = sqrt(2 t).
    """
    _check_volume(volume, "heat_diffusion")
    _check_heat_args(volume.ndim, num_steps, dt)
    u = volume.float() if not volume.is_floating_point() else volume
    u = _heat_steps(u.reshape(1, 1, *u.shape), num_steps, dt)  # (1, 1, *spatial)
    return u.reshape(volume.shape)


def _check_grid(pairs: Pairs, grid: Sequence, name: str) -> None:
    if len(pairs) == 0:
        raise UserError(f"{name}: need at least one (lr, hr) pair, got none")
    if len(grid) == 0:
        raise UserError(f"{name}: need at least one candidate parameter, got an empty grid")


def _tune(
    pairs: Pairs, params: Sequence[float], denoise: Callable[[torch.Tensor, float], torch.Tensor]
) -> tuple[float, float]:
    """Parameter of ``params`` with the highest mean PSNR of denoise(lr, p) against hr."""
    scores = np.zeros(len(params))
    for lr, hr in pairs:
        for i, p in enumerate(params):
            scores[i] += psnr(denoise(lr, p), hr)
    return _best(params, scores / len(pairs), "tuning")


def _best(params: Sequence, mean_scores: np.ndarray, what: str) -> tuple:
    """(parameter with the highest mean PSNR, that PSNR), logging the whole curve."""
    best = int(np.argmax(mean_scores))
    curve = {p: round(float(v), 3) for p, v in zip(params, mean_scores)}
    logger.info("%s: mean PSNR %s -> best %s", what, curve, params[best])
    if len(params) > 1 and best in (0, len(params) - 1) and params[best] != 0:
        logger.warning(
            "%s: the best value %s is at the edge of the grid %s: the baseline may be better "
            "than tuned; extend that tune.* grid in the config", what, params[best], list(params)
        )
    return params[best], float(mean_scores[best])


def tune_gaussian(pairs: Pairs, sigmas: Sequence[float]) -> tuple[float, float]:
    """Gaussian sigma with the best mean PSNR over ``pairs`` of (lr, hr); returns (sigma, psnr)."""
    _check_grid(pairs, sigmas, "tune_gaussian")
    sigma, score = _tune(pairs, [float(s) for s in sigmas], gaussian_denoise)
    return float(sigma), score


def tune_heat(pairs: Pairs, steps_grid: Sequence[int], dt: float) -> tuple[int, float]:
    """Number of heat-diffusion steps with the best mean PSNR; returns (num_steps, psnr).

    Each pair is diffused once up to max(steps_grid), evaluated at every grid point on the way.
    """
    _check_grid(pairs, steps_grid, "tune_heat")
    grid = sorted({int(s) for s in steps_grid})
    scores = np.zeros(len(grid))
    for lr, hr in pairs:
        _check_volume(lr, "tune_heat")
        _check_heat_args(lr.ndim, grid[0], dt)
        u = lr.float() if not lr.is_floating_point() else lr
        u = u.reshape(1, 1, *u.shape)  # (1, 1, *spatial)
        done = 0
        for i, steps in enumerate(grid):
            u = _heat_steps(u, steps - done, dt)
            done = steps
            scores[i] += psnr(u.reshape(lr.shape), hr)
    return _best(grid, scores / len(pairs), "tune_heat")


def _import_bm4d(caller: str) -> types.ModuleType:
    """The optional ``bm4d`` module, imported lazily; UserError with an install hint if missing."""
    try:
        import bm4d  # noqa: PLC0415 - optional dependency, imported only when asked for
    except (ImportError, OSError) as exc:  # OSError: its binaries need OpenBLAS
        raise UserError(f"{caller} needs the optional 'bm4d' package ({exc}): {BM4D_HINT}") from exc
    return bm4d


def bm4d_available() -> bool:
    """Whether the optional ``bm4d`` package can be imported (and its binaries load)."""
    try:
        _import_bm4d("bm4d_available")
    except UserError:
        return False
    return True


def bm4d_denoise(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """BM4D denoising (Maggioni et al. 2013) of a 2D or 3D volume with white-noise std ``sigma``.

    Needs the optional ``bm4d`` package (non-commercial license, never a required dependency).
    """
    bm4d = _import_bm4d("bm4d_denoise")
    _check_volume(volume, "bm4d_denoise")
    if not sigma > 0:
        raise UserError(f"bm4d_denoise: sigma (noise std) must be > 0, got {sigma}")
    z = volume.detach().cpu().double().numpy()
    z3 = z if z.ndim == 3 else z[..., None]  # bm4d works on 3D volumes
    y = np.asarray(bm4d.bm4d(z3, sigma_psd=float(sigma))).reshape(z.shape)
    dtype = volume.dtype if volume.is_floating_point() else torch.float32
    return torch.from_numpy(y).to(device=volume.device, dtype=dtype)


def tune_bm4d_sigma(pairs: Pairs, sigmas: Sequence[float]) -> tuple[float, float]:
    """BM4D noise std with the best mean PSNR over ``pairs``; returns (sigma, psnr)."""
    _import_bm4d("tune_bm4d_sigma")
    _check_grid(pairs, sigmas, "tune_bm4d_sigma")
    sigma, score = _tune(pairs, [float(s) for s in sigmas], bm4d_denoise)
    return float(sigma), score


# ---------------------------------------------------------------------------------------------
# scikit-image: total variation and non-local means (3D, channel_axis=None)


def _to_numpy(volume: torch.Tensor) -> np.ndarray:
    return volume.detach().cpu().double().numpy()


def _like(y: np.ndarray, volume: torch.Tensor) -> torch.Tensor:
    dtype = volume.dtype if volume.is_floating_point() else torch.float32
    return torch.from_numpy(np.ascontiguousarray(y)).to(device=volume.device, dtype=dtype)


def tv_denoise(volume: torch.Tensor, weight: float) -> torch.Tensor:
    """Total-variation denoising (Chambolle 2004) via ``skimage.restoration``; 0 = identity.

    Larger ``weight`` (in the volume's units) removes more noise and flattens more detail.
    """
    from skimage.restoration import denoise_tv_chambolle  # noqa: PLC0415 - slow import

    _check_volume(volume, "tv_denoise")
    if not weight >= 0:
        raise UserError(f"tv_denoise: weight must be >= 0, got {weight}")
    if weight == 0:
        return volume.clone()
    y = denoise_tv_chambolle(_to_numpy(volume), weight=float(weight), channel_axis=None)
    return _like(y, volume)


def nlm_denoise(
    volume: torch.Tensor, h: float, patch_size: int = 3, patch_distance: int = 3
) -> torch.Tensor:
    """Non-local means (Buades et al. 2005; fast mode of Darbon et al. 2008) via scikit-image.

    ``h`` is the filter strength in the volume's units (0 = identity); patches of
    ``patch_size``^3 voxels compared within a (2 ``patch_distance`` + 1)^3 search window.
    """
    from skimage.restoration import denoise_nl_means  # noqa: PLC0415 - slow import

    _check_volume(volume, "nlm_denoise")
    if not h >= 0:
        raise UserError(f"nlm_denoise: h must be >= 0, got {h}")
    if patch_size < 1 or patch_distance < 1:
        raise UserError(
            f"nlm_denoise: patch_size and patch_distance must be >= 1, got {patch_size}, "
            f"{patch_distance}"
        )
    if h == 0:
        return volume.clone()
    y = denoise_nl_means(
        _to_numpy(volume), h=float(h), patch_size=int(patch_size),
        patch_distance=int(patch_distance), fast_mode=True, channel_axis=None,
    )  # fmt: skip
    return _like(y, volume)


def tune_tv(pairs: Pairs, weights: Sequence[float]) -> tuple[float, float]:
    """TV weight with the best mean PSNR over ``pairs``; returns (weight, psnr)."""
    _check_grid(pairs, weights, "tune_tv")
    weight, score = _tune(pairs, [float(w) for w in weights], tv_denoise)
    return float(weight), score


def tune_nlm(
    pairs: Pairs, hs: Sequence[float], patch_size: int = 3, patch_distance: int = 3
) -> tuple[float, float]:
    """Non-local means strength h with the best mean PSNR over ``pairs``; returns (h, psnr)."""
    _check_grid(pairs, hs, "tune_nlm")

    def denoise(v: torch.Tensor, h: float) -> torch.Tensor:
        return nlm_denoise(v, h, patch_size, patch_distance)

    h, score = _tune(pairs, [float(h) for h in hs], denoise)
    return float(h), score
