"""The MRI profile: the mni152 source (on a small fake template, no nilearn needed), the
configs/mri profile, and the one-line error when nilearn is missing."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pytest

import ldm.data.mni152 as mni152
from ldm.cli.run_all import config_path
from ldm.core.config import load_config
from ldm.core.errors import ConfigError
from ldm.core.registry import PHASES
from ldm.data.dataset import load_manifest
from tests.helpers.cli import error_line, run_script

MID = 20  # index of world x = 0 in the fake template


def _fake_template(resolution: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A left-right symmetric 'brain' (ellipsoid with texture) in a 41 x 44 x 36 volume whose
    world x = 0 sits at index MID, like the real template's 197 x 233 x 189 with x = 0 at 98."""
    rng = np.random.default_rng(0)
    shape = (2 * MID + 1, 44, 36)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    r = ((x - MID) / 18) ** 2 + ((y - 22) / 20) ** 2 + ((z - 18) / 15) ** 2
    vol = np.where(r < 1, 0.5 + 0.4 * np.sin(y / 2.0) ** 2, 0.0).astype(np.float32)
    vol += np.where(r < 1, 0.05, 0.0) * rng.random(shape, dtype=np.float32)
    vol = np.maximum(vol, vol[::-1])  # symmetric about index MID, as the real template
    affine = np.eye(4)
    affine[:3, 3] = (-MID, -30.0, -20.0)
    return vol, affine


@pytest.fixture
def fake_template(monkeypatch):
    calls = []

    def load(resolution):
        calls.append(resolution)
        return _fake_template(resolution)

    monkeypatch.setattr(mni152, "load_template", load)
    return calls


def _prepare(out, *extra):
    return run_script(
        "prepare_data", "--config", config_path("mri", PHASES[0]), "--set", f"out_dir={out}",
        "--set", "mni152.block=[12, 12, 12]", "--set", "patches.size=[8, 8, 8]",
        "--set", "patches.stride=[4, 4, 4]", "--set", "split.val_fraction=0.2",
        "--set", "split.test_fraction=0.2", *extra,
    )  # fmt: skip


def test_mni152_cases_are_disjoint_blocks_of_one_hemisphere_split_by_case(tmp_path, fake_template):
    out = tmp_path / "ds"
    result = _prepare(out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert fake_template == [1]
    manifest = load_manifest(out)
    cases = manifest["cases"]
    assert manifest["source"] == "mni152" and len(cases) >= 5
    vol, _ = _fake_template()
    boxes = {}
    for name, info in cases.items():
        start = json.loads(info["origin"]["start"])
        assert info["shape"] == [12, 12, 12] and start[0] + 12 <= MID + 1  # left half only
        brain = (vol[tuple(slice(s, s + 12) for s in start)] > 0.1 * vol.max()).mean()
        assert brain >= 0.2  # mostly-background blocks are skipped
        assert info["meta"]["spacing"] == [1.0, 1.0, 1.0] and info["meta"]["format"] == "nifti"
        np.testing.assert_allclose(np.asarray(info["meta"]["affine"])[:3, 3],
                                   np.add(start, (-MID, -30.0, -20.0)))  # fmt: skip
        boxes[name] = start
    for (a, sa), (b, sb) in itertools.combinations(boxes.items(), 2):  # no shared voxel
        assert any(abs(p - q) >= 12 for p, q in zip(sa, sb)), (a, b)
    splits = {info["split"] for info in cases.values()}
    assert splits == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        index = json.loads((out / split / "patches.json").read_text())
        assert index and {p["case"] for p in index} == {
            n for n, c in cases.items() if c["split"] == split and c["num_patches"] > 0
        }
    # a test volume is the template block itself (normalised by its LR percentiles)
    name, info = next((n, c) for n, c in cases.items() if c["split"] == "test")
    hr = np.load(out / info["volume"]["hr"])
    lo, hi = info["norm"]["low"], info["norm"]["high"]
    block = vol[tuple(slice(s, s + 12) for s in boxes[name])]
    np.testing.assert_allclose(hr * (hi - lo) + lo, block, atol=1e-5)
    lr = np.load(out / info["volume"]["lr"])
    assert not np.allclose(lr, hr)  # degraded: denoise preset (blur + Rician noise)


def test_both_hemispheres_and_a_too_large_block(tmp_path, fake_template):
    vol, affine = _fake_template()
    assert mni152.hemisphere_range(vol, affine, "left") == (0, MID + 1)
    assert mni152.hemisphere_range(vol, affine, "right") == (MID, 2 * MID + 1)
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -1.0, MID  # x decreases with the index: low index = right
    assert mni152.hemisphere_range(vol, flipped, "left") == (MID, 2 * MID + 1)
    result = _prepare(tmp_path / "big", "--set", "mni152.block=[48, 48, 48]")
    assert "larger than the template" in error_line(result)
    with pytest.raises(ConfigError, match="hemisphere must be one of left, right, both"):
        mni152.MNI152Source(hemisphere="middle")


def test_mri_profile_has_a_valid_config_for_every_phase():
    for phase in PHASES:
        path = config_path("mri", phase)
        assert path.parent.name == "mri" and path.is_file(), path
        cfg = load_config(phase.config_cls(), path)
        if phase.name == "prepare_data":
            assert cfg.source == "mni152" and cfg.degrade.preset == "denoise"
            assert cfg.degrade.noise == "rician" and cfg.degrade.noise_sigma == 0.04
        if phase.name in ("train_vae_pair", "train_diffusion"):
            assert 0 < cfg.train.max_minutes <= 8


def test_missing_nilearn_is_one_error_line_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # any import of nilearn fails
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    monkeypatch.chdir(tmp_path)  # the profile's relative out_dir lands here
    line = error_line(run_script("run_all", "--profile", "mri"))
    assert "nilearn" in line and 'pip install -e ".[mri]"' in line and "prepare_data" in line
    assert not (tmp_path / "dataset").exists()
