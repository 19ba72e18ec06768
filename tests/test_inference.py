"""Sliding-window inference: window placement, blending, padding and argument checks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm.core.errors import UserError
from ldm.evaluate.inference import (
    first_stage_volume,
    fit_window,
    gaussian_importance_map,
    sliding_window_infer,
    window_positions,
)


def _volume(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_window_positions_known_values() -> None:
    # stride 4 on each axis, last window flush with the far edge at 13 - 8 = 5
    starts = [0, 4, 5]
    assert window_positions((13, 13), (8, 8), 0.5) == [(i, j) for i in starts for j in starts]
    assert window_positions((8, 20), (8, 10), 0.0) == [(0, 0), (0, 10)]
    assert window_positions((5, 9), (8, 4), 0.9) == [(0, i) for i in range(6)]  # stride 1
    assert window_positions((3, 3, 3), (4, 4, 4), 0.25) == [(0, 0, 0)]


COVER_CASES = [((13, 17, 9), (8, 6, 4), 0.5), ((31, 7), (8, 8), 0.0), ((10, 23), (3, 5), 0.75)]


@pytest.mark.parametrize(("shape", "window", "overlap"), COVER_CASES)
def test_window_positions_cover_every_voxel(shape, window, overlap) -> None:
    hits = torch.zeros(shape)
    for corner in window_positions(shape, window, overlap):
        sl = tuple(slice(c, c + min(w, n)) for c, w, n in zip(corner, window, shape))
        assert all(c + w <= n for c, w, n in zip(corner, window, shape) if n >= w)
        hits[sl] += 1
    assert bool((hits > 0).all())


def test_identity_is_exact_on_non_divisible_volume() -> None:
    vol = _volume(2, 13, 11, 9)
    out = sliding_window_infer(vol, lambda x: x, (6, 4, 5), overlap=0.5, progress=False)
    assert out.shape == vol.shape and out.device.type == "cpu"
    assert torch.allclose(out, vol, atol=1e-6, rtol=0)


def test_constant_input_gives_constant_output_without_seams() -> None:
    vol = torch.full((1, 21, 18), 3.25)
    out = sliding_window_infer(
        vol, lambda x: 2 * x + 1, (8, 8), overlap=0.25, batch_size=3, progress=False
    )
    assert (out - 7.5).abs().max() < 1e-6


def test_volume_smaller_than_window_is_padded_and_cropped() -> None:
    vol = _volume(1, 5, 12, 3)
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x * 2

    out = sliding_window_infer(vol, fn, (8, 8, 8), overlap=0.5, progress=False)
    assert out.shape == vol.shape
    assert torch.allclose(out, 2 * vol, atol=1e-6, rtol=0)
    assert all(s[2:] == (8, 8, 8) for s in seen)


def test_fn_changing_channel_count() -> None:
    vol = _volume(1, 10, 12)

    def fn(x: torch.Tensor) -> torch.Tensor:  # (B, 1, h, w) -> (B, 3, h, w)
        return torch.cat([x, -x, x**2], dim=1)

    out = sliding_window_infer(vol, fn, (6, 6), progress=False)
    expected = torch.cat([vol, -vol, vol**2])
    assert out.shape == (3, 10, 12)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    same = sliding_window_infer(vol, fn, (6, 6), out_channels=3, progress=False)
    assert torch.equal(out, same)


def test_batch_size_does_not_change_result() -> None:
    vol = _volume(1, 14, 13, 10, seed=1)

    def fn(x: torch.Tensor) -> torch.Tensor:  # position-dependent, so blending matters
        ramp = torch.linspace(0, 1, x.shape[-1])
        return x.flip(-1) + ramp

    outs = [
        sliding_window_infer(vol, fn, (6, 6, 6), batch_size=b, progress=False) for b in (1, 3, 100)
    ]
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(outs[0], outs[2], atol=1e-6)


def test_importance_map_is_centred_gaussian() -> None:
    w = gaussian_importance_map((5, 9), sigma_scale=0.125)
    assert w.shape == (5, 9) and float(w.max()) == 1.0 and float(w[2, 4]) == 1.0
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))
    assert float(w.min()) >= 1e-3
    with pytest.raises(UserError, match="sigma_scale"):
        gaussian_importance_map((4, 4), sigma_scale=0.0)


def test_bad_arguments_raise() -> None:
    vol = _volume(1, 8, 8)
    ident = lambda x: x  # noqa: E731
    with pytest.raises(UserError, match="overlap"):
        sliding_window_infer(vol, ident, (4, 4), overlap=1.0, progress=False)
    with pytest.raises(UserError, match="overlap"):
        window_positions((8, 8), (4, 4), -0.1)
    with pytest.raises(UserError, match="spatial axes"):
        sliding_window_infer(vol, ident, (4, 4, 4), progress=False)
    with pytest.raises(UserError, match="batch_size"):
        sliding_window_infer(vol, ident, (4, 4), batch_size=0, progress=False)
    with pytest.raises(UserError, match="window"):
        sliding_window_infer(vol[0, 0], ident, (4,), progress=False)
    with pytest.raises(UserError, match="dims"):
        window_positions((8, 8, 8), (4, 4), 0.5)
    with pytest.raises(UserError, match="out_channels"):
        sliding_window_infer(vol, ident, (4, 4), out_channels=0, progress=False)
    with pytest.raises(UserError, match="fn must return"):
        sliding_window_infer(vol, lambda x: x[..., :2], (4, 4), progress=False)
    with pytest.raises(UserError, match="fn must return"):
        sliding_window_infer(vol, ident, (4, 4), out_channels=2, progress=False)


def test_fit_window_shrinks_to_the_volume_rounded_up() -> None:
    assert fit_window((64, 64, 64), (40, 36, 128), 8) == (40, 40, 64)
    assert fit_window((64, 64), (5, 70), 4) == (8, 64)
    with pytest.raises(UserError, match="multiple"):
        fit_window((8,), (8,), 0)


def test_first_stage_volume_runs_a_small_volume_as_one_window_of_its_size() -> None:
    seen = []

    class FakeFirstStage:
        config = SimpleNamespace(window_multiple=4)

        def restore(self, lr: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(lr.shape[2:]))
            return lr + 1

        def encode(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return 2 * residual, residual  # (mean, logvar): the mean is used

        def decode(self, z: torch.Tensor) -> torch.Tensor:  # no LR input
            return 0.25 * z

    rng = np.random.default_rng(0)
    lr = rng.random((20, 18, 24), dtype=np.float32)
    hr = rng.random((20, 18, 24), dtype=np.float32)
    out = first_stage_volume(FakeFirstStage(), lr, (64, 64, 64), progress=False)
    assert seen == [(20, 20, 24)]  # one window, the volume rounded up to the factor
    assert out.shape == lr.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, lr + 1, atol=1e-6)  # the restorer mu(LR)
    # with the HR: the oracle mu + D(E(HR - mu)) = mu + 0.5 (HR - mu)
    oracle = first_stage_volume(FakeFirstStage(), lr, (64, 64, 64), hr=hr, progress=False)
    np.testing.assert_allclose(oracle, (lr + 1) + 0.5 * (hr - (lr + 1)), atol=1e-6)
    with pytest.raises(UserError, match="hr shape"):
        first_stage_volume(FakeFirstStage(), lr, (64, 64, 64), hr=hr[:8], progress=False)
