"""predict_ldm: predict_volume's mean, std and one sample, and the phase's files and table."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.io import load_volume, save_volume
from ldm.diffusion.latent_diffusion import SamplerConfig, load_ldm
from ldm.evaluate.inference import first_stage_volume
from ldm.phases.predict_ldm import PredictConfig, predict_volume
from tests.helpers.cli import ROOT, error_line, run_script
from tests.helpers.phases import predict_cli


@pytest.fixture(scope="module")
def ldm(tiny_pipeline):
    return load_ldm(tiny_pipeline.vae, tiny_pipeline.diffusion, torch.device("cpu"))


def cfg(**kw) -> PredictConfig:
    return PredictConfig(sampler=SamplerConfig(steps=3), batch_size=4, **{"num_samples": 2, **kw})


def test_volume_not_divisible_by_window_keeps_its_shape(ldm):
    lr = np.random.default_rng(0).random((21, 18, 25)).astype(np.float32)
    mean, std, sample = predict_volume(ldm, lr, cfg(num_samples=1), (16, 16, 16))
    assert mean.shape == lr.shape and std is None and np.isfinite(mean).all()
    np.testing.assert_array_equal(sample, mean)  # one sample: it is the mean


def test_eta0_is_deterministic_and_seed_matters_for_eta1(ldm):
    lr = np.random.default_rng(1).random((16, 16, 24)).astype(np.float32)
    a = predict_volume(ldm, lr, cfg(), (16, 16, 16))
    b = predict_volume(ldm, lr, cfg(), (16, 16, 16))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # mean, std and sample
    c = predict_volume(ldm, lr, cfg(seed=1), (16, 16, 16))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])  # the start noise
    eta1 = dataclasses.replace(cfg(), sampler=SamplerConfig(steps=3, eta=1.0))
    d, e = (predict_volume(ldm, lr, eta1, (16, 16, 16)) for _ in range(2))
    assert all(np.array_equal(x, y) for x, y in zip(d, e))  # eta 1: reproducible by its seed
    assert not np.array_equal(a[2], d[2])  # ... and the sampler noise changes the sample


def test_no_seams_on_constant_input_with_a_constant_window_fn(ldm, monkeypatch):
    """Blending of overlapping windows: a window function that returns a constant gives a
    constant volume (no seams at window borders), in each of the 3 outputs."""
    import ldm.phases.predict_ldm as predict

    def constant(*a):
        return lambda x: torch.tensor([0.7, 0.1, 0.4]).reshape(1, 3, 1, 1, 1).expand(
            x.shape[0], 3, *x.shape[2:])  # fmt: skip

    monkeypatch.setattr(predict, "ldm_window_fn", constant)
    vol = np.zeros((20, 30, 17), np.float32)
    mean, std, sample = predict_volume(ldm, vol, cfg(overlap=0.5), (16, 16, 16))
    for got, want in ((mean, 0.7), (std, 0.1), (sample, 0.4)):
        assert got.shape == vol.shape and np.abs(got - want).max() < 1e-6


def test_num_samples_gives_uncertainty(ldm):
    lr = np.random.default_rng(2).random((16, 16, 16)).astype(np.float32)
    mean, std, sample = predict_volume(ldm, lr, cfg(num_samples=3), (16, 16, 16))
    assert std is not None and std.shape == lr.shape and std.min() >= 0 and std.max() > 0
    assert not np.allclose(mean, sample)  # the mean of 3 samples is not the first one


def test_detail_weight_0_is_the_restorer(ldm):
    lr = np.random.default_rng(5).random((16, 16, 24)).astype(np.float32)
    mean, std, sample = predict_volume(ldm, lr, cfg(detail_weight=0.0), (16, 16, 16))
    restorer = first_stage_volume(ldm.vae, lr, (16, 16, 16), batch_size=4, progress=False)
    np.testing.assert_allclose(mean, restorer, atol=1e-5)
    np.testing.assert_allclose(sample, restorer, atol=1e-5)
    assert np.abs(std).max() == 0.0


def test_cli_writes_pictures_volume_and_metrics(tiny_pipeline, tmp_path):
    out = tmp_path / "pred"
    result = predict_cli(tiny_pipeline, out, "--set", "num_samples=2", "--set", "tune.bm4d=false")
    assert result.exit_code == 0, result.output
    for label in ("Baseline (LR)", "Gaussian filter", "Heat diffusion", "TV (Chambolle)",
                  "Non-local means", "Restorer", "LDM one sample", "LDM mean",
                  "Oracle (HR latent)"):  # fmt: skip
        assert re.search(rf"^{re.escape(label)}\s+\d+\.\d\d\s", result.output, re.M), label
    assert re.search(r"^uncertainty \(2 samples\): variance-to-error ratio \d+\.\d\d "
                     r"\(calibrated: about 0\.67\), AUSE", result.output, re.M)  # fmt: skip
    # N / (N + 1): predict_ldm writes the sample std with Bessel's correction
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    for name in ("0_comparison.png", "1_input_LR.png", "2_target_HR.png", "3_output_LDM.png",
                 "4_uncertainty.png", "reverse_process.gif", "metrics.json"):  # fmt: skip
        assert (case / name).is_file(), name
    gif = Image.open(case / "reverse_process.gif")  # 6 panels: 4 decoded, 2 chain values
    first = np.asarray(gif.convert("L"), np.float32)
    gif.seek(gif.n_frames - 1)
    last = np.asarray(gif.convert("L"), np.float32)
    chain = slice(first.shape[1] * 4 // 6, None)  # x_t | predicted x_0 of the chain
    assert np.abs(first[:, chain] - last[:, chain]).mean() > 5  # noise -> the sample
    m = json.loads((case / "metrics.json").read_text())
    assert set(m["metrics"]) == {"baseline", "gaussian", "heat", "tv", "nlm", "restorer",
                                 "ldm_sample", "ldm", "oracle"}  # fmt: skip
    assert set(m["metrics"]["ldm"]) == {"psnr", "ssim", "bias", "bias_pct", "contrast", "esr",
                                        "hfer", "fsc"}  # fmt: skip
    assert set(m["uncertainty_scores"]) == {"var_err_ratio", "ause", "ause_random"}
    assert np.isfinite(list(m["uncertainty_scores"].values())).all()
    vol, meta = load_volume(m["output"])  # the phantom is written as .raw + .mhd
    assert meta.format == "raw" and vol.shape == (24, 24, 24)
    std, _ = load_volume(m["uncertainty"])
    assert std.shape == (24, 24, 24) and std.min() >= 0 and std.max() > 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_samples"] == 2 and summary["detail_weight"] == 1.0
    assert "uncertainty" in summary["mean"]
    assert (out / "metrics.csv").read_text().startswith("method,case,psnr,ssim")
    one = predict_cli(tiny_pipeline, tmp_path / "one", "--set", "num_samples=1",
                      "--set", "tune.bm4d=false", "--set", "gif=false")  # fmt: skip
    assert one.exit_code == 0, one.output
    (case,) = [p for p in (tmp_path / "one").iterdir() if p.is_dir()]
    m = json.loads((case / "metrics.json").read_text())
    assert "uncertainty" not in m and not (case / "4_uncertainty.png").exists()
    assert "uncertainty (" not in one.output


def test_user_input_volume_in_its_own_format(tiny_pipeline, tmp_path):
    src = np.random.default_rng(3).random((20, 24, 16)).astype(np.float32) * 100 + 50
    affine = np.diag([0.5, 0.7, 1.2, 1.0])
    from ldm.data.io import VolumeMeta

    path = save_volume(tmp_path / "mine.nii.gz", src, VolumeMeta("nifti", affine=affine.tolist()))
    out = tmp_path / "pred"
    result = predict_cli(tiny_pipeline, out, "--input", path)
    assert result.exit_code == 0, result.output
    vol, meta = load_volume(out / "mine" / "mine_ldm.nii.gz")
    assert vol.shape == src.shape and np.allclose(meta.affine, affine)
    assert (out / "mine" / "3_output_LDM.png").is_file()
    assert not (out / "mine" / "2_target_HR.png").exists()


def test_a_volume_smaller_than_one_window_multiple_is_predicted(tiny_pipeline, tmp_path):
    # 4 voxels a side is less than the model's window multiple (8): the sliding windows pad it,
    # and so must the reverse-process GIF's crop (it was a UNet shape error)
    np.save(tmp_path / "tiny.npy", np.random.default_rng(4).random((4, 6, 5)).astype(np.float32))
    out = tmp_path / "pred"
    result = predict_cli(tiny_pipeline, out, "--input", tmp_path / "tiny.npy")
    assert result.exit_code == 0, result.output
    assert np.load(out / "tiny" / "tiny_ldm.npy").shape == (4, 6, 5)
    assert (out / "tiny" / "reverse_process.gif").is_file()


def test_bad_input(tiny_pipeline, tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.float32))
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "a", "--input", tmp_path / "flat.npy"))
    assert "must be a 3D volume" in line
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "b", "--set", "sampler.steps=2000"))
    assert "steps 2000 > the model's 1000" in line
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "c", "--set", "sampler.spacing=middle"))
    assert "spacing must be one of trailing, leading, linspace" in line
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "d", "--set", "sampler.kind=euler"))
    assert "sampler.kind must be one of ddim, ddpm" in line
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "e", "--set",
                                  f"diffusion_checkpoint={tmp_path / 'none.pt'}"))  # fmt: skip
    assert "run train_diffusion first" in line
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "f", "--set", "window=[12, 12, 12]"))
    assert "divisible by 8" in line


def test_rows_are_the_first_stage_and_the_ldm_volumes(tiny_pipeline, tmp_path):
    """The restorer and oracle rows are mu(LR) and mu + D(E(HR - mu)) on the run's windows; the
    LDM mean and one-sample rows, and the written volume, are predict_volume's outputs."""
    from ldm.core.config import load_config
    from ldm.data.dataset import iter_test_cases
    from ldm.evaluate.metrics import psnr
    from ldm.nets.loading import load_vae

    out = tmp_path / "pred"
    overrides = [f"data_dir={tiny_pipeline.data_dir}", f"vae_checkpoint={tiny_pipeline.vae}",
                 f"diffusion_checkpoint={tiny_pipeline.diffusion}", f"out_dir={out}",
                 "sampler.steps=2", "device=cpu", "num_samples=3", "tune.bm4d=false",
                 "gif=false"]  # fmt: skip
    args = [a for o in overrides for a in ("--set", o)]
    assert run_script("predict_ldm", *args).exit_code == 0
    pcfg = load_config(PredictConfig, ROOT / "configs" / "predict_ldm.yaml", overrides)
    vae, _ = load_vae(tiny_pipeline.vae, torch.device("cpu"))
    run = json.loads((out / "metrics.json").read_text())  # the layout the run used
    window = tuple(run["window"])
    assert window == pcfg.window and run["num_samples"] == 3
    case = next(iter_test_cases(tiny_pipeline.data_dir))
    row = json.loads((out / case.name / "metrics.json").read_text())
    m = row["metrics"]
    hr = case.to_original(case.hr)

    def score(vol):
        return psnr(case.to_original(vol), hr)

    for key, kw in (("restorer", {}), ("oracle", {"hr": case.hr})):
        ours = first_stage_volume(vae, case.lr, window, overlap=pcfg.overlap,
                                  batch_size=pcfg.batch_size, progress=False, **kw)  # fmt: skip
        assert m[key]["psnr"] == pytest.approx(score(ours), abs=1e-3), key
    ldm = load_ldm(tiny_pipeline.vae, tiny_pipeline.diffusion, torch.device("cpu"))
    mean, _, sample = predict_volume(ldm, case.lr, pcfg, window)
    assert m["ldm"]["psnr"] == pytest.approx(score(mean), abs=1e-3)
    assert m["ldm_sample"]["psnr"] == pytest.approx(score(sample), abs=1e-3)
    written, _ = load_volume(row["output"])  # the mean, in original units
    np.testing.assert_allclose(written, case.to_original(mean), rtol=1e-5, atol=1e-4)
