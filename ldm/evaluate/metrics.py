"""Image quality metrics on whole volumes: PSNR and SSIM (2D or 3D), matching scikit-image."""

from __future__ import annotations

import math

import numpy as np
import torch

from ldm.core.errors import UserError
from ldm.evaluate.filters import gaussian_blur

ArrayLike = np.ndarray | torch.Tensor

# SSIM constants of Wang et al. 2004, "Image quality assessment: from error visibility to
# structural similarity", eq. (7) and Sec. III-C: an 11-tap Gaussian window with sigma 1.5.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5 -> 11 taps, as scikit-image
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_SLAB_VOXELS = 2**21  # voxels per float64 slab (16 MiB per map) in PSNR and SSIM


def _as_pair(pred: ArrayLike, target: ArrayLike, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as tensors on one device, with shape and finiteness checked.

    The dtype is left as given; callers convert slab by slab to float64, so no full float64
    copy of a large volume is kept alive.
    """
    tensors = []
    for arr in (pred, target):
        t = arr if isinstance(arr, torch.Tensor) else torch.as_tensor(np.asarray(arr))
        tensors.append(t.detach())
    p, t = tensors
    if p.shape != t.shape:
        raise UserError(
            f"{name}: pred and target must have the same shape, got {tuple(p.shape)} "
            f"and {tuple(t.shape)}"
        )
    device = t.device if t.device.type != "mps" else torch.device("cpu")  # mps has no float64
    p, t = p.to(device), t.to(device)
    for label, x in (("pred", p), ("target", t)):
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise UserError(f"{name}: {label} must be finite, got NaN or inf values")
    return p, t


def _chunks(n: int, step: int) -> list[slice]:
    """Consecutive slices of length ``step`` covering range(n)."""
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _data_range(target: torch.Tensor, data_range: float | None, name: str) -> float:
    """The given data range, or target.max() - target.min(); must be > 0."""
    if data_range is None:
        data_range = float(target.max()) - float(target.min())
        if data_range <= 0:
            raise UserError(  # the phases check their HR volumes first and name the file
                f"{name}: the reference (HR) volume is constant (every voxel "
                f"{float(target.reshape(-1)[0]):g}), so the score is undefined; check that the "
                f"reference is the right volume (Python callers: give data_range)"
            )
    elif not data_range > 0:
        raise UserError(f"{name}: data_range must be > 0, got {data_range}")
    return float(data_range)


def psnr(pred: ArrayLike, target: ArrayLike, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(R^2 / MSE); inf when pred == target.

    ``R`` defaults to ``target.max() - target.min()`` (the HR volume's range;
    docs/design.md, "Metrics").
    Same as ``skimage.metrics.peak_signal_noise_ratio``.
    """
    p, t = _as_pair(pred, target, "psnr")
    if p.numel() == 0:
        raise UserError("psnr: inputs must not be empty, got 0 elements")
    r = _data_range(t, data_range, "psnr")
    p, t = p.reshape(-1), t.reshape(-1)
    sse = sum(
        float(((p[c].double() - t[c].double()) ** 2).sum())
        for c in _chunks(p.numel(), _SLAB_VOXELS)
    )
    mse = sse / p.numel()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(r * r / mse)


def _ssim_map_sum(x: torch.Tensor, y: torch.Tensor, r: float, pad: int) -> float:
    """Sum of the SSIM map of one slab over its valid region (``pad`` cropped on every axis).

    Wang et al. 2004 eq. (13) with Gaussian-weighted local statistics:
    SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2)
           / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))
    """
    nd = x.ndim
    sigmas = [SSIM_SIGMA] * nd
    crop = (slice(pad, -pad),) * nd

    def local_mean(a: torch.Tensor) -> torch.Tensor:
        # the border mode only touches voxels that are cropped away below
        return gaussian_blur(a, sigmas, truncate=SSIM_TRUNCATE)[crop]

    c1 = (SSIM_K1 * r) ** 2
    c2 = (SSIM_K2 * r) ** 2
    mu_x = local_mean(x)
    mu_y = local_mean(y)
    # numerator and denominator built up one local statistic at a time to bound memory
    a1 = 2.0 * mu_x * mu_y + c1  # 2 mu_x mu_y + C1
    b1 = mu_x**2 + mu_y**2 + c1  # mu_x^2 + mu_y^2 + C1
    a2 = local_mean(x * y).sub_(mu_x * mu_y).mul_(2.0).add_(c2)  # 2 sigma_xy + C2
    b2 = local_mean(x * x).sub_(mu_x**2)  # sigma_x^2
    del mu_x
    b2.add_(local_mean(y * y)).sub_(mu_y**2).add_(c2)  # sigma_x^2 + sigma_y^2 + C2
    del mu_y
    return float((a1.mul_(a2)).div_(b1.mul_(b2)).sum())


def ssim(pred: ArrayLike, target: ArrayLike, data_range: float | None = None) -> float:
    """Mean structural similarity of a 2D or 3D volume (Wang et al. 2004), Gaussian window.

    Matches ``skimage.metrics.structural_similarity(pred, target, data_range=R,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``: 11-tap Gaussian window
    (sigma 1.5), K1=0.01, K2=0.03, population covariance, mean over the map with the 5-voxel
    border cropped. ``R`` defaults to ``target.max() - target.min()``. Runs in float64 slab by
    slab along the first axis, so a 256^3 volume needs a few hundred MiB at most.
    """
    p, t = _as_pair(pred, target, "ssim")
    if p.ndim not in (2, 3):
        raise UserError(f"ssim: expected a 2D or 3D volume, got shape {tuple(p.shape)}")
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    win = 2 * pad + 1
    if min(p.shape) < win:
        raise UserError(
            f"ssim: every axis must be >= {win} voxels (the SSIM window), got {tuple(p.shape)}"
        )
    r = _data_range(t, data_range, "ssim")
    valid = [n - 2 * pad for n in p.shape]  # valid (cropped) extent per axis
    per_plane = math.prod(valid[1:])
    slab = max(1, _SLAB_VOXELS // per_plane)  # output planes per slab along axis 0
    total = 0.0
    for c in _chunks(valid[0], slab):
        # valid-map planes [start, stop) need input planes [start, stop + 2 pad)
        halo = slice(c.start, c.stop + 2 * pad)
        total += _ssim_map_sum(p[halo].double(), t[halo].double(), r, pad)
    return total / math.prod(valid)


def intensity_fit(
    pred: ArrayLike, target: ArrayLike, data_range: float | None = None
) -> dict[str, float]:
    """Global intensity agreement of ``pred`` with ``target`` (docs/design.md, "Metrics").

    ``bias`` = mean(pred - target) in the volumes' units, ``bias_pct`` = 100 bias / R with
    R = ``data_range`` (default target max - min), and ``contrast`` = 1 / s where s is the slope
    of the least-squares fit target ~ s pred + b, i.e. var(pred) / cov(pred, target): 1 keeps the
    target's contrast, < 1 flattens it, > 1 exaggerates it. HR is regressed on the output, not
    the other way round: the output of an ideal denoiser (the conditional mean E[HR | LR]) has
    s = 1 exactly, whereas the slope of output on HR is below 1 for every denoiser that removes
    noise and would call its shrinkage lost contrast. A learned model can shift or scale
    intensities on data unlike its training set while PSNR alone only says that something is off.
    """
    p, t = _as_pair(pred, target, "intensity_fit")
    if p.numel() < 2:
        raise UserError("intensity_fit: need at least 2 voxels")
    r = _data_range(t, data_range, "intensity_fit")
    p, t = p.reshape(-1), t.reshape(-1)
    sums = torch.zeros(5, dtype=torch.float64, device=t.device)  # p, t, p t, p p, count
    for c in _chunks(p.numel(), _SLAB_VOXELS):
        pc, tc = p[c].double(), t[c].double()
        sums += torch.stack([pc.sum(), tc.sum(), (pc * tc).sum(), (pc * pc).sum(),
                             torch.tensor(float(pc.numel()), dtype=torch.float64)])  # fmt: skip
    sp, st, spt, spp, n = (float(v) for v in sums)
    mp, mt = sp / n, st / n
    var_p = spp / n - mp * mp
    cov = spt / n - mp * mt
    bias = mp - mt
    contrast = var_p / cov if cov > 0 else math.nan
    return {"bias": bias, "bias_pct": 100.0 * bias / r, "contrast": contrast}
