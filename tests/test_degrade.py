from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from ldm.core.errors import UserError
from ldm.data.degrade import DegradeConfig, degrade, resample_to

NOISE_ONLY = {"blur_sigma": (0.0, 0.0, 0.0), "downsample": (1, 1, 1)}


def _volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Values spanning exactly [0, 1] (data range 1)."""
    v = np.random.default_rng(seed).uniform(0.0, 1.0, size=shape).astype(np.float32)
    v.flat[0], v.flat[1] = 0.0, 1.0
    return v


@pytest.mark.parametrize("s", [0.02, 0.05, 0.1])
def test_gaussian_noise_gives_the_expected_psnr(s: float) -> None:
    hr = _volume((32, 32, 32))
    lr = degrade(hr, DegradeConfig(**NOISE_ONLY, noise="gaussian", noise_sigma=s), seed=1)
    psnr = peak_signal_noise_ratio(hr, lr, data_range=float(hr.max() - hr.min()))
    assert abs(psnr - 20 * math.log10(1 / s)) < 0.2


def test_noise_scales_with_the_data_range() -> None:
    hr = _volume((16, 16, 16)) * 500.0 + 100.0  # data range 500
    lr = degrade(hr, DegradeConfig(**NOISE_ONLY, noise_sigma=0.1), seed=2)
    assert abs(np.std(lr - hr) / 50.0 - 1.0) < 0.05


def test_rician_noise_is_non_negative_and_biased_up_in_dark_regions() -> None:
    hr = np.zeros((32, 32, 32), dtype=np.float32)
    hr[16:] = 1.0  # dark half and bright half, data range 1
    s = 0.1
    lr = degrade(hr, DegradeConfig(**NOISE_ONLY, noise="rician", noise_sigma=s), seed=3)
    # in the bright half (SNR 10) the Rician magnitude is close to Gaussian with std s
    assert abs(lr[16:].std() / s - 1.0) < 0.05
    # on a zero signal the Rician magnitude is Rayleigh distributed: mean s * sqrt(pi / 2)
    assert abs(lr[:16].mean() / (s * math.sqrt(math.pi / 2)) - 1.0) < 0.03
    # at SNR 10 the bias is only about s^2 / 2
    assert abs(lr[16:].mean() - 1.0) < 0.01


def test_no_noise_and_identity_settings_return_the_input() -> None:
    hr = _volume((8, 9, 10))
    out = degrade(hr, DegradeConfig(**NOISE_ONLY, noise="none"), seed=0)
    assert out.dtype == np.float32 and np.array_equal(out, hr)


def _high_frequency_energy(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fftn(x - x.mean())) ** 2
    freqs = np.meshgrid(*[np.abs(np.fft.fftfreq(n)) for n in x.shape], indexing="ij")
    return float(spectrum[np.maximum.reduce(freqs) > 0.25].sum())


def test_blur_and_downsample_remove_high_frequencies() -> None:
    hr = _volume((32, 32, 32))
    blurred = degrade(hr, DegradeConfig(downsample=(1, 1, 1), noise="none"), seed=0)
    both = degrade(hr, DegradeConfig(blur_sigma=(0.5, 0.5, 0.5), noise="none"), seed=0)
    e_hr = _high_frequency_energy(hr)
    assert _high_frequency_energy(blurred) < 0.05 * e_hr
    assert _high_frequency_energy(both) < 0.05 * e_hr


@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
@pytest.mark.parametrize("shape", [(9, 10, 11), (7, 5, 13)])
def test_output_shape_equals_input_for_non_divisible_shapes(
    shape: tuple[int, int, int], mode: str
) -> None:
    hr = _volume(shape)
    out = degrade(hr, DegradeConfig(downsample=(2, 3, 4), resample=mode), seed=0)
    assert out.shape == shape and out.dtype == np.float32


def test_downsample_round_trip_has_no_shift() -> None:
    # area averaging + align_corners=False interpolation reproduce a linear ramp exactly inside
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32)[None, :, None], (4, 12, 5)).copy()
    cfg = DegradeConfig(blur_sigma=(0.0, 0.0, 0.0), downsample=(1, 2, 1), noise="none")
    out = degrade(ramp, cfg, seed=0)
    np.testing.assert_allclose(out[:, 1:-1], ramp[:, 1:-1], atol=1e-5)


def test_nearest_resample_repeats_block_averages() -> None:
    x = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    cfg = DegradeConfig(
        blur_sigma=(0.0, 0.0, 0.0), downsample=(2, 1, 1), resample="nearest", noise="none"
    )
    out = degrade(x, cfg, seed=0)
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 0.5, 2.5, 2.5, 4.5, 4.5])


def test_same_seed_same_output_and_different_seed_differs() -> None:
    hr = _volume((16, 16, 16))
    cfg = DegradeConfig(noise="rician")
    a, b, c = degrade(hr, cfg, seed=5), degrade(hr, cfg, seed=5), degrade(hr, cfg, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_resample_to_known_values() -> None:
    x = np.arange(4, dtype=np.float64)
    np.testing.assert_allclose(
        resample_to(x, (8,)), [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6
    )
    np.testing.assert_array_equal(resample_to(x, (8,), mode="nearest"), [0, 0, 1, 1, 2, 2, 3, 3])
    lr = _volume((4, 5, 6))
    up = resample_to(lr, (8, 10, 12))
    assert up.shape == (8, 10, 12) and up.dtype == np.float32
    assert np.array_equal(resample_to(lr, (4, 5, 6)), lr)


def test_resample_to_rejects_bad_arguments() -> None:
    with pytest.raises(UserError, match="target shape"):
        resample_to(np.zeros((4, 4, 4)), (8, 8))
    with pytest.raises(UserError, match="target shape"):
        resample_to(np.zeros((4, 4, 4)), (8, 0, 8))
    with pytest.raises(UserError, match="1-3D"):
        resample_to(np.zeros((2, 2, 2, 2)), (4, 4, 4, 4))
    with pytest.raises(UserError, match="trilinear, nearest"):
        resample_to(np.zeros((4, 4, 4)), (8, 8, 8), mode="cubic")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"blur_sigma": (1.0, -0.5, 1.0)}, "blur_sigma must be 3 finite numbers >= 0"),
        ({"blur_sigma": (1.0, 1.0)}, "blur_sigma"),
        ({"downsample": (2, 0, 2)}, "downsample must be 3 numbers >= 1"),
        ({"downsample": (2, 0.5, 2)}, "downsample"),
        ({"resample": "cubic"}, "resample must be one of trilinear, nearest, got 'cubic'"),
        ({"noise": "poisson"}, "noise must be one of gaussian, rician, none, got 'poisson'"),
        ({"noise_sigma": -0.1}, "noise_sigma"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        DegradeConfig(**kwargs)


def test_config_accepts_lists_and_stores_tuples() -> None:
    cfg = DegradeConfig(blur_sigma=[1, 0, 2], downsample=[1, 2, 3])  # type: ignore[arg-type]
    assert cfg.blur_sigma == (1.0, 0.0, 2.0) and cfg.downsample == (1, 2, 3)


@pytest.mark.parametrize(
    "hr,seed,match",
    [
        (np.zeros((4, 4)), 0, "3D volume"),
        (np.full((4, 4, 4), np.nan), 0, "finite"),
        (np.zeros((4, 4, 4)), -1, "seed"),
    ],
)
def test_degrade_rejects_bad_input(hr: np.ndarray, seed: int, match: str) -> None:
    with pytest.raises(UserError, match=match):
        degrade(hr, DegradeConfig(), seed=seed)


def test_presets_fill_the_fields_and_explicit_fields_override() -> None:
    denoise = DegradeConfig(preset="denoise")
    fwhm1 = 1 / (2 * math.sqrt(2 * math.log(2)))  # sigma of a Gaussian of FWHM 1 voxel
    assert denoise.blur_sigma == pytest.approx((fwhm1,) * 3) and denoise.downsample == (1, 1, 1)
    assert (denoise.noise, denoise.noise_sigma) == ("rician", 0.04)
    thick = DegradeConfig(preset="thick_slices")
    assert thick.downsample == (1, 1, 3) and thick.blur_sigma == pytest.approx((0, 0, 3 * fwhm1))
    assert DegradeConfig() == DegradeConfig(preset="custom")  # the shipped configs' LR
    assert (DegradeConfig().noise, DegradeConfig().noise_sigma) == ("rician", 0.08)
    mine = DegradeConfig(preset="denoise", noise_sigma=0.1)
    assert mine.noise_sigma == 0.1 and mine.noise == "rician"
    with pytest.raises(UserError, match="preset must be one of custom, denoise, thick_slices"):
        DegradeConfig(preset="thin_slices")


def test_a_saved_preset_config_loads_back_the_same(tmp_path) -> None:
    from ldm.core.config import load_config, save_config

    cfg = DegradeConfig(preset="thick_slices", noise="none")
    save_config(cfg, tmp_path / "d.yaml")  # lists the preset and every resolved field
    assert load_config(DegradeConfig, tmp_path / "d.yaml") == cfg


def _axis_contrast(x: np.ndarray, axis: int) -> float:
    """Mean absolute difference between neighbours along ``axis`` (edge sharpness)."""
    return float(np.abs(np.diff(x, axis=axis)).mean())


def test_thick_slices_lose_resolution_along_the_last_axis_only() -> None:
    cfg = DegradeConfig(preset="thick_slices", noise="none")
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * np.arange(24, dtype=np.float32) / 5)  # 5-voxel period
    kept = []
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = 24
        hr = np.broadcast_to(wave.reshape(shape), (24, 24, 24)).copy()
        lr = degrade(hr, cfg, seed=0)
        kept.append(_axis_contrast(lr, axis) / _axis_contrast(hr, axis))
    assert kept[0] == pytest.approx(1.0) and kept[1] == pytest.approx(1.0)  # x, y untouched
    assert kept[2] < 0.2  # z: slice profile + 3-voxel slices wipe out a 5-voxel detail
    hr = _volume((24, 24, 24))
    noisy = degrade(hr, DegradeConfig(preset="thick_slices"), seed=0)
    assert noisy.shape == hr.shape and not np.allclose(noisy, degrade(hr, cfg, seed=0))


def test_denoise_preset_rician_bias_is_positive() -> None:
    hr = np.zeros((24, 24, 24), dtype=np.float32)
    hr[12:] = 1.0
    lr = degrade(hr, DegradeConfig(preset="denoise"), seed=4)
    dark = lr[:10] - hr[:10]  # away from the edge the 1-voxel blur changes nothing
    assert dark.min() >= 0 and abs(dark.mean() / (0.04 * math.sqrt(math.pi / 2)) - 1) < 0.05
    assert (lr - hr).mean() > 0


def test_non_integer_downsampling_factor() -> None:
    cfg = DegradeConfig(blur_sigma=(0.0, 0.0, 0.0), downsample=(1.5, 1, 1), noise="none")
    assert cfg.downsample == (1.5, 1, 1)
    wave = np.sin(2 * np.pi * np.arange(30, dtype=np.float32) / 3)  # 3-voxel period
    along_x = np.broadcast_to(wave[:, None, None], (30, 30, 4)).copy()
    along_y = np.broadcast_to(wave[None, :, None], (30, 30, 4)).copy()
    lr_x, lr_y = degrade(along_x, cfg, seed=0), degrade(along_y, cfg, seed=0)
    assert lr_x.shape == along_x.shape
    assert _axis_contrast(lr_x, 0) < 0.5 * _axis_contrast(along_x, 0)  # 20 voxels for 30
    np.testing.assert_allclose(lr_y, along_y, atol=1e-6)  # other axes untouched
    ramp = np.broadcast_to(np.arange(30, dtype=np.float32)[:, None, None], (30, 4, 4)).copy()
    err = (degrade(ramp, cfg, seed=0) - ramp)[2:-2]  # fractional voxels: staircase error only
    assert abs(err.mean()) < 0.02 and np.abs(err).max() < 0.2  # no shift


@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
def test_fractional_path_equals_the_pooling_path_for_integer_factors(mode: str) -> None:
    import torch

    from ldm.data.degrade import _axis_maps

    hr = _volume((13, 14, 15))
    cfg = DegradeConfig(blur_sigma=(0.0, 0.0, 0.0), downsample=(2, 3, 1), resample=mode,
                        noise="none")  # fmt: skip
    x = torch.from_numpy(hr)
    for axis, f in enumerate((2, 3)):
        down, up = _axis_maps(hr.shape[axis], float(f), mode)
        x = torch.movedim((torch.movedim(x, axis, -1) @ down.T) @ up.T, -1, axis)
    np.testing.assert_allclose(x.numpy(), degrade(hr, cfg, seed=0), atol=1e-5)


def test_noise_level_can_come_from_a_given_data_range() -> None:
    hr = np.full((16, 16, 16), 5.0, dtype=np.float32)
    cfg = DegradeConfig(**NOISE_ONLY, noise_sigma=0.1)
    assert abs(np.std(degrade(hr, cfg, seed=1, data_range=2.0)) / 0.2 - 1) < 0.05
    with pytest.raises(UserError, match="data_range"):
        degrade(hr, cfg, seed=1, data_range=-1.0)
