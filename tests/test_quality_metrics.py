"""Sharpness, frequency and calibration metrics against hand-computed values on tiny volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import ldm.evaluate.quality_metrics.sharpness as qm
from ldm.core.errors import UserError
from ldm.evaluate.quality_metrics import (
    cutoff_for_blur,
    edge_sharpness_ratio,
    fourier_shell_correlation,
    high_band_fsc,
    high_frequency_energy_ratio,
    latent_sensitivity,
    sparsification,
    variance_to_error_ratio,
)


def _step(n: int = 16) -> np.ndarray:
    """0 for the first half of axis 0, 1 for the second: one flat edge between planes 7 and 8."""
    t = np.zeros((n, n, n))
    t[n // 2 :] = 1.0
    return t


def _cos(shape: tuple[int, ...], axis: int, m: int) -> np.ndarray:
    """cos(2 pi m x / N) along ``axis``: all its energy at |k| = m / N cycles/voxel."""
    x = np.arange(shape[axis])
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(np.cos(2 * np.pi * m * x / shape[axis]).reshape(view), shape).copy()


def _full_k(shape: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    return np.sqrt(sum(g**2 for g in grids))


# ---------------------------------------------------------------------------- edge sharpness


def test_esr_identical_is_exactly_one_and_scaled_is_two():
    rng = np.random.default_rng(0)
    t = ndimage.gaussian_filter(rng.random((12, 12, 12)), 1.0)
    assert edge_sharpness_ratio(t, t) == 1.0
    assert edge_sharpness_ratio(2.0 * t, t) == 2.0
    assert edge_sharpness_ratio(0.5 * t + 3.0, t) == pytest.approx(0.5, abs=1e-12)


def test_esr_of_a_ramp_edge_by_hand():
    # target: a unit step between planes 7 and 8, where the Sobel derivative along axis 0 is
    # (x[i+1] - x[i-1]) * 16 = 16 (the 1-2-1 smoothing on the two flat axes gives 4 * 4) and 0
    # elsewhere. The top 12.5 % of 16^3 voxels are exactly those two planes. pred ramps over
    # them (0, 1/3, 2/3, 1 at planes 6..9): its derivative there is 2/3 * 16, so ESR = 2/3.
    t = _step()
    p = t.copy()
    p[7], p[8] = 1 / 3, 2 / 3
    assert edge_sharpness_ratio(p, t, top_fraction=0.125) == pytest.approx(2 / 3, abs=1e-12)


def test_esr_of_a_blurred_step_is_below_one():
    t = _step()
    esr = edge_sharpness_ratio(ndimage.gaussian_filter(t, 1.5), t)
    assert 0.2 < esr < 0.8
    # more blur, flatter edges
    assert edge_sharpness_ratio(ndimage.gaussian_filter(t, 3.0), t) < esr


def test_esr_2d_and_torch_match_numpy():
    rng = np.random.default_rng(1)
    t = ndimage.gaussian_filter(rng.random((20, 24)), 1.0)
    p = ndimage.gaussian_filter(t, 1.0)
    ref = edge_sharpness_ratio(p, t, 0.1)
    assert 0.0 < ref < 1.0
    got = edge_sharpness_ratio(torch.tensor(p, dtype=torch.float32), torch.tensor(t), 0.1)
    assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("shape", [(7, 9, 5), (11, 6), (1, 5, 4)])
def test_sobel_numpy_fallback_matches_scipy(shape, monkeypatch):
    # reference: scipy's Sobel with its default 'reflect' border, magnitude over all axes
    x = np.random.default_rng(2).random(shape)
    ref = np.sqrt(sum(ndimage.sobel(x, axis=a) ** 2 for a in range(x.ndim)))
    np.testing.assert_allclose(qm._sobel_magnitude(x), ref, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(qm, "_ndimage", None)
    np.testing.assert_allclose(qm._sobel_magnitude(x), ref, rtol=1e-12, atol=1e-12)


def test_esr_rejects_constant_target_and_bad_fraction():
    t = np.ones((6, 6, 6))
    with pytest.raises(UserError, match="no edges"):
        edge_sharpness_ratio(t, t)
    with pytest.raises(UserError, match="top_fraction"):
        edge_sharpness_ratio(_step(8), _step(8), top_fraction=0.0)


# ---------------------------------------------------------------------------- HFER


def test_hfer_identical_is_one():
    t = np.random.default_rng(3).random((8, 10, 12))
    assert high_frequency_energy_ratio(t, t, 0.2) == pytest.approx(1.0, abs=1e-12)


def test_hfer_of_cosines_by_hand():
    # low: 3 cycles in 32 along axis 0 (|k| = 0.09375); high: 12 in 32 along axis 2 (0.375, the
    # half-spectrum axis). A cosine of amplitude A on N voxels has energy N A^2 / 2, so
    # pred = low + 0.5 high against target = low + high gives 0.25 above a cutoff of 0.25 and
    # (1 + 0.25) / (1 + 1) = 0.625 above 0.05, where both cosines count.
    shape = (32, 4, 32)
    low, high = _cos(shape, 0, 3), _cos(shape, 2, 12)
    t, p = low + high, low + 0.5 * high
    assert high_frequency_energy_ratio(p, t, 0.25) == pytest.approx(0.25, abs=1e-12)
    assert high_frequency_energy_ratio(p, t, 0.05) == pytest.approx(0.625, abs=1e-12)
    # the same in 2D, the high cosine now along axis 0 (the full-spectrum axis)
    s2 = (32, 16)
    t2 = _cos(s2, 0, 12) + _cos(s2, 1, 2)
    p2 = 2.0 * _cos(s2, 0, 12) + _cos(s2, 1, 2)
    assert high_frequency_energy_ratio(p2, t2, 0.2) == pytest.approx(4.0, abs=1e-12)


def test_hfer_zero_when_pred_has_no_high_band():
    shape = (32, 4, 32)
    t = _cos(shape, 0, 3) + _cos(shape, 2, 12)
    p = 5.0 + _cos(shape, 0, 3)  # a constant and a low cosine only
    assert high_frequency_energy_ratio(p, t, 0.25) < 1e-20


@pytest.mark.parametrize("shape", [(5, 6, 7), (6, 7, 8), (9, 10), (4, 4, 5)])
def test_hfer_half_spectrum_matches_full_fft(shape):
    rng = np.random.default_rng(4)
    p, t = rng.random(shape), rng.random(shape)
    k = _full_k(shape)
    for cutoff in (0.1, 0.3, 0.45):
        high = k > cutoff
        ref = (np.abs(np.fft.fftn(p)) ** 2)[high].sum() / (np.abs(np.fft.fftn(t)) ** 2)[high].sum()
        assert high_frequency_energy_ratio(p, t, cutoff) == pytest.approx(ref, rel=1e-12)


def test_hfer_rejects_bad_cutoff_and_target_without_high_band():
    shape = (16, 16, 16)
    t = _cos(shape, 0, 2)
    with pytest.raises(UserError, match="no energy above cutoff"):
        high_frequency_energy_ratio(t, t, 0.3)
    for bad in (0.0, -0.1, 0.5 * math.sqrt(3)):
        with pytest.raises(UserError, match="cutoff must be in"):
            high_frequency_energy_ratio(t, t, bad)


# ---------------------------------------------------------------------------- cutoff_for_blur


def _mtf(k: float, sigma: float, factor: float) -> float:
    return math.exp(-2 * math.pi**2 * sigma**2 * k**2) * abs(np.sinc(factor * k))


@pytest.mark.parametrize("sigma,factor", [(1.0, 1.0), (0.5, 2.0), (2.0, 4.0), (0.8, 1.0)])
def test_cutoff_for_blur_halves_the_mtf(sigma, factor):
    k = cutoff_for_blur(sigma, factor)
    assert 0.0 < k <= 0.5
    assert _mtf(k, sigma, factor) == pytest.approx(0.5, abs=1e-10)


def test_cutoff_for_blur_closed_forms_and_fallback():
    # box only: sinc(2 k) = 0.5 at 2 k = 0.6033545644 (sin(pi x) = pi x / 2)
    assert cutoff_for_blur(0.0, 2.0) == pytest.approx(0.6033545644 / 2, abs=1e-9)
    # Gaussian only (a negligible box): exp(-2 pi^2 s^2 k^2) = 0.5 at k = sqrt(ln 2 / 2) / (pi s)
    assert cutoff_for_blur(3.0, 1e-9) == pytest.approx(
        math.sqrt(math.log(2) / 2) / (math.pi * 3.0), abs=1e-9
    )
    # no blur: MTF(0.5) = sinc(0.5) = 0.64 > 0.5, documented fallback: half of Nyquist
    assert cutoff_for_blur(0.0, 1.0) == 0.25
    assert cutoff_for_blur(2.0) < cutoff_for_blur(1.0)
    with pytest.raises(UserError):
        cutoff_for_blur(-1.0)
    with pytest.raises(UserError):
        cutoff_for_blur(1.0, 0.0)


# ---------------------------------------------------------------------------- FSC


def test_fsc_identical_is_one_and_negated_is_minus_one():
    t = np.random.default_rng(5).random((16, 16, 16))
    freqs, fsc = fourier_shell_correlation(t, t, n_shells=8)
    assert len(freqs) == 8  # every shell of a random volume has energy
    np.testing.assert_allclose(freqs, (np.arange(8) + 0.5) / 16)
    np.testing.assert_allclose(fsc, 1.0, atol=1e-12)
    _, fsc_neg = fourier_shell_correlation(-t, t, n_shells=8)
    np.testing.assert_allclose(fsc_neg, -1.0, atol=1e-12)
    assert high_band_fsc(t, t, 0.25) == pytest.approx(1.0, abs=1e-12)
    assert high_band_fsc(-t, t, 0.25) == pytest.approx(-1.0, abs=1e-12)


def test_fsc_of_independent_noise_is_near_zero():
    rng = np.random.default_rng(6)
    p, t = rng.normal(size=(32, 32, 32)), rng.normal(size=(32, 32, 32))
    freqs, fsc = fourier_shell_correlation(p, t, n_shells=8)
    # the lowest shells hold a handful of coefficients (the DC shell only one, FSC +-1): skip
    outer = fsc[freqs > 0.1]
    assert outer.size == 6
    assert np.abs(outer).max() < 0.1
    assert abs(high_band_fsc(p, t, 0.1, n_shells=8)) < 0.05


def test_fsc_of_cosines_skips_empty_shells_and_weighs_shells_equally():
    # low cosine (3/32, centre of shell 1 of 8) kept, high one (11/32, centre of shell 5)
    # inverted. Every other shell, the DC one included (the cosines have zero mean), holds only
    # FFT round-off and is skipped.
    shape = (32, 4, 32)
    low, high = _cos(shape, 0, 3), _cos(shape, 2, 11)
    t, p = 3.0 * low + high, 3.0 * low - high
    freqs, fsc = fourier_shell_correlation(p, t, n_shells=8)
    np.testing.assert_allclose(freqs, [3 / 32, 11 / 32])
    np.testing.assert_allclose(fsc, [1.0, -1.0], atol=1e-12)
    # equal weights: (1 + -1) / 2 = 0; an energy-weighted mean would give (9 - 1) / 10 = 0.8
    assert high_band_fsc(p, t, 0.05, n_shells=8) == pytest.approx(0.0, abs=1e-12)
    assert high_band_fsc(p, t, 0.2, n_shells=8) == pytest.approx(-1.0, abs=1e-12)
    with pytest.raises(UserError, match="no shell"):
        high_band_fsc(p, t, 0.4, n_shells=8)


@pytest.mark.parametrize("shape", [(5, 6, 7), (6, 8, 10), (9, 12)])
def test_fsc_half_spectrum_matches_full_fft(shape):
    rng = np.random.default_rng(7)
    t = rng.random(shape)
    p = t + rng.normal(0, 0.3, shape)
    n_shells = 4
    freqs, fsc = fourier_shell_correlation(p, t, n_shells=n_shells)
    fp, ft, k = np.fft.fftn(p), np.fft.fftn(t), _full_k(shape)
    edges = np.linspace(0, 0.5, n_shells + 1)
    ref = []
    for i in range(n_shells):
        s = (k >= edges[i]) & ((k < edges[i + 1]) | ((i == n_shells - 1) & (k == 0.5)))
        num = (fp[s] * np.conj(ft[s])).real.sum()
        ref.append(num / np.sqrt((np.abs(fp[s]) ** 2).sum() * (np.abs(ft[s]) ** 2).sum()))
    np.testing.assert_allclose(freqs, (edges[:-1] + edges[1:]) / 2)
    np.testing.assert_allclose(fsc, ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- calibration


def test_variance_to_error_ratio_by_hand():
    shape = (2, 3, 4)
    t = np.arange(24.0).reshape(shape)
    assert variance_to_error_ratio(np.ones(shape), t + 2.0, t) == pytest.approx(0.25)
    # std 1 and 3 on halves (mean std^2 = 5), errors +-1 (mean squared error 1)
    std = np.where(np.arange(24).reshape(shape) < 12, 1.0, 3.0)
    err = np.where(np.arange(24).reshape(shape) % 2 == 0, 1.0, -1.0)
    assert variance_to_error_ratio(std, t + err, t) == pytest.approx(5.0)


def test_variance_to_error_ratio_of_calibrated_samples_is_n_over_n_plus_1():
    rng = np.random.default_rng(8)
    n, shape = 4, (32, 32, 32)
    mu = rng.normal(size=shape)
    sigma = rng.uniform(0.5, 2.0, shape)
    samples = mu + sigma * rng.normal(size=(n, *shape))
    target = mu + sigma * rng.normal(size=shape)  # one more draw from the same posterior
    ratio = variance_to_error_ratio(samples.std(0, ddof=1), samples.mean(0), target)
    assert ratio == pytest.approx(n / (n + 1), abs=0.03)


def test_sparsification_by_hand():
    # errors 4, 3, 2, 1 (squared 16, 9, 4, 1; MSE 7.5) with std ranking them backwards.
    # oracle: remove 16, then 9, then 4: MSEs 7.5, 14/3, 5/2, 1 -> / 7.5
    # by std: remove 1, then 4, then 9:   MSEs 7.5, 29/3, 25/2, 16 -> / 7.5
    # differences 0, 2/3, 4/3, 2: AUSE (plain mean) = 1
    target = np.zeros(4)
    mean = np.array([4.0, 3.0, 2.0, 1.0])
    std = np.array([1.0, 2.0, 3.0, 4.0])
    out = sparsification(std, mean, target, steps=4)
    np.testing.assert_allclose(out["fractions"], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(out["by_error"], np.array([7.5, 14 / 3, 2.5, 1.0]) / 7.5)
    np.testing.assert_allclose(out["by_std"], np.array([7.5, 29 / 3, 12.5, 16.0]) / 7.5)
    assert out["ause"] == pytest.approx(1.0)
    # std ranking the errors correctly is the oracle
    assert sparsification(mean, mean, target, steps=4)["ause"] == 0.0


def test_sparsification_perfect_and_random_std():
    rng = np.random.default_rng(9)
    shape = (32, 32, 32)
    target = rng.normal(size=shape)
    mean = target + rng.normal(size=shape) * rng.uniform(0.1, 2.0, shape)
    perfect = sparsification(np.abs(mean - target), mean, target)
    assert perfect["ause"] == 0.0
    np.testing.assert_array_equal(perfect["by_std"], perfect["by_error"])
    assert len(perfect["fractions"]) == 20
    rand = sparsification(rng.random(shape), mean, target)
    assert rand["ause_random"] > 0.3
    assert rand["ause"] == pytest.approx(rand["ause_random"], abs=0.05)
    # ause_random is about the area between the constant curve 1 and the oracle
    assert rand["ause_random"] == pytest.approx(np.mean(1.0 - rand["by_error"]), abs=0.05)
    # the random ranking is reproducible (fixed seed)
    again = sparsification(rng.random(shape), mean, target)
    assert again["ause_random"] == rand["ause_random"]


def test_calibration_rejects_negative_std_and_zero_error():
    t = np.zeros((2, 2, 2))
    with pytest.raises(UserError, match="std must be >= 0"):
        variance_to_error_ratio(-np.ones((2, 2, 2)), t + 1, t)
    with pytest.raises(UserError, match="std must be >= 0"):
        sparsification(-np.ones((2, 2, 2)), t + 1, t)
    with pytest.raises(UserError, match="mean equals target"):
        variance_to_error_ratio(np.ones((2, 2, 2)), t, t)
    with pytest.raises(UserError, match="mean equals target"):
        sparsification(np.ones((2, 2, 2)), t, t)
    with pytest.raises(UserError, match="steps"):
        sparsification(np.ones((2, 2, 2)), t + 1, t, steps=0)


# ---------------------------------------------------------------------------- latent sensitivity


def test_latent_sensitivity_by_hand():
    # decoded outputs 0.5 apart on all 8 voxels: 8 * 0.25 = 2; restorer off by 2 on one voxel: 4
    a = np.zeros((2, 2, 2))
    b = np.full((2, 2, 2), 0.5)
    target = np.arange(8.0).reshape(2, 2, 2)
    restorer = target.copy()
    restorer[1, 0, 1] -= 2.0
    assert latent_sensitivity(a, b, target, restorer) == pytest.approx(0.5)
    assert latent_sensitivity(torch.tensor(b), a, torch.tensor(target), restorer) == 0.5
    with pytest.raises(UserError, match="denominator"):
        latent_sensitivity(a, b, target, target)


# ---------------------------------------------------------------------------- bad input


def _calls(x: np.ndarray, y: np.ndarray) -> list:
    ones = np.ones_like(y)
    return [
        lambda: edge_sharpness_ratio(x, y),
        lambda: high_frequency_energy_ratio(x, y, 0.2),
        lambda: fourier_shell_correlation(x, y),
        lambda: high_band_fsc(x, y, 0.2),
        lambda: variance_to_error_ratio(ones, x, y),
        lambda: sparsification(ones, x, y),
        lambda: latent_sensitivity(x, y, y, ones),
    ]


def test_shape_mismatch_raises():
    rng = np.random.default_rng(10)
    for call in _calls(rng.random((4, 4, 4)), rng.random((4, 4, 5))):
        with pytest.raises(UserError, match="same shape"):
            call()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_raises(bad):
    rng = np.random.default_rng(11)
    x, y = rng.random((4, 4, 4)), rng.random((4, 4, 4))
    x[1, 2, 3] = bad
    for call in _calls(x, y):
        with pytest.raises(UserError, match="finite"):
            call()
    nan_t = torch.tensor(x)
    with pytest.raises(UserError, match="finite"):
        edge_sharpness_ratio(torch.tensor(y), nan_t)


def test_spatial_metrics_need_2d_or_3d():
    x = np.random.default_rng(12).random(16)
    with pytest.raises(UserError, match="2D"):
        edge_sharpness_ratio(x, x)
    with pytest.raises(UserError, match="2D"):
        fourier_shell_correlation(x[None, None, None], x[None, None, None])
