"""gaussian_blur against scipy.ndimage.gaussian_filter (the reference), modes, shapes, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ldm.core.errors import UserError
from ldm.evaluate.filters import gaussian_blur, gaussian_kernel1d

SCIPY_MODE = {"reflect": "mirror", "replicate": "nearest", "constant": "constant"}


def _rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [
        ((40,), [2.0], 4.0),
        ((17, 23), [1.0, 2.5], 4.0),
        ((12, 20, 16), [1.5, 1.5, 1.5], 3.5),  # the SSIM window
        ((9, 30, 14), [0.7, 3.0, 0.0], 4.0),  # sigma 0 leaves that axis alone
        ((16, 16, 16), [2.0, 0.4, 1.2], 2.0),
    ],
)
def test_matches_scipy_mirror_in_float64(shape, sigma, truncate):
    x = _rand(shape)
    out = gaussian_blur(torch.from_numpy(x), sigma, truncate=truncate)
    ref = gaussian_filter(x, sigma, mode="mirror", truncate=truncate)
    assert out.dtype == torch.float64 and out.shape == shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant"])
def test_border_modes_match_scipy(mode):
    x = _rand((11, 19, 13), seed=1)
    out = gaussian_blur(torch.from_numpy(x), [1.0, 2.0, 1.5], mode=mode)
    ref = gaussian_filter(x, [1.0, 2.0, 1.5], mode=SCIPY_MODE[mode])
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


def test_axis_shorter_than_kernel_radius_replicates():
    # sigma 2 -> radius 8 > 4 voxels: one mirror cannot pad it, so the edge is replicated
    x = _rand((4, 12), seed=2)
    out = gaussian_blur(torch.from_numpy(x), [2.0, 0.0])
    ref = gaussian_filter(x, [2.0, 0.0], mode="nearest")
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


def test_batch_and_channel_axes_are_not_mixed():
    x = _rand((2, 3, 8, 10, 9), seed=3)
    out = gaussian_blur(torch.from_numpy(x), 1.2)  # scalar sigma: 3 trailing spatial axes
    ref = gaussian_filter(x, [0, 0, 1.2, 1.2, 1.2], mode="mirror")
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
    chans = _rand((3, 15, 18), seed=4)  # (C, H, W) with a 2-sigma sequence
    out2 = gaussian_blur(torch.from_numpy(chans), (1.0, 2.0))
    ref2 = gaussian_filter(chans, [0, 1.0, 2.0], mode="mirror")
    np.testing.assert_allclose(out2.numpy(), ref2, rtol=0, atol=1e-12)


def test_float32_and_integer_inputs():
    x = _rand((10, 12, 14), seed=5)
    ref = gaussian_filter(x, 1.5, mode="mirror")
    out32 = gaussian_blur(torch.from_numpy(x).float(), 1.5)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=0, atol=1e-5)
    ints = torch.arange(60).reshape(6, 10)
    out_int = gaussian_blur(ints, 1.0)
    assert out_int.dtype == torch.float32
    ref_int = gaussian_filter(ints.numpy().astype(np.float64), 1.0, mode="mirror")
    np.testing.assert_allclose(out_int.numpy(), ref_int, rtol=1e-6, atol=1e-4)


def test_constant_is_preserved_and_input_untouched():
    x = torch.full((7, 9, 8), 3.25, dtype=torch.float64)
    before = x.clone()
    out = gaussian_blur(x, [2.0, 1.0, 3.0])
    assert torch.allclose(out, x, rtol=0, atol=1e-13)
    assert torch.equal(x, before)


def test_kernel_is_normalised_symmetric_with_scipy_radius():
    k = gaussian_kernel1d(1.5, truncate=3.5, dtype=torch.float64)
    assert k.numel() == 11  # radius int(3.5 * 1.5 + 0.5) = 5
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-15)
    assert torch.equal(k, k.flip(0))
    assert torch.equal(gaussian_kernel1d(0.0, dtype=torch.float64), torch.ones(1).double())


def test_bad_arguments():
    x = torch.zeros(8, 8)
    with pytest.raises(UserError, match="mode must be one of"):
        gaussian_blur(x, 1.0, mode="wrap")
    with pytest.raises(UserError, match="needs 1-3 spatial axes"):
        gaussian_blur(x, [1.0, 1.0, 1.0])
    with pytest.raises(UserError, match="needs 1-3 spatial axes"):
        gaussian_blur(x, [])
    with pytest.raises(UserError, match="every sigma must be >= 0"):
        gaussian_blur(x, [-1.0, 1.0])
