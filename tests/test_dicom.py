"""DICOM series in and out (ldm.data.dicom through ldm.data.io and ldm.data.external): geometry
and values round trip, patient/study tags copied into a new series, series choice, bad series (one
DataError naming the folder), and a DICOM folder as an external input. The series are made
here with SimpleITK's writer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ldm.core.errors import DataError, UserError
from ldm.data.dicom import load_dicom_series, save_dicom_series
from ldm.data.external import ExternalInputs, load_external_case, named_pairs
from ldm.data.io import RawSpec, VolumeMeta, load_volume, save_volume, volume_format
from tests.helpers.dicom import (
    DIRECTION,
    INTERCEPT,
    ORIGIN,
    PATIENT,
    SHAPE,
    SLOPE,
    SPACING,
    read_series,
    rotation,
    stored_values,
    tags_of,
    write_series,
)


@pytest.fixture
def series(tmp_path) -> tuple[Path, np.ndarray, str]:
    stored = stored_values()
    folder = tmp_path / "ct"
    return folder, stored, write_series(folder, stored)


# ---------------------------------------------------------------------------------------------
# reading


def test_load_keeps_values_in_real_units_and_the_geometry(series):
    folder, stored, uid = series
    assert volume_format(folder) == "dicom"
    data, meta = load_volume(folder)
    assert data.dtype == np.float32 and data.shape == SHAPE
    np.testing.assert_array_equal(data, stored * SLOPE + INTERCEPT)  # rescale applied
    assert meta.format == "dicom"
    np.testing.assert_allclose(meta.spacing, SPACING[::-1], atol=1e-6)  # (z, y, x)
    np.testing.assert_allclose(meta.origin, ORIGIN[::-1], atol=1e-6)
    np.testing.assert_allclose(meta.direction, DIRECTION, atol=1e-6)  # as SimpleITK gives it
    assert meta.source == str(folder.resolve()) and meta.series_uid == uid
    assert meta.dtype == "float64"  # what SimpleITK reads for a non-integer slope
    assert VolumeMeta.from_dict(meta.to_dict()) == meta
    # the same series through SimpleITK directly: same array, (z, y, x)
    ref, _ = read_series(folder)
    np.testing.assert_array_equal(data, sitk.GetArrayFromImage(ref))


def test_meta_without_dicom_fields_round_trips_as_before():
    meta = VolumeMeta("raw", (1.0, 2.0, 3.0), (0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    assert "source" not in meta.to_dict() and "series_uid" not in meta.to_dict()
    assert VolumeMeta.from_dict(meta.to_dict()) == meta
    old = {"format": "nifti", "spacing": [1, 1, 1], "origin": [], "affine": None}
    assert VolumeMeta.from_dict(old).source is None


def test_several_series_need_a_choice(tmp_path):
    folder = tmp_path / "study"
    a = write_series(folder, stored_values(1), description="axial A")
    b = write_series(folder, stored_values(2)[:7], description="axial B")
    with pytest.raises(DataError) as e:
        load_volume(folder)
    msg = str(e.value)
    assert str(folder) in msg and "2 DICOM series" in msg and f"{folder}@UID" in msg
    assert f"{a} ('axial A'): 12 slice(s)" in msg and f"{b} ('axial B'): 7 slice(s)" in msg
    data, meta = load_volume(f"{folder}@{b}")
    assert data.shape == (7, 20, 16) and meta.series_uid == b
    np.testing.assert_array_equal(data, stored_values(2)[:7] * SLOPE + INTERCEPT)
    data, meta = load_dicom_series(folder, series_uid=a)
    assert data.shape == SHAPE and meta.series_uid == a
    with pytest.raises(DataError, match=r"no DICOM series 1\.2\.3 there; it holds .*axial A"):
        load_volume(f"{folder}@1.2.3")


# ---------------------------------------------------------------------------------------------
# bad series: one DataError naming the folder and the problem


def _error(path) -> str:
    with pytest.raises(DataError) as e:
        load_volume(path)
    return str(e.value)


def test_empty_folder_and_non_dicom_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _error(empty)
    assert msg.startswith(f"{empty}: no DICOM series found") and "empty" in msg
    text = tmp_path / "notes"
    text.mkdir()
    (text / "readme.txt").write_text("not an image\n")
    msg = _error(text)
    assert msg.startswith(f"{text}: no DICOM series found") and "readme.txt" in msg
    assert "DICOM folder not found" in _error(f"{tmp_path / 'missing'}@1.2.3")


def test_single_slice_is_not_a_volume(tmp_path):
    folder = tmp_path / "one"
    write_series(folder, stored_values()[:1])
    msg = _error(folder)
    assert msg.startswith(f"{folder}:") and "single 2D slice" in msg and "3D series" in msg


def test_missing_middle_slice_is_a_gap(series):
    folder, _, uid = series
    files = sorted(folder.iterdir())
    files[5].unlink()
    msg = _error(folder)
    assert msg.startswith(f"{folder}: series {uid} has irregular slice spacing")
    assert f"between {files[4].name} and {files[6].name}" in msg and "median step is 2.5 mm" in msg
    assert "about 1 slice(s) missing" in msg


def test_corrupt_file_is_named(series):
    folder, _, _ = series
    bad = sorted(folder.iterdir())[5]
    bad.write_bytes(bad.read_bytes()[:-300])  # truncated: GDCM leaves it out of the series
    msg = _error(folder)
    assert msg.startswith(f"{folder}:") and "irregular slice spacing" in msg
    assert bad.name in msg and "corrupt" in msg


def test_undecodable_pixel_data_is_named(series):
    folder, stored, _ = series
    shutil.rmtree(folder)
    write_series(folder, stored, compressed=(4,))
    bad = sorted(folder.iterdir())[4]
    blob = bad.read_bytes()
    j2k, jpeg_ls = b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.80"
    assert j2k in blob
    bad.write_bytes(blob.replace(j2k, jpeg_ls))  # J2K data labelled JPEG-LS: GDCM fails
    msg = _error(folder)
    assert msg.startswith(f"{folder}: cannot read {bad.name}")
    assert "JPEG-LS" in msg and "cannot decode" in msg


def test_mixed_orientations(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder, stored_values(), iop={6: "1\\0\\0\\0\\1\\0"})
    msg = _error(folder)
    assert msg.startswith(f"{folder}:") and "mixes slice orientations" in msg
    assert "1 of 12 slices" in msg and "_006.dcm" in msg


# ---------------------------------------------------------------------------------------------
# writing


def test_save_dicom_series_is_a_new_series_of_the_same_patient(series, tmp_path):
    folder, _, src_uid = series
    data, meta = load_volume(folder)
    result = data * 1.37 + 0.123  # not on the source's grid: new slope/intercept
    out = save_dicom_series(tmp_path / "ldm", result, meta, description="ldm3d enhanced")
    assert out == tmp_path / "ldm" and not list(tmp_path.glob(".ldm.*"))  # no temp left
    img, files = read_series(out)
    assert len(files) == SHAPE[0]
    back = sitk.GetArrayFromImage(img)
    assert np.abs(back - result).max() <= (result.max() - result.min()) / 60000
    np.testing.assert_allclose(img.GetSpacing(), SPACING, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), ORIGIN, atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), DIRECTION, atol=1e-6)

    src = tags_of(str(sorted(folder.iterdir())[0]))
    tags = [tags_of(f) for f in files]
    for key, value in PATIENT.items():
        assert all(t[key] == value for t in tags), key
    assert {t["0020|000e"] for t in tags} != {src_uid} and len({t["0020|000e"] for t in tags}) == 1
    assert tags[0]["0020|000e"].startswith("2.25.")
    sops = {t["0008|0018"] for t in tags}
    assert len(sops) == SHAPE[0] and src["0008|0018"] not in sops
    assert all(t["0008|103e"] == "ldm3d enhanced" for t in tags)
    assert all(t["0020|0011"] == "1003" for t in tags)  # the source's 3 + 1000
    assert len({(t["0028|1053"], t["0028|1052"]) for t in tags}) == 1  # one rescale for all
    assert [int(t["0020|0013"]) for t in tags] == list(range(1, SHAPE[0] + 1))
    assert float(tags[0]["0018|0050"]) == pytest.approx(2.5)

    again, meta2 = load_volume(out)  # and through ldm.data.io again
    assert np.abs(again - result).max() <= (result.max() - result.min()) / 60000
    assert meta2.series_uid == tags[0]["0020|000e"]


def test_integer_values_are_stored_exactly(series, tmp_path):
    folder, stored, _ = series
    _, meta = load_volume(folder)
    out = save_volume(tmp_path / "hu", stored.astype(np.float32), meta)  # no extension: dicom
    img, files = read_series(out)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), stored)
    t = tags_of(files[0])
    assert (t["0028|1053"], t["0028|1052"]) == ("1", "0")


def test_existing_output_folder_is_refused(series, tmp_path):
    folder, _, _ = series
    data, meta = load_volume(folder)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=f"{out} already exists"):
        save_dicom_series(out, data, meta)
    with pytest.raises(UserError, match="already exists"):
        save_volume(folder, data, meta)  # the source itself
    assert list(out.iterdir()) == [] and len(list(folder.iterdir())) == SHAPE[0]


def test_a_failed_write_leaves_nothing(series, tmp_path, monkeypatch):
    folder, _, _ = series
    data, meta = load_volume(folder)
    real, calls = sitk.ImageFileWriter.Execute, []

    def fail_on_the_fourth(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk full")
        return real(self, *args)

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", fail_on_the_fourth)
    with pytest.raises(UserError, match=r"out: SimpleITK cannot write the DICOM series \(disk"):
        save_dicom_series(tmp_path / "out", data, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no folder, no temp folder


def test_save_volume_fmt_dicom_from_a_nifti_keeps_its_space(tmp_path):
    vol = np.random.default_rng(3).random((7, 8, 9)).astype(np.float32) * 200 - 50
    r = rotation()
    affine = np.eye(4)
    affine[:3, :3] = r * [1.5, 0.7, 2.0]
    affine[:3, 3] = [12.0, -3.0, 40.0]
    nii = save_volume(tmp_path / "v.nii.gz", vol, VolumeMeta("nifti", affine=affine.tolist()))
    data, meta = load_volume(nii)
    out = save_volume(tmp_path / "v_dicom.series", data, meta, fmt="dicom")
    img, _ = read_series(out)
    ref = sitk.ReadImage(str(nii))  # ITK's own NIfTI -> LPS reading
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-5)
    want = sitk.GetArrayFromImage(ref)
    assert np.abs(sitk.GetArrayFromImage(img) - want).max() <= np.ptp(want) / 60000
    with pytest.raises(UserError, match="unknown volume format 'tiff'"):
        save_volume(tmp_path / "x", data, meta, fmt="tiff")


# ---------------------------------------------------------------------------------------------
# external inputs


MANIFEST = {"normalization": {"low_percentile": 1.0, "high_percentile": 99.0},
            "spacing": [2.5, 0.9, 0.8]}  # fmt: skip


def test_dicom_folder_as_external_input(series, tmp_path):
    folder, stored, uid = series
    spec = ExternalInputs(input=folder)
    ((name, lr, hr),) = named_pairs(spec, need_target=False, command="predict_ldm")
    assert (name, lr, hr) == ("ct", folder, None)
    case, warning = load_external_case(name, lr, None, MANIFEST, RawSpec())
    assert warning is None and case.lr.shape == SHAPE and case.meta.format == "dicom"
    np.testing.assert_allclose(case.spacing, (2.5, 0.9, 0.8), atol=1e-6)
    real = stored * SLOPE + INTERCEPT
    np.testing.assert_allclose(case.to_original(case.lr), real, atol=1e-3)
    # a chosen series: folder@UID; its name keeps the folder and the UID's last part
    ((name, lr, _),) = named_pairs(ExternalInputs(input=Path(f"{folder}@{uid}")), False, "x")
    assert name == f"ct_{uid.rsplit('.', 1)[-1]}"
    assert load_external_case(name, lr, None, MANIFEST, RawSpec())[0].lr.shape == SHAPE


def test_folder_globs_match_dicom_folders(tmp_path):
    root = tmp_path / "scans"
    for key in ("p1", "p2"):
        write_series(root / f"{key}_lr", stored_values(1))
        write_series(root / f"{key}_hr", stored_values(2))
    (root / "p1_lr" / "notes.txt").write_text("GDCM skips this\n")
    spec = ExternalInputs(folder=root, input_glob="*_lr", target_glob="*_hr")
    pairs = named_pairs(spec, need_target=True, command="evaluate_psnr")
    assert pairs == [("p1", root / "p1_lr", root / "p1_hr"), ("p2", root / "p2_lr", root / "p2_hr")]
    case, _ = load_external_case("p1", root / "p1_lr", root / "p1_hr", MANIFEST, RawSpec())
    assert case.lr.shape == case.hr.shape == SHAPE
