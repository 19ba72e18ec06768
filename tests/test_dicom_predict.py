"""predict_ldm on a DICOM series: NIfTI out by default on the input's geometry, and with
output_format dicom a new series beside the input's patient and study."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from tests.helpers.cli import run_script
from tests.helpers.dicom import PATIENT, read_series, tags_of, write_series
from tests.helpers.phases import predict_cli


def _scan(tmp_path):
    stored = np.random.default_rng(1).integers(0, 400, (16, 16, 16)).astype(np.int16)
    folder = tmp_path / "scan"
    uid = write_series(folder, stored)
    return folder, uid


def test_dicom_input_gives_nifti_on_the_input_geometry(tiny_pipeline, tmp_path):
    folder, _ = _scan(tmp_path)
    out = tmp_path / "pred"
    result = predict_cli(tiny_pipeline, out, "--input", folder, num_samples=2, gif=False)
    assert result.exit_code == 0, result.output
    src, _ = read_series(folder)
    (nii,) = (out / "scan").glob("scan_ldm.nii.gz")
    img = sitk.ReadImage(str(nii))
    assert img.GetSize() == src.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), src.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), src.GetDirection(), atol=1e-5)


def test_output_format_dicom_writes_a_new_series_of_the_same_patient(tiny_pipeline, tmp_path):
    folder, uid = _scan(tmp_path)
    out = tmp_path / "pred"
    result = predict_cli(tiny_pipeline, out, "--input", folder, "--set", "output_format=dicom",
                         num_samples=2, gif=False)
    assert result.exit_code == 0, result.output
    img, files = read_series(out / "scan" / "scan_ldm")
    src, src_files = read_series(folder)
    assert img.GetSize() == src.GetSize()
    np.testing.assert_allclose(img.GetOrigin(), src.GetOrigin(), atol=1e-3)
    new, old = tags_of(files[0]), tags_of(src_files[0])
    for key in ("0010|0010", "0010|0020", "0020|000d"):  # patient name and id, study UID
        assert new[key] == PATIENT[key] == old[key]
    assert new["0020|000e"] != uid  # a new SeriesInstanceUID
    assert "ldm3d" in new["0008|103e"]
    assert len({tags_of(f)["0008|0018"] for f in files}) == len(files)  # new SOP UIDs
    std, std_files = read_series(out / "scan" / "scan_std")  # the uncertainty is a series too
    assert std.GetSize() == src.GetSize()
    numbers = {tags_of(f)["0020|0011"] for f in (files[0], std_files[0], src_files[0])}
    assert len(numbers) == 3  # mean, std and source: three series numbers in the viewer


def test_prepare_data_takes_dicom_series_folders_as_pairs(tmp_path):
    """source: pairs with a folder of DICOM series (lr_glob / hr_glob matching folders)."""
    import json

    rng = np.random.default_rng(2)
    for i in range(3):
        hr = rng.integers(0, 400, (16, 16, 16)).astype(np.int16)
        noisy = np.clip(hr + rng.integers(-40, 40, hr.shape), -500, 1500).astype(np.int16)
        write_series(tmp_path / "scans" / f"c{i}_hr", hr)
        write_series(tmp_path / "scans" / f"c{i}_lr", noisy)
    result = run_script(
        "prepare_data", "--set", f"out_dir={tmp_path / 'ds'}", "--set", "source=pairs",
        "--set", f"pairs.folder={tmp_path / 'scans'}", "--set", "pairs.lr_glob=*_lr",
        "--set", "pairs.hr_glob=*_hr", "--set", "patches.size=[8, 8, 8]",
        "--set", "patches.stride=[8, 8, 8]", "--set", "split.val_fraction=0.34",
        "--set", "split.test_fraction=0.34",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert sorted(manifest["cases"]) == ["c0_hr", "c1_hr", "c2_hr"]
    meta = next(iter(manifest["cases"].values()))["meta"]
    assert meta["format"] == "dicom"
    np.testing.assert_allclose(meta["spacing"], [2.5, 0.9, 0.8], rtol=1e-5)  # (z, y, x)
