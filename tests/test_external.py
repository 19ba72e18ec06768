"""External pairs for evaluate_psnr and predict_ldm: --input/--target, --folder + globs,
the spacing warning and --resample, and bad inputs (one error line naming the file)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import ldm.evaluate.baselines as baselines
import ldm.phases.predict_ldm as predict
from ldm.data.dataset import iter_test_cases, load_manifest
from ldm.data.io import VolumeMeta, load_volume, save_volume
from tests.helpers.cli import error_line
from tests.helpers.phases import FAST_TUNE, evaluate_cli, predict_cli

SCALE, OFFSET = 3.0, 100.0  # the external copy: another intensity scale and offset
ROWS = ("Baseline (LR)", "Gaussian filter", "Heat diffusion", "TV (Chambolle)",
        "Non-local means", "Restorer", "Oracle (HR latent)")  # fmt: skip
SCORE_COLUMNS = 8  # PSNR, SSIM, bias, bias %, contrast, ESR, HFER, FSC hi


@pytest.fixture(autouse=True)
def no_bm4d(monkeypatch):
    monkeypatch.setattr(baselines, "bm4d_available", lambda: False)  # minutes on a CPU


def _nifti(path, data, spacing=1.0):
    meta = VolumeMeta("nifti", affine=np.diag([spacing] * 3 + [1.0]).tolist())
    return save_volume(path, data.astype(np.float32), meta)


@pytest.fixture(scope="module")
def pair(tiny_pipeline, tmp_path_factory):
    """The first test case in original units, scaled by SCALE + OFFSET, as a NIfTI pair."""
    case = next(iter_test_cases(tiny_pipeline.data_dir))
    folder = tmp_path_factory.mktemp("external")
    lr = case.to_original(case.lr.astype(np.float64)) * SCALE + OFFSET
    hr = case.to_original(case.hr.astype(np.float64)) * SCALE + OFFSET
    return case.name, _nifti(folder / "a_lr.nii.gz", lr), _nifti(folder / "a_hr.nii.gz", hr)


def test_manifest_records_the_training_spacing(tiny_pipeline):
    assert load_manifest(tiny_pipeline.data_dir)["spacing"] == [1.0, 1.0, 1.0]  # phantom: 1 mm


def test_evaluate_external_pair_matches_the_test_case(tiny_pipeline, pair, tmp_path):
    """Normalisation uses the LR alone, so every method gives the same normalised output on a
    rescaled copy of a test case: same PSNR and contrast, bias scaled by SCALE (same in % of the
    range). SSIM is not offset-invariant (its luminance term), so it is checked on its own."""
    name, lr, hr = pair
    out, ref = tmp_path / "ext", tmp_path / "ref"
    result = evaluate_cli(tiny_pipeline, out, "--input", lr, "--target", hr)
    assert result.exit_code == 0, result.output
    text = result.output
    assert re.search(r"^method\s+PSNR \(dB\)\s+SSIM\s+bias\s+bias %\s+contrast\s+ESR\s+HFER"
                     r"\s+FSC hi$", text, re.M)  # fmt: skip
    for label in ROWS:
        assert re.search(rf"^{re.escape(label)}(\s+-?[\d.+e-]+){{{SCORE_COLUMNS}}}$", text,
                         re.M), label  # fmt: skip
    assert "warning" not in text  # 1 mm like the training data
    got = json.loads((out / "metrics.json").read_text())
    assert list(got["cases"]) == ["a_lr"] and got["external"]["training_spacing"] == [1, 1, 1]
    assert evaluate_cli(tiny_pipeline, ref, "--set", f"cases=[{name}]").exit_code == 0
    want = json.loads((ref / "metrics.json").read_text())["cases"][name]
    for method, s in got["cases"]["a_lr"].items():
        w = want[method]
        assert s["psnr"] == pytest.approx(w["psnr"], abs=1e-3), method
        assert s["contrast"] == pytest.approx(w["contrast"], abs=1e-4), method
        assert s["bias"] == pytest.approx(SCALE * w["bias"], abs=1e-3 * SCALE), method
        assert s["bias_pct"] == pytest.approx(w["bias_pct"], abs=1e-3), method
        for k in ("esr", "hfer", "fsc"):  # ratios and correlations: scale-invariant too
            assert s[k] == pytest.approx(w[k], abs=1e-3), (method, k)
    # sane numbers: the baseline against scikit-image on the files themselves
    lr_vol, hr_vol = load_volume(lr)[0].astype(np.float64), load_volume(hr)[0]
    r = float(hr_vol.max() - hr_vol.min())
    base = got["cases"]["a_lr"]["baseline"]
    assert base["psnr"] == pytest.approx(peak_signal_noise_ratio(hr_vol, lr_vol, data_range=r))
    assert base["bias"] == pytest.approx(float(np.mean(lr_vol - hr_vol)), abs=1e-3)
    ref_ssim = structural_similarity(hr_vol.astype(np.float64), lr_vol, data_range=r,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert base["ssim"] == pytest.approx(ref_ssim, abs=1e-6)  # fmt: skip
    assert got["cases"]["a_lr"]["gaussian"]["psnr"] >= base["psnr"] - 1e-6  # sigma 0 is allowed


def test_predict_external_pair_has_the_ldm_row(tiny_pipeline, pair, tmp_path):
    _, lr, hr = pair
    out = tmp_path / "pred"
    result = predict_cli(tiny_pipeline, out, *FAST_TUNE, "--input", lr, "--target", hr, gif=False)
    assert result.exit_code == 0, result.output
    for label in (*ROWS, "LDM one sample", "LDM mean"):
        assert re.search(rf"^{re.escape(label)}(\s+-?[\d.+e-]+){{{SCORE_COLUMNS}}}$",
                         result.output, re.M), label  # fmt: skip
    m = json.loads((out / "a_lr" / "metrics.json").read_text())["metrics"]
    for method in ("ldm", "ldm_sample"):
        scores = [m[method][k] for k in ("psnr", "ssim", "bias", "contrast", "esr", "hfer", "fsc")]
        assert np.isfinite(scores).all(), method
    assert m["baseline"]["psnr"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["mean"]["baseline"]["psnr"]
    )
    vol, meta = load_volume(out / "a_lr" / "a_lr_ldm.nii.gz")
    assert vol.shape == (24, 24, 24) and meta.format == "nifti"
    assert 0.5 * OFFSET < float(vol.mean()) < 2 * OFFSET + SCALE * 10  # back in the input's units


def test_folder_and_globs_pair_by_name(tiny_pipeline, pair, tmp_path):
    _, lr, hr = pair
    folder = tmp_path / "scans"
    folder.mkdir()
    for key, scale in (("p1", 1.0), ("p2", 0.5)):
        _nifti(folder / f"{key}_lr.nii.gz", load_volume(lr)[0] * scale)
        _nifti(folder / f"{key}_hr.nii.gz", load_volume(hr)[0] * scale)
    out = tmp_path / "res"
    result = evaluate_cli(tiny_pipeline, out, "--folder", folder, "--input-glob", "*_lr.nii.gz",
                          "--target-glob", "*_hr.nii.gz")  # fmt: skip
    assert result.exit_code == 0, result.output
    got = json.loads((out / "metrics.json").read_text())
    assert list(got["cases"]) == ["p1", "p2"]
    assert got["external"]["pairs"]["p2"]["target"] == str(folder / "p2_hr.nii.gz")
    p1, p2 = got["cases"]["p1"], got["cases"]["p2"]
    for method in ("restorer", "oracle"):  # the same normalised volumes
        assert p1[method]["psnr"] == pytest.approx(p2[method]["psnr"], abs=1e-3), method
    assert p1["baseline"]["bias"] == pytest.approx(2 * p2["baseline"]["bias"], rel=1e-4)
    assert "p1 PSNR" in result.output and "p2 PSNR" in result.output  # per-case columns

    (folder / "p3_lr.nii.gz").write_bytes((folder / "p1_lr.nii.gz").read_bytes())
    line = error_line(evaluate_cli(tiny_pipeline, tmp_path / "r2", "--folder", folder,
                                   "--input-glob", "*_lr.nii.gz", "--target-glob", "*_hr.nii.gz"))
    assert "p3_lr.nii.gz" in line and "no partner" in line  # fmt: skip


def test_spacing_warning_and_resample_back_to_the_input_grid(
    tiny_pipeline, pair, tmp_path, monkeypatch
):
    _, lr, hr = pair
    fine = _nifti(tmp_path / "fine.nii.gz", load_volume(lr)[0], spacing=0.5)
    result = predict_cli(tiny_pipeline, tmp_path / "a", *FAST_TUNE, "--input", fine, gif=False)
    assert result.exit_code == 0, result.output
    warning = [x for x in result.output.splitlines() if x.startswith("warning:")]
    assert len(warning) == 1, result.output
    assert "(0.5, 0.5, 0.5) mm" in warning[0] and "(1, 1, 1) mm" in warning[0]
    assert "--resample" in warning[0] and str(fine) in warning[0]

    shapes = []
    real = predict.predict_volume

    def spy(ldm, vol, cfg, window):
        shapes.append(vol.shape)
        return real(ldm, vol, cfg, window)

    monkeypatch.setattr(predict, "predict_volume", spy)
    import ldm.data.external as external

    to_model = []
    real_resize = external.resize

    def resize_spy(x, shape):
        to_model.append(tuple(shape) == (12, 12, 12))
        return real_resize(x, shape)

    monkeypatch.setattr(external, "resize", resize_spy)
    out = tmp_path / "b"
    fine_hr = _nifti(tmp_path / "fine_hr.nii.gz", load_volume(hr)[0], spacing=0.5)
    result = predict_cli(tiny_pipeline, out, *FAST_TUNE, "--input", fine, "--target", fine_hr,
                         "--resample", gif=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert shapes == [(12, 12, 12)]  # 24 voxels of 0.5 mm at the training 1 mm
    # LR and HR each resampled to the model grid once (the LR serves LDM, filters and GIF)
    assert sum(to_model) == 2
    vol, meta = load_volume(out / "fine" / "fine_ldm.nii.gz")
    assert vol.shape == (24, 24, 24) and np.allclose(meta.affine, np.diag([0.5] * 3 + [1.0]))
    assert json.loads((out / "metrics.json").read_text())["external"]["resample"] is True


def test_old_manifest_without_spacing_gives_no_warning(tiny_pipeline, pair, tmp_path):
    data = tmp_path / "old"
    shutil.copytree(tiny_pipeline.data_dir, data, ignore=shutil.ignore_patterns("latents"))
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["spacing"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    fine = _nifti(tmp_path / "fine.nii.gz", load_volume(pair[1])[0], spacing=0.5)
    result = predict_cli(tiny_pipeline, tmp_path / "a", *FAST_TUNE, "--set", f"data_dir={data}",
                         "--input", fine, gif=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "b", *FAST_TUNE,
                                  "--set", f"data_dir={data}", "--input", fine, "--resample",
                                  gif=False))  # fmt: skip
    assert "--resample needs both voxel spacings" in line and "rerun prepare_data" in line


def test_bad_inputs_name_the_file(tiny_pipeline, pair, tmp_path):
    _, lr, hr = pair
    small = _nifti(tmp_path / "small_hr.nii.gz", load_volume(hr)[0][:20])
    line = error_line(evaluate_cli(tiny_pipeline, tmp_path / "a", "--input", lr,
                                   "--target", small))  # fmt: skip
    assert str(small) in line and "(20, 24, 24)" in line and "one grid" in line
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "b", *FAST_TUNE, "--input", lr,
                                  "--target", small, gif=False))  # fmt: skip
    assert str(small) in line
    nan = load_volume(lr)[0]
    nan[3, 4, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    line = error_line(evaluate_cli(tiny_pipeline, tmp_path / "c", "--input", tmp_path / "nan.npy",
                                   "--target", hr))  # fmt: skip
    assert "nan.npy" in line and "NaN" in line
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"not a nifti file")
    line = error_line(evaluate_cli(tiny_pipeline, tmp_path / "d", "--input", garbage,
                                   "--target", hr))  # fmt: skip
    assert str(garbage) in line and "not a readable NIfTI" in line
    line = error_line(evaluate_cli(tiny_pipeline, tmp_path / "e", "--input", lr))
    assert "add --target HR" in line
    line = error_line(evaluate_cli(tiny_pipeline, tmp_path / "f", "--folder", tmp_path))
    assert "--folder needs --input-glob" in line
    np.save(tmp_path / "nohdr.npy", load_volume(lr)[0])
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "g", *FAST_TUNE,
                                  "--input", tmp_path / "nohdr.npy", "--resample",
                                  gif=False))  # fmt: skip
    assert "nohdr.npy has no voxel spacing" in line
    for out in "abcdefg":
        assert not (tmp_path / out).exists()


def test_resample_round_trip_keeps_contrast():
    """--resample maps a scan to the training grid and the output back: a round trip 32^3 ->
    45^3 -> 32^3 (1.4 mm <-> 1 mm) must not flatten it (trilinear: -6.5 % contrast, 40 dB)."""
    from scipy.ndimage import gaussian_filter

    from ldm.data.external import resize
    from ldm.evaluate.metrics import intensity_fit, psnr

    rng = np.random.default_rng(0)
    hr = gaussian_filter(rng.standard_normal((32, 32, 32)), 1.5).astype(np.float32)
    up = resize(hr, (45, 45, 45))
    assert up.shape == (45, 45, 45) and up.dtype == np.float32
    back = resize(up, hr.shape)
    assert abs(intensity_fit(back, hr)["contrast"] - 1) < 0.005
    assert psnr(back, hr, data_range=float(np.ptp(hr))) > 60
