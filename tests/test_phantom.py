from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label

from ldm.core.errors import UserError
from ldm.data.phantom import PhantomConfig, make_phantom, make_phantom_trees


def test_same_seed_is_bit_identical() -> None:
    a = make_phantom((24, 32, 40), seed=7)
    b = make_phantom((24, 32, 40), seed=7)
    assert np.array_equal(a, b)


def test_different_seeds_differ() -> None:
    a = make_phantom((32, 32, 32), seed=0)
    b = make_phantom((32, 32, 32), seed=1)
    assert np.mean(np.abs(a - b)) > 0.01


@pytest.mark.parametrize("shape", [(48, 64, 80), (20, 9, 33)])
def test_shape_and_dtype_for_non_cubic_volumes(shape: tuple[int, int, int]) -> None:
    vol, masks = make_phantom_trees(shape, seed=3)
    assert vol.shape == shape and vol.dtype == np.float32
    assert len(masks) == PhantomConfig().num_trees
    assert all(m.shape == shape and m.dtype == np.float32 for m in masks)
    assert np.all(np.isfinite(vol))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_foreground_fraction_is_sensible(seed: int) -> None:
    _, masks = make_phantom_trees((64, 64, 64), seed=seed)
    fraction = float(np.mean(np.maximum.reduce(masks) > 0.5))
    assert 0.01 < fraction < 0.10


THIN = PhantomConfig(
    num_trees=4, branch_levels=5, root_radius=1.2, radius_decay=0.7, min_radius=0.3
)


@pytest.mark.parametrize("config", [PhantomConfig(), THIN], ids=["default", "thin"])
@pytest.mark.parametrize("seed,shape", [(0, (48, 48, 48)), (5, (40, 56, 32)), (11, (64, 48, 40))])
def test_each_tree_is_one_connected_piece_touching_a_face(
    seed: int, shape: tuple[int, int, int], config: PhantomConfig
) -> None:
    # THIN has branches far below one voxel in radius: they must not break a tree into pieces
    _, masks = make_phantom_trees(shape, seed=seed, config=config)
    assert len(masks) == config.num_trees
    for mask in masks:
        fg = mask > 0.5
        assert label(fg).max() == 1
        faces = [fg[0], fg[-1], fg[:, 0], fg[:, -1], fg[:, :, 0], fg[:, :, -1]]
        assert any(f.any() for f in faces)  # the root enters through a face


def test_trees_are_soft_occupancies_with_partial_volume_edges() -> None:
    _, masks = make_phantom_trees((40, 40, 40), seed=4)
    for mask in masks:
        assert mask.min() == 0.0 and mask.max() == 1.0
        assert np.any((mask > 0.05) & (mask < 0.95))  # soft edges, not a binary mask


def test_intensity_range_is_plausible() -> None:
    cfg = PhantomConfig()
    vol, masks = make_phantom_trees((48, 48, 48), seed=2, config=cfg)
    occ = np.maximum.reduce(masks)
    assert vol.min() >= 0.0
    assert vol.max() <= cfg.vessel_intensity * (1 + cfg.bias_strength) + 1e-5
    vessels, background = vol[occ > 0.99], vol[occ == 0]
    assert vessels.mean() > 4 * background.mean()
    assert abs(np.median(background) - cfg.background_intensity) < cfg.background_intensity * 0.3
    assert background.std() > 0.01  # texture and bias make the background non-flat


def test_without_texture_and_bias_the_volume_mixes_two_intensities() -> None:
    cfg = PhantomConfig(texture_strength=0.0, bias_strength=0.0, background_intensity=0.2)
    vol, masks = make_phantom_trees((32, 32, 32), seed=9, config=cfg)
    occ = np.maximum.reduce(masks)
    np.testing.assert_allclose(vol, 0.2 * (1 - occ) + 1.0 * occ, atol=1e-6)


def test_texture_settings_do_not_change_the_trees() -> None:
    _, a = make_phantom_trees((32, 32, 32), seed=6)
    _, b = make_phantom_trees((32, 32, 32), seed=6, config=PhantomConfig(texture_strength=0.2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_trees": 0}, "num_trees"),
        ({"num_trees": 2.5}, "num_trees"),
        ({"branch_levels": True}, "branch_levels"),
        ({"root_radius": -1.0}, "root_radius"),
        ({"min_radius": 0.0}, "min_radius"),
        ({"min_radius": 4.0}, "min_radius must be <= root_radius"),
        ({"radius_decay": 1.5}, "radius_decay"),
        ({"taper": 0.0}, "taper"),
        ({"root_length": 0.0}, "root_length"),
        ({"branch_angle_deg": 120.0}, "branch_angle_deg"),
        ({"bend": float("nan")}, "bend"),
        ({"vessel_intensity": -1.0}, "vessel_intensity"),
        ({"texture_strength": "high"}, "texture_strength"),
        ({"texture_scale": 0.0}, "texture_scale"),
        ({"bias_strength": 1.0}, "bias_strength"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        PhantomConfig(**kwargs)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 2), (32, 32.0, 32), [32, -1, 32]])
def test_bad_shape_is_a_user_error(shape: tuple) -> None:
    with pytest.raises(UserError, match="phantom shape"):
        make_phantom(shape, seed=0)


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_bad_seed_is_a_user_error(seed: object) -> None:
    with pytest.raises(UserError, match="phantom seed"):
        make_phantom((16, 16, 16), seed=seed)  # type: ignore[arg-type]
