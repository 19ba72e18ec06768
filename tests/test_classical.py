"""Classical denoising baselines: Gaussian filter, heat diffusion, tuning, optional BM4D."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ldm.core.errors import UserError
from ldm.evaluate.classical import (
    bm4d_available,
    bm4d_denoise,
    gaussian_denoise,
    heat_diffusion,
    tune_bm4d_sigma,
    tune_gaussian,
    tune_heat,
)
from ldm.evaluate.metrics import psnr


def _smooth_pair(shape: tuple[int, ...], noise: float, seed: int) -> tuple[torch.Tensor, ...]:
    """A smooth signal (hr) and a noisy copy of it (lr)."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(0, torch.pi, n) for n in shape], indexing="ij")
    hr = sum(torch.sin(a) for a in axes)
    lr = hr + noise * torch.randn(shape, generator=g)
    return lr, hr


def test_gaussian_denoise_matches_scipy() -> None:
    lr, _ = _smooth_pair((10, 12, 9), 0.5, seed=0)
    ref = gaussian_filter(lr.double().numpy(), 1.3, mode="mirror", truncate=4.0)
    assert np.allclose(gaussian_denoise(lr.double(), 1.3).numpy(), ref, atol=1e-10)
    assert torch.equal(gaussian_denoise(lr, 0.0), lr)
    with pytest.raises(UserError, match="sigma"):
        gaussian_denoise(lr, -1.0)
    with pytest.raises(UserError, match="2D or 3D"):
        gaussian_denoise(lr[0, 0], 1.0)


@pytest.mark.parametrize("shape", [(17, 13), (9, 11, 8)])
def test_heat_diffusion_preserves_mean_and_smooths_noise(shape) -> None:
    lr, hr = _smooth_pair(shape, 0.5, seed=1)
    lr = lr.double()
    out = heat_diffusion(lr, num_steps=4, dt=1 / (2 * len(shape)))
    assert out.shape == lr.shape and out.dtype == lr.dtype
    assert float(out.mean()) == pytest.approx(float(lr.mean()), abs=1e-12)  # Neumann: no flux
    assert psnr(out, hr) > psnr(lr, hr) + 3.0
    assert torch.equal(heat_diffusion(lr, 0), lr)


def test_heat_diffusion_known_step() -> None:
    # one step on a 2D delta: centre 1 - 4 dt, the four neighbours dt, total mass kept
    u = torch.zeros(5, 5, dtype=torch.float64)
    u[2, 2] = 1.0
    out = heat_diffusion(u, num_steps=1, dt=0.2)
    expected = torch.zeros(5, 5, dtype=torch.float64)
    expected[2, 2] = 0.2
    expected[1, 2] = expected[3, 2] = expected[2, 1] = expected[2, 3] = 0.2
    assert torch.allclose(out, expected, atol=1e-15)
    # constant volume stays constant (Neumann border adds no flux)
    c = torch.full((4, 5, 6), 2.5)
    assert torch.equal(heat_diffusion(c, 7, dt=1 / 6), c)


def test_heat_diffusion_bad_arguments_raise() -> None:
    u = torch.zeros(6, 6, 6)
    with pytest.raises(UserError, match="stable"):
        heat_diffusion(u, 3, dt=0.2)  # 3D limit is 1/6
    with pytest.raises(UserError, match="stable"):
        heat_diffusion(u[0], 3, dt=0.3)  # 2D limit is 1/4
    with pytest.raises(UserError, match="num_steps"):
        heat_diffusion(u, -1)
    with pytest.raises(UserError, match="2D or 3D"):
        heat_diffusion(u[0, 0], 1)


def test_tune_gaussian_picks_interior_sigma() -> None:
    pairs = [_smooth_pair((24, 24), 0.5, seed=s) for s in (2, 3)]
    sigmas = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 6.0, 12.0]
    best, score = tune_gaussian(pairs, sigmas)
    assert best not in (sigmas[0], sigmas[-1])
    mean_at_best = np.mean([psnr(gaussian_denoise(lr, best), hr) for lr, hr in pairs])
    assert score == pytest.approx(mean_at_best)
    assert score > np.mean([psnr(lr, hr) for lr, hr in pairs])


def test_tune_heat_picks_interior_steps_in_one_pass() -> None:
    pairs = [_smooth_pair((12, 12, 12), 0.5, seed=s) for s in (4, 5)]
    grid = [40, 0, 2, 5, 10, 20]  # unsorted on purpose
    best, score = tune_heat(pairs, grid, dt=0.15)
    assert 0 < best < 40
    mean_at_best = np.mean([psnr(heat_diffusion(lr, best, 0.15), hr) for lr, hr in pairs])
    assert score == pytest.approx(mean_at_best, abs=1e-4)


def test_tuning_bad_arguments_raise() -> None:
    pair = [_smooth_pair((12, 12), 0.5, seed=0)]
    with pytest.raises(UserError, match="pair"):
        tune_gaussian([], [1.0])
    with pytest.raises(UserError, match="grid"):
        tune_gaussian(pair, [])
    with pytest.raises(UserError, match="grid"):
        tune_heat(pair, [], dt=0.1)
    with pytest.raises(UserError, match="stable"):
        tune_heat(pair, [1, 2], dt=0.5)
    with pytest.raises(UserError, match="num_steps"):
        tune_heat(pair, [-1, 2], dt=0.1)


def test_bm4d_missing_package_raises_with_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bm4d", None)  # makes `import bm4d` fail
    assert bm4d_available() is False
    with pytest.raises(UserError, match="pip install bm4d"):
        bm4d_denoise(torch.zeros(4, 4, 4), 0.1)
    with pytest.raises(UserError, match="pip install bm4d"):
        tune_bm4d_sigma([_smooth_pair((4, 4, 4), 0.1, seed=0)], [0.1])


def test_bm4d_counts_as_available_only_when_it_imports(monkeypatch, tmp_path) -> None:
    # evaluate_psnr adds the BM4D row when this says True; a bm4d whose binaries do not load
    # (OSError: no OpenBLAS) must read as missing, with the hint, and not crash the phase
    monkeypatch.setitem(sys.modules, "bm4d", types.SimpleNamespace(bm4d=lambda z, s: z))
    assert bm4d_available() is True
    monkeypatch.delitem(sys.modules, "bm4d")
    (tmp_path / "bm4d.py").write_text("raise OSError('libopenblas.so.0: cannot open the file')")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert bm4d_available() is False
    with pytest.raises(UserError, match="libopenblas.*pip install bm4d"):
        bm4d_denoise(torch.zeros(4, 4, 4), 0.1)


def test_bm4d_denoise_wraps_the_package(monkeypatch) -> None:
    calls = []

    def fake_bm4d(z: np.ndarray, sigma_psd: float) -> np.ndarray:
        calls.append((z.shape, sigma_psd))
        return z * 0.5

    monkeypatch.setitem(sys.modules, "bm4d", types.SimpleNamespace(bm4d=fake_bm4d))
    vol = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0))
    out = bm4d_denoise(vol, 0.2)
    assert out.dtype == vol.dtype and torch.allclose(out, vol * 0.5)
    assert torch.allclose(bm4d_denoise(vol[0], 0.2), vol[0] * 0.5)
    assert calls == [((4, 5, 6), 0.2), ((5, 6, 1), 0.2)]
    with pytest.raises(UserError, match="sigma"):
        bm4d_denoise(vol, 0.0)


def _noisy_cube(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, clean) 20^3: a bright cube on a dark background plus white noise of std 0.1."""
    clean = torch.zeros(20, 20, 20)
    clean[5:15, 5:15, 5:15] = 1.0
    g = torch.Generator().manual_seed(seed)
    return clean + 0.1 * torch.randn(clean.shape, generator=g), clean


def test_tv_and_nlm_match_scikit_image_and_denoise():
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

    from ldm.evaluate.classical import nlm_denoise, tv_denoise

    noisy, clean = _noisy_cube()
    tv = tv_denoise(noisy, 0.1)
    ref = denoise_tv_chambolle(noisy.double().numpy(), weight=0.1, channel_axis=None)
    assert tv.shape == noisy.shape and np.allclose(tv.numpy(), ref, atol=1e-6)
    nlm = nlm_denoise(noisy, 0.1, 3, 3)
    ref = denoise_nl_means(noisy.double().numpy(), h=0.1, patch_size=3, patch_distance=3,
                           fast_mode=True, channel_axis=None)  # fmt: skip
    assert np.allclose(nlm.numpy(), ref, atol=1e-6)
    base = psnr(noisy, clean)
    assert psnr(tv, clean) > base + 3 and psnr(nlm, clean) > base + 3  # both really denoise
    assert torch.equal(tv_denoise(noisy, 0), noisy) and torch.equal(nlm_denoise(noisy, 0), noisy)
    with pytest.raises(UserError, match="weight must be >= 0"):
        tv_denoise(noisy, -1)
    with pytest.raises(UserError, match="patch_size and patch_distance must be >= 1"):
        nlm_denoise(noisy, 0.1, 0, 3)


def test_tune_tv_and_nlm_pick_a_denoising_value_from_the_grid():
    from ldm.evaluate.classical import tune_nlm, tune_tv

    pairs = [_noisy_cube(s) for s in range(2)]
    weight, score = tune_tv(pairs, [0.0, 0.1, 5.0])
    assert weight == 0.1 and score > np.mean([psnr(lr, hr) for lr, hr in pairs])
    h, _ = tune_nlm(pairs, [0.0, 0.08, 2.0])
    assert h == 0.08  # 0 = no denoising; 2.0 flattens the cube


def test_best_value_at_a_grid_edge_is_a_warning(caplog):
    """A tuned baseline whose best parameter is the grid's last value may be under-tuned: say so."""
    from ldm.evaluate.classical import tune_gaussian

    rng = torch.Generator().manual_seed(0)
    hr = torch.zeros(12, 12, 12)
    hr[4:8, 4:8, 4:8] = 1.0
    pairs = [(hr + 0.3 * torch.randn(hr.shape, generator=rng), hr)]
    with caplog.at_level("WARNING", logger="ldm.evaluate.classical"):
        tune_gaussian(pairs, [0.1, 0.2])  # far too little smoothing: the best is the last value
    assert "at the edge of the grid [0.1, 0.2]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.evaluate.classical"):
        tune_gaussian(pairs, [0.1, 1.0, 8.0])  # an interior optimum: no warning
    assert "edge of the grid" not in caplog.text
