"""Sharpness and frequency content of an output against its target: what detail was kept.

* ``edge_sharpness_ratio`` (ESR): the gradient magnitude on the target's edges;
* ``high_frequency_energy_ratio`` (HFER): spectral energy above a cutoff;
* ``fourier_shell_correlation`` and ``high_band_fsc``: whether the detail is in the right place;
* ``cutoff_for_blur``: the cutoff where a known blur halves the contrast (the band a restorer
  must recover).
"""

from __future__ import annotations

import math

import numpy as np

from ldm.core.errors import UserError
from ldm.evaluate.quality_metrics.inputs import ArrayLike, _as_arrays

try:  # scipy comes with scikit-image; the numpy fallback below gives the same Sobel filter
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - exercised by monkeypatching _ndimage in the tests
    _ndimage = None

# A spectral band (or a shell) whose energy is at most this fraction of the volume's total
# energy counts as empty: FFT round-off leaves ~1e-32 relative energy in bands that are zero in
# exact arithmetic, and a ratio of two such round-off values means nothing.
_ZERO_ENERGY_REL = 1e-20


def _sobel_numpy(x: np.ndarray, axis: int) -> np.ndarray:
    """Sobel derivative along ``axis``, same as ``scipy.ndimage.sobel(x, axis, mode='reflect')``.

    Separable: correlate with [-1, 0, 1] along ``axis`` and with the smoothing [1, 2, 1] along
    every other axis; scipy's 'reflect' border (d c b a | a b c d) is numpy's 'symmetric' pad.
    """
    out = x
    for ax in range(x.ndim):
        pad = [(1, 1) if a == ax else (0, 0) for a in range(x.ndim)]
        p = np.moveaxis(np.pad(out, pad, mode="symmetric"), ax, 0)
        lo, mid, hi = p[:-2], p[1:-1], p[2:]  # x[i - 1], x[i], x[i + 1] along ax
        out = np.moveaxis(hi - lo if ax == axis else lo + 2.0 * mid + hi, 0, ax)
    return out


def _sobel_magnitude(x: np.ndarray) -> np.ndarray:
    """|grad x| with the Sobel filter: sqrt of the sum over axes of the squared derivatives."""
    total = np.zeros_like(x)
    for axis in range(x.ndim):
        if _ndimage is not None:
            g = _ndimage.sobel(x, axis=axis, mode="reflect")
        else:
            g = _sobel_numpy(x, axis)
        total += g * g
    return np.sqrt(total)


def edge_sharpness_ratio(pred: ArrayLike, target: ArrayLike, top_fraction: float = 0.05) -> float:
    """Edge sharpness ratio ESR = mean_E |grad pred| / mean_E |grad target|; ideal 1.

    E is the set of the ``ceil(top_fraction * n)`` voxels with the largest target gradient
    magnitude (the target's edges; ties at the threshold broken by ``np.argpartition``, which is
    deterministic). The gradient is the 2D or 3D Sobel filter (``scipy.ndimage.sobel`` per axis,
    'reflect' border) and its magnitude the sqrt of the sum of squares over axes. A blurred
    output has flatter edges and gives ESR < 1; ringing or over-sharpening gives > 1. Unlike
    PSNR, ESR does not reward a smooth conditional-mean estimate.
    """
    p, t = _as_arrays("edge_sharpness_ratio", True, pred=pred, target=target)
    if not 0.0 < top_fraction <= 1.0:
        raise UserError(f"edge_sharpness_ratio: top_fraction must be in (0, 1], got {top_fraction}")
    gt = _sobel_magnitude(t).reshape(-1)
    k = max(1, math.ceil(top_fraction * gt.size))
    edges = np.argpartition(-gt, k - 1)[:k]
    den = float(gt[edges].mean())
    if den == 0.0:
        raise UserError("edge_sharpness_ratio: target is constant, so it has no edges")
    gp = _sobel_magnitude(p).reshape(-1)
    return float(gp[edges].mean()) / den


# --------------------------------------------------------------------------------------------
# frequency content


def _half_spectrum(x: np.ndarray) -> np.ndarray:
    """``np.fft.rfftn(x)``: the half spectrum of a real volume (half the memory of fftn)."""
    return np.fft.rfftn(x)


def _radial_frequency(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """|k| in cycles per voxel on the rfftn grid of ``shape``, and the weight of each bin.

    k_i = ``np.fft.fftfreq`` per axis (``rfftfreq`` on the last) and |k| = sqrt(sum k_i^2). The
    weight counts how many bins of the full fftn spectrum a half-spectrum bin stands for: 2 for
    the bins whose conjugate twin (same |k|, same |F|^2, same Re P conj T) was dropped, 1 on
    the last-axis planes 0 and n/2 (n even), whose twins are kept. Sums of weight * |F|^2 over
    any set of |k| values are then the full-spectrum sums.
    """
    nd = len(shape)
    k2 = np.zeros([1] * nd)
    for ax, n in enumerate(shape):
        f = np.fft.rfftfreq(n) if ax == nd - 1 else np.fft.fftfreq(n)
        view = [1] * nd
        view[ax] = f.size
        k2 = k2 + (f**2).reshape(view)
    n_last = shape[-1]
    w = np.full(n_last // 2 + 1, 2.0)
    w[0] = 1.0
    if n_last % 2 == 0:
        w[-1] = 1.0
    weight = np.broadcast_to(w.reshape([1] * (nd - 1) + [-1]), k2.shape)
    return np.sqrt(k2), weight


def high_frequency_energy_ratio(pred: ArrayLike, target: ArrayLike, cutoff: float) -> float:
    """High-frequency energy ratio HFER = sum_{|k|>c} |FFT pred|^2 / sum_{|k|>c} |FFT target|^2.

    k is the radial frequency in cycles per voxel (``np.fft.fftfreq`` per axis,
    |k| = sqrt(sum k_i^2)) and c = ``cutoff`` in (0, 0.5 sqrt(ndim)), the corner of the
    spectrum. By Parseval this is the energy of the high-pass part of pred over that of target:
    1 keeps the target's fine detail, < 1 means it was smoothed away, > 1 means extra
    high-frequency content (noise, hallucinated texture). Pair it with FSC, which says whether
    that content is in the right place. ``cutoff_for_blur`` gives a cutoff above which a known
    blur has removed more than half the contrast.
    """
    name = "high_frequency_energy_ratio"
    p, t = _as_arrays(name, True, pred=pred, target=target)
    k_max = 0.5 * math.sqrt(p.ndim)
    if not 0.0 < cutoff < k_max:
        raise UserError(f"{name}: cutoff must be in (0, {k_max:.4g}) cycles/voxel, got {cutoff}")
    k, w = _radial_frequency(p.shape)
    high = k > cutoff
    pt = _half_spectrum(t)
    et = w * (pt.real**2 + pt.imag**2)
    den = float(et[high].sum())
    if not den > _ZERO_ENERGY_REL * float(et.sum()):
        raise UserError(
            f"{name}: target has no energy above cutoff {cutoff} cycles/voxel, so the ratio "
            "is undefined; lower the cutoff"
        )
    del pt, et
    pp = _half_spectrum(p)
    num = float((w * (pp.real**2 + pp.imag**2))[high].sum())
    return num / den


def _blur_mtf(k: float, sigma: float, factor: float) -> float:
    """Gaussian MTF exp(-2 pi^2 sigma^2 k^2) times the box MTF |sinc(factor k)|."""
    return math.exp(-2.0 * math.pi**2 * sigma**2 * k**2) * abs(float(np.sinc(factor * k)))


def cutoff_for_blur(sigma: float, factor: float = 1.0) -> float:
    """Radial frequency (cycles/voxel) where a blur keeps half the contrast: MTF(k) = 0.5.

    The blur is a Gaussian of std ``sigma`` voxels followed by averaging over ``factor`` voxels
    (a box, e.g. the block mean of a downsampling by ``factor``), so
    MTF(k) = exp(-2 pi^2 sigma^2 k^2) |sinc(factor k)|, sinc(x) = sin(pi x) / (pi x). MTF(0) = 1
    and MTF falls monotonically until it first drops below 0.5 (the box's side lobes stay below
    0.22), so bisection on (0, 0.5] finds the unique crossing to ~1e-15. Above this frequency
    the degraded input holds less than half the target's contrast: the band a restorer must
    recover, for ``high_frequency_energy_ratio`` and ``high_band_fsc``.

    Fallback: when MTF(0.5) >= 0.5 the blur never halves the contrast below Nyquist (e.g.
    sigma 0 and factor 1: MTF(0.5) = sinc(0.5) = 0.64) and the function returns 0.25, half of
    Nyquist, as a conventional "high band" cutoff. Note the jump: a blur whose crossing is just
    below 0.5 returns ~0.5, a slightly weaker one returns 0.25.
    """
    if not (math.isfinite(sigma) and sigma >= 0.0):
        raise UserError(f"cutoff_for_blur: sigma must be finite and >= 0, got {sigma}")
    if not (math.isfinite(factor) and factor > 0.0):
        raise UserError(f"cutoff_for_blur: factor must be finite and > 0, got {factor}")
    lo, hi = 0.0, 0.5
    if _blur_mtf(hi, sigma, factor) >= 0.5:
        return 0.25
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _blur_mtf(mid, sigma, factor) > 0.5:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def _shell_sums(
    p: np.ndarray, t: np.ndarray, n_shells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Per-shell sums of Re P conj T, |P|^2 and |T|^2 over shells of width 0.5 / n_shells.

    Shell i holds i * 0.5 / n_shells <= |k| < (i + 1) * 0.5 / n_shells; |k| = 0.5 goes into the
    last shell and the corners beyond 0.5 into none. Also returns the total energies of P and T
    (all bins) for the empty-shell test.
    """
    k, w = _radial_frequency(p.shape)
    shell = np.floor(k * (2.0 * n_shells)).astype(np.int64)
    shell[k == 0.5] = n_shells - 1
    inside = shell < n_shells
    idx = shell[inside]
    fp, ft = _half_spectrum(p), _half_spectrum(t)
    ep_all = w * (fp.real**2 + fp.imag**2)
    et_all = w * (ft.real**2 + ft.imag**2)
    cross = (w * (fp.real * ft.real + fp.imag * ft.imag))[inside]
    ep, et = ep_all[inside], et_all[inside]
    del fp, ft
    sums = [np.bincount(idx, weights=v, minlength=n_shells) for v in (cross, ep, et)]
    centres = (np.arange(n_shells) + 0.5) * (0.5 / n_shells)
    return centres, sums[0], sums[1], sums[2], float(ep_all.sum()), float(et_all.sum())


def fourier_shell_correlation(
    pred: ArrayLike, target: ArrayLike, n_shells: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation FSC(k) = Re sum_S P conj(T) / sqrt(sum_S |P|^2 sum_S |T|^2).

    P, T are the FFTs of pred and target and S the radial shells of equal width 0.5 / n_shells
    from 0 to 0.5 cycles/voxel (Nyquist; the spectrum's corners beyond 0.5 are left out). FSC is
    the correlation of the two volumes restricted to one band of frequencies: 1 where pred
    reproduces the target's structure at that scale, about 0 where it is unrelated (pure noise
    or invented texture), -1 where it is inverted; an amplitude error alone (a uniformly scaled
    band) leaves FSC at 1, so read it next to ``high_frequency_energy_ratio``.

    Returns ``(freqs, fsc)``: the centres (cycles/voxel) of the shells where both pred and
    target have energy, and their FSC. Shells where either has no energy (none at all, or at
    most 1e-20 of its total energy, i.e. FFT round-off) are skipped, since FSC is 0 / 0 there.
    """
    name = "fourier_shell_correlation"
    p, t = _as_arrays(name, True, pred=pred, target=target)
    if isinstance(n_shells, bool) or not isinstance(n_shells, int | np.integer) or n_shells < 1:
        raise UserError(f"{name}: n_shells must be an integer >= 1, got {n_shells!r}")
    centres, cross, ep, et, ep_tot, et_tot = _shell_sums(p, t, int(n_shells))
    keep = (ep > _ZERO_ENERGY_REL * ep_tot) & (et > _ZERO_ENERGY_REL * et_tot)
    fsc = cross[keep] / np.sqrt(ep[keep] * et[keep])
    return centres[keep], np.clip(fsc, -1.0, 1.0)


def high_band_fsc(pred: ArrayLike, target: ArrayLike, cutoff: float, n_shells: int = 16) -> float:
    """Mean FSC over the shells whose centre is above ``cutoff`` cycles/voxel, in (0, 0.5).

    Every shell weighs the same (not by its energy or voxel count), so the few high-energy low
    shells just above the cutoff do not drown the finest scales. Shells without energy are
    skipped as in ``fourier_shell_correlation``; if none is left, ``UserError``.
    """
    if not 0.0 < cutoff < 0.5:
        raise UserError(f"high_band_fsc: cutoff must be in (0, 0.5) cycles/voxel, got {cutoff}")
    freqs, fsc = fourier_shell_correlation(pred, target, n_shells)
    band = fsc[freqs > cutoff]
    if band.size == 0:
        raise UserError(
            f"high_band_fsc: no shell with energy has its centre above cutoff {cutoff} "
            f"cycles/voxel (with n_shells={n_shells}); lower the cutoff"
        )
    return float(band.mean())
