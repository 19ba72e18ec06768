"""PSNR and SSIM against scikit-image's reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import ldm.evaluate.metrics as metrics
from ldm.core.errors import UserError
from ldm.evaluate.metrics import psnr, ssim


def _blobs(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth blob volume (target) and a noisy, slightly biased copy of it (pred)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    target = np.zeros(shape)
    for _ in range(4):
        centre = rng.uniform(0.2, 0.8, len(shape))
        d2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        target += rng.uniform(50, 200) * np.exp(-d2 / (2 * rng.uniform(0.05, 0.2) ** 2))
    pred = 0.9 * target + 5.0 + rng.normal(0, 10.0, shape)
    return pred, target


def _random(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    return target + rng.normal(0, 0.2, shape), target


def _sk_ssim(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    return structural_similarity(
        pred,
        target,
        data_range=data_range,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )


CASES = [
    (_blobs, (40, 33)),
    (_random, (24, 31)),
    (_blobs, (20, 17, 23)),
    (_random, (13, 16, 12)),
]


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_psnr_matches_skimage(make, shape) -> None:
    pred, target = make(shape, seed=len(shape))
    r = float(target.max() - target.min())
    expected = peak_signal_noise_ratio(target, pred, data_range=r)
    assert psnr(pred, target) == pytest.approx(expected, abs=1e-3)
    assert psnr(torch.from_numpy(pred), torch.from_numpy(target), data_range=2.5) == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=2.5), abs=1e-3
    )


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_ssim_matches_skimage(make, shape) -> None:
    pred, target = make(shape, seed=len(shape) + 7)
    r = float(target.max() - target.min())
    got = ssim(torch.from_numpy(pred).float(), torch.from_numpy(target).float())
    assert got == pytest.approx(_sk_ssim(pred, target, r), abs=1e-3)
    # an explicit data range other than the target's
    assert ssim(pred, target, data_range=3 * r) == pytest.approx(
        _sk_ssim(pred, target, 3 * r), abs=1e-3
    )


def test_ssim_slabs_match_one_pass(monkeypatch) -> None:
    pred, target = _blobs((14, 12, 13), seed=3)
    whole = ssim(pred, target)
    monkeypatch.setattr(metrics, "_SLAB_VOXELS", 1)  # one output plane per slab
    assert ssim(pred, target) == pytest.approx(whole, abs=1e-12)
    assert whole == pytest.approx(_sk_ssim(pred, target, float(np.ptp(target))), abs=1e-3)


def test_known_values() -> None:
    x = torch.rand(12, 14, 13, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # MSE 0.01 with data range 1 -> 20 dB
    target = torch.zeros(20, 20, dtype=torch.float64)
    target[0, 0] = 1.0
    pred = target + 0.1
    assert psnr(pred, target) == pytest.approx(20.0, abs=1e-9)
    # a constant offset of the whole volume lowers SSIM through the luminance term only
    assert ssim(x + 0.5, x) < 0.9


def test_shape_mismatch_raises() -> None:
    with pytest.raises(UserError, match="same shape"):
        psnr(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(UserError, match="same shape"):
        ssim(np.zeros((12, 12)), np.zeros((12, 13)))


def test_nan_raises() -> None:
    x = np.random.default_rng(0).random((12, 12))
    y = x.copy()
    y[3, 4] = np.nan
    with pytest.raises(UserError, match="finite"):
        psnr(y, x)
    with pytest.raises(UserError, match="finite"):
        ssim(x, y)


def test_bad_data_range_raises() -> None:
    x = np.random.default_rng(0).random((12, 12))
    with pytest.raises(UserError, match="data_range"):
        psnr(x, np.ones((12, 12)))
    with pytest.raises(UserError, match="data_range"):
        ssim(x, x, data_range=0.0)


def test_ssim_too_small_or_wrong_dims_raises() -> None:
    with pytest.raises(UserError, match=">= 11"):
        ssim(np.zeros((12, 10)), np.zeros((12, 10)), data_range=1.0)
    with pytest.raises(UserError, match="2D or 3D"):
        ssim(np.zeros((12,) * 4), np.zeros((12,) * 4), data_range=1.0)
    with pytest.raises(UserError, match="empty"):
        psnr(np.zeros(0), np.zeros(0), data_range=1.0)


def test_intensity_fit_bias_and_contrast():
    rng = np.random.default_rng(0)
    hr = rng.random((12, 10, 8)) * 50 + 10
    noise = rng.normal(0, 1, hr.shape)
    pred = 0.8 * hr + 3.0 + noise
    got = metrics.intensity_fit(pred, hr)
    r = hr.max() - hr.min()
    assert got["bias"] == pytest.approx(float(np.mean(pred - hr)))
    assert got["bias_pct"] == pytest.approx(100 * got["bias"] / r)
    # 1 / the slope of HR regressed on the output (noise in pred does not bias it)
    assert got["contrast"] == pytest.approx(1 / np.polyfit(pred.ravel(), hr.ravel(), 1)[0])
    assert got["contrast"] == pytest.approx(0.8, abs=0.02)
    # the conditional mean of HR given a noisy LR keeps contrast 1: pred = E[hr | lr] for
    # Gaussian hr and noise is a shrunk lr, whose slope on hr is well below 1
    x = rng.normal(0, 1, 200_000)
    lr = x + rng.normal(0, 1, x.shape)
    mmse = metrics.intensity_fit(0.5 * lr, x, data_range=1.0)["contrast"]
    assert mmse == pytest.approx(1.0, abs=0.02)
    assert np.polyfit(x, 0.5 * lr, 1)[0] == pytest.approx(0.5, abs=0.02)
    same = metrics.intensity_fit(torch.from_numpy(hr), torch.from_numpy(hr), data_range=10.0)
    assert same == pytest.approx({"bias": 0.0, "bias_pct": 0.0, "contrast": 1.0})
    with pytest.raises(UserError, match="same shape"):
        metrics.intensity_fit(hr[:2], hr)
