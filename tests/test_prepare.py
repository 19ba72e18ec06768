from __future__ import annotations

import json

import numpy as np
import pytest

from ldm.core.errors import ConfigError
from ldm.data.dataset import PatchPairs, iter_test_cases, load_manifest
from ldm.data.io import save_volume
from ldm.phases.prepare_data import SplitConfig, patch_starts, split_cases
from tests.helpers.cli import error_line, run_script

TINY = ["--set", "phantom.num_cases=5", "--set", "phantom.shape=[24, 24, 24]",
        "--set", "patches.size=[16, 16, 16]", "--set", "patches.stride=[8, 8, 8]"]  # fmt: skip


def prepare(out, *extra):
    return run_script("prepare_data", "--set", f"out_dir={out}", *TINY, *extra)


def test_phantom_dataset_round_trip(tmp_path):
    out = tmp_path / "ds"
    result = prepare(out)
    assert result.exit_code == 0, result.output
    assert "Baseline PSNR" in result.output and "test" in result.output
    manifest = load_manifest(out)
    splits = {c["split"] for c in manifest["cases"].values()}
    assert splits == {"train", "val", "test"}
    train = PatchPairs(out, "train")
    lr, hr = train[0]
    assert lr.shape == hr.shape == (1, 16, 16, 16)
    assert len(train) == manifest["splits"]["train"]["num_patches"] > 0
    index = json.loads((out / "train" / "patches.json").read_text())
    assert {p["case"] for p in index} <= {
        n for n, c in manifest["cases"].items() if c["split"] == "train"
    }
    case = next(iter_test_cases(out))
    assert case.lr.shape == (24, 24, 24)
    # LR percentiles define the normalisation, so the LR spans ~[0, 1]
    assert np.percentile(case.lr, 0.5) == pytest.approx(0, abs=1e-3)
    assert np.percentile(case.lr, 99.5) == pytest.approx(1, abs=1e-3)
    assert (out / "config.yaml").is_file()


def test_no_case_in_two_splits_and_split_is_seeded():
    for n in (3, 7, 20):
        which = split_cases(n, SplitConfig(0.15, 0.2), seed=1)
        assert len(which) == n and which.count("test") >= 1 and which.count("train") >= 1
        assert which == split_cases(n, SplitConfig(0.15, 0.2), seed=1)


def test_split_leaving_test_or_train_empty():
    with pytest.raises(ConfigError, match="test set would be empty"):
        split_cases(5, SplitConfig(0.2, 0.0), 0)
    with pytest.raises(ConfigError, match="no training case"):
        split_cases(2, SplitConfig(0.3, 0.3), 0)


def test_patch_starts_cover_volume_flush_with_edge():
    starts = patch_starts((20, 16), (8, 8), (8, 8))
    assert sorted({s[0] for s in starts}) == [0, 8, 12] and sorted({s[1] for s in starts}) == [0, 8]


def test_existing_dataset_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "ds"
    assert prepare(out).exit_code == 0
    before = (out / "manifest.json").read_text()
    line = error_line(prepare(out, "--set", "seed=5"))
    assert "already exists; pass --overwrite" in line
    assert (out / "manifest.json").read_text() == before
    assert prepare(out, "--set", "seed=5", "--overwrite").exit_code == 0


def test_patch_larger_than_volume(tmp_path):
    line = error_line(prepare(tmp_path / "ds", "--set", "patches.size=[32, 32, 32]"))
    assert "phantom_000: volume shape (24, 24, 24) is smaller than patches.size" in line
    assert not (tmp_path / "ds").exists()  # nothing half-written


def test_unknown_config_key(tmp_path):
    line = error_line(prepare(tmp_path / "ds", "--set", "pathces.size=[8, 8, 8]"))
    assert "unknown key 'pathces'" in line and "did you mean 'patches'" in line


def _pairs(tmp_path, lr: np.ndarray | None, hr: np.ndarray | None, *extra):
    """prepare_data on 3 pairs c{i}_lr/hr.npy in tmp_path (written from lr, hr unless None)."""
    for i in range(3 if lr is not None else 0):
        save_volume(tmp_path / f"c{i}_lr.npy", lr)
        save_volume(tmp_path / f"c{i}_hr.npy", hr)
    return run_script(
        "prepare_data", "--set", f"out_dir={tmp_path / 'ds'}", "--set", "source=pairs",
        "--set", f"pairs.folder={tmp_path}", "--set", "pairs.lr_glob=*_lr.npy",
        "--set", "pairs.hr_glob=*_hr.npy", "--set", "patches.size=[8, 8, 8]",
        "--set", "patches.stride=[8, 8, 8]", "--set", "split.val_fraction=0", *extra,
    )  # fmt: skip


def test_pairs_with_coarser_lr_are_resampled(tmp_path):
    rng = np.random.default_rng(0)
    result = _pairs(tmp_path, rng.random((8, 8, 8)), rng.random((16, 16, 16)))
    assert result.exit_code == 0, result.output
    assert next(iter_test_cases(tmp_path / "ds")).lr.shape == (16, 16, 16)


def test_pairs_shape_mismatch_without_resampling(tmp_path):
    rng = np.random.default_rng(0)
    line = error_line(
        _pairs(
            tmp_path,
            rng.random((8, 8, 8)),
            rng.random((16, 16, 16)),
            "--set",
            "pairs.resample=none",
        )
    )
    assert "LR shape (8, 8, 8) != HR shape (16, 16, 16)" in line


def test_nan_volume(tmp_path):
    hr = np.random.default_rng(0).random((16, 16, 16))
    hr[3, 3, 3] = np.nan
    line = error_line(_pairs(tmp_path, hr.copy(), hr))
    assert "NaN/Inf voxels" in line


def test_missing_file_and_raw_size_mismatch(tmp_path):
    base = ["--set", f"out_dir={tmp_path / 'ds'}", "--set", "source=hr_only"]
    line = error_line(
        run_script("prepare_data", *base, "--set", f"hr_only.hr=[{tmp_path / 'no.nii.gz'}]")
    )
    assert "volume file not found" in line and "no.nii.gz" in line
    for i in range(3):
        np.zeros(100, np.float32).tofile(tmp_path / f"v{i}.raw")
    files = ", ".join(str(tmp_path / f"v{i}.raw") for i in range(3))
    line = error_line(run_script(
        "prepare_data", *base, "--set", f"hr_only.hr=[{files}]", "--set", "raw.shape=[8, 8, 8]",
    ))  # fmt: skip
    assert "v0.raw: file has 400 bytes" in line and "needs 2048" in line


def test_errors_name_the_file(tmp_path):
    """Constant volume, too-small case and duplicate case names each name the offending file."""
    rng = np.random.default_rng(0)
    hr = rng.random((16, 16, 16)).astype(np.float32)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        save_volume(data / f"c{i}_hr.npy", hr)
        save_volume(data / f"c{i}_lr.npy", hr + 0.1 * rng.random(hr.shape).astype(np.float32))
    save_volume(data / "c1_lr.npy", np.full((16, 16, 16), 3.0, np.float32))
    line = error_line(_pairs(data, None, None))
    assert f"{data / 'c1_lr.npy'}: the LR volume is constant" in line
    assert not (data / "ds").exists()

    save_volume(data / "c1_lr.npy", hr)
    save_volume(data / "c2_hr.npy", hr[:4])
    save_volume(data / "c2_lr.npy", hr[:4])
    line = error_line(_pairs(data, None, None))
    assert f"{data / 'c2_lr.npy'}: volume shape (4, 16, 16) is smaller than patches.size" in line

    base = ["--set", f"out_dir={tmp_path / 'ds'}", "--set", "source=hr_only",
            "--set", "patches.size=[8, 8, 8]", "--set", "split.val_fraction=0"]  # fmt: skip
    (tmp_path / "a").mkdir()
    save_volume(tmp_path / "a" / "brain.npy", hr)
    files = f"[{data / 'c0_hr.npy'}, {tmp_path / 'a' / 'brain.npy'}, {data / 'c1_hr.npy'}, "
    files += f"{tmp_path / 'brain.npy'}]"
    save_volume(tmp_path / "brain.npy", hr)
    line = error_line(run_script("prepare_data", *base, "--set", f"hr_only.hr={files}"))
    assert f"{tmp_path / 'brain.npy'}: case name 'brain' is already taken by " in line
    assert str(tmp_path / "a" / "brain.npy") in line and "rename one" in line
    assert not (tmp_path / "ds").exists()


def test_dataset_keeps_volumes_once_and_crops_patches_on_access(tmp_path):
    """Disk grows with the volumes, not with volume / stride^3: stride 4 on 24^3 cases gives
    many overlapping 8^3 patches, yet the folder stays within 2x the normalised volumes."""
    from ldm.data.dataset import PatchPairs, load_manifest

    out = tmp_path / "ds"
    result = run_script(
        "prepare_data", "--set", f"out_dir={out}", "--set", "phantom.num_cases=3",
        "--set", "phantom.shape=[24, 24, 24]", "--set", "patches.size=[8, 8, 8]",
        "--set", "patches.stride=[4, 4, 4]", "--set", "patches.background_keep=1.0",
        "--set", "split.val_fraction=0.34", "--set", "split.test_fraction=0.34",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    pairs = PatchPairs(out, "train")
    assert len(pairs) == 125  # (24 - 8) / 4 + 1 = 5 positions per axis
    volumes = 3 * 2 * 24**3 * 4  # bytes of the normalised LR and HR volumes
    patches = len(pairs) * 2 * 8**3 * 4
    used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert patches > volumes / 3 and used < 2 * volumes  # the old layout added `patches`
    index = json.loads((out / "train" / "patches.json").read_text())
    case = manifest["cases"][index[7]["case"]]
    z, y, x = index[7]["start"]
    lr_vol = np.load(out / case["volume"]["lr"])
    lr, hr = pairs[7]
    np.testing.assert_array_equal(lr[0].numpy(), lr_vol[z : z + 8, y : y + 8, x : x + 8])
    assert pairs.lr[2:4].shape == (2, 8, 8, 8)


def test_a_dataset_of_the_earlier_patch_array_layout_still_reads(tmp_path):
    from ldm.core.files import save_json
    from ldm.data.dataset import PatchPairs, load_manifest

    out = tmp_path / "ds"
    assert run_script(
        "prepare_data", "--set", f"out_dir={out}", "--set", "phantom.num_cases=3",
        "--set", "phantom.shape=[16, 16, 16]", "--set", "patches.size=[8, 8, 8]",
        "--set", "patches.stride=[8, 8, 8]", "--set", "split.val_fraction=0.34",
        "--set", "split.test_fraction=0.34",
    ).exit_code == 0  # fmt: skip
    new = PatchPairs(out, "train")
    arrays = {k: np.stack([a[i] for i in range(len(new))]) for k, a in
              (("lr", new.lr), ("hr", new.hr))}  # fmt: skip
    manifest = load_manifest(out)
    for k, arr in arrays.items():  # rewrite the split as the earlier layout had it
        np.save(out / "train" / f"{k}.npy", arr)
        manifest["splits"]["train"][k] = f"train/{k}.npy"
    save_json(manifest, out / "manifest.json")
    old = PatchPairs(out, "train")
    assert isinstance(old.lr, np.ndarray) and len(old) == len(new)
    for i in range(len(new)):
        assert all(np.array_equal(a, b) for a, b in zip(old[i], new[i]))
