from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion.latent_diffusion import SamplerConfig, load_ldm
from ldm.io import load_volume, save_volume
from ldm.phases.predict_ldm import PredictConfig, predict_volume
from tests.helpers.cli import error_line, run_script


@pytest.fixture(scope="module")
def ldm(tiny_pipeline):
    return load_ldm(tiny_pipeline.vae, tiny_pipeline.diffusion, torch.device("cpu"))


def cfg(**kw) -> PredictConfig:
    return PredictConfig(sampler=SamplerConfig(steps=3), batch_size=4, **kw)


def test_volume_not_divisible_by_window_keeps_its_shape(ldm):
    lr = np.random.default_rng(0).random((21, 18, 25)).astype(np.float32)
    mean, std = predict_volume(ldm, lr, cfg(), (16, 16, 16))
    assert mean.shape == lr.shape and std is None and np.isfinite(mean).all()


def test_eta0_is_deterministic_and_seed_matters_for_eta1(ldm):
    lr = np.random.default_rng(1).random((16, 16, 24)).astype(np.float32)
    a, _ = predict_volume(ldm, lr, cfg(), (16, 16, 16))
    b, _ = predict_volume(ldm, lr, cfg(), (16, 16, 16))
    assert np.array_equal(a, b)
    c, _ = predict_volume(ldm, lr, cfg(seed=1), (16, 16, 16))
    assert not np.array_equal(a, c)  # the seed picks the starting noise


def test_no_seams_on_constant_input_with_a_constant_window_fn(ldm, monkeypatch):
    """Blending of overlapping windows: a window function that returns a constant gives a
    constant volume (no seams at window borders)."""
    import ldm.phases.predict_ldm as predict

    monkeypatch.setattr(predict, "ldm_window_fn", lambda *a: lambda x: torch.full_like(x, 0.7))
    mean, _ = predict_volume(ldm, np.zeros((20, 30, 17), np.float32), cfg(), (16, 16, 16))
    assert np.abs(mean - 0.7).max() < 1e-6


def test_num_samples_gives_uncertainty(ldm):
    lr = np.random.default_rng(2).random((16, 16, 16)).astype(np.float32)
    mean, std = predict_volume(ldm, lr, cfg(num_samples=2), (16, 16, 16))
    assert std is not None and std.shape == lr.shape and std.max() > 0


def _predict(tp, out, *extra):
    return run_script(
        "predict_ldm", "--set", f"data_dir={tp.data_dir}", "--set", f"vae_checkpoint={tp.vae}",
        "--set", f"diffusion_checkpoint={tp.diffusion}", "--set", f"out_dir={out}",
        "--set", "sampler.steps=2", "--set", "device=cpu", *extra,
    )  # fmt: skip


def test_cli_writes_pictures_volume_and_metrics(tiny_pipeline, tmp_path):
    out = tmp_path / "pred"
    result = _predict(tiny_pipeline, out, "--set", "num_samples=2", "--set", "tune.bm4d=false")
    assert result.exit_code == 0, result.output
    for label in ("Baseline (LR)", "Gaussian filter", "Heat diffusion", "TV (Chambolle)",
                  "Non-local means", "VAE result", "LDM", "VAE ceiling (HR->HR)"):  # fmt: skip
        assert re.search(rf"^{re.escape(label)}\s+\d+\.\d\d\s", result.output, re.M), label
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    for name in ("1_input_LR.png", "2_target_HR.png", "3_output_LDM.png", "4_uncertainty.png",
                 "reverse_process.gif", "metrics.json"):  # fmt: skip
        assert (case / name).is_file(), name
    gif = Image.open(case / "reverse_process.gif")  # 6 panels: 4 decoded, 2 chain values
    first = np.asarray(gif.convert("L"), np.float32)
    gif.seek(gif.n_frames - 1)
    last = np.asarray(gif.convert("L"), np.float32)
    chain = slice(first.shape[1] * 4 // 6, None)  # x_t | predicted x_0 of the chain
    assert np.abs(first[:, chain] - last[:, chain]).mean() > 5  # noise -> the sample
    m = json.loads((case / "metrics.json").read_text())
    assert set(m["metrics"]) == {"baseline", "gaussian", "heat", "tv", "nlm", "vae_result", "ldm",
                                 "vae_ceiling"}  # fmt: skip
    assert set(m["metrics"]["ldm"]) == {"psnr", "ssim", "bias", "bias_pct", "contrast"}
    vol, meta = load_volume(m["output"])  # the phantom is written as .raw + .mhd
    assert meta.format == "raw" and vol.shape == (24, 24, 24)


def test_user_input_volume_in_its_own_format(tiny_pipeline, tmp_path):
    src = np.random.default_rng(3).random((20, 24, 16)).astype(np.float32) * 100 + 50
    affine = np.diag([0.5, 0.7, 1.2, 1.0])
    from ldm.io import VolumeMeta

    path = save_volume(tmp_path / "mine.nii.gz", src, VolumeMeta("nifti", affine=affine.tolist()))
    out = tmp_path / "pred"
    result = _predict(tiny_pipeline, out, "--input", path)
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
    result = _predict(tiny_pipeline, out, "--input", tmp_path / "tiny.npy")
    assert result.exit_code == 0, result.output
    assert np.load(out / "tiny" / "tiny_ldm.npy").shape == (4, 6, 5)
    assert (out / "tiny" / "reverse_process.gif").is_file()


def test_bad_input(tiny_pipeline, tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.float32))
    line = error_line(_predict(tiny_pipeline, tmp_path / "a", "--input", tmp_path / "flat.npy"))
    assert "must be a 3D volume" in line
    line = error_line(_predict(tiny_pipeline, tmp_path / "b", "--set", "sampler.steps=2000"))
    assert "steps 2000 > the model's 1000" in line
    line = error_line(_predict(tiny_pipeline, tmp_path / "c", "--set", "sampler.spacing=middle"))
    assert "spacing must be one of trailing, leading, linspace" in line
    line = error_line(_predict(tiny_pipeline, tmp_path / "d", "--set", "sampler.sampler=euler"))
    assert "sampler must be one of ddim, ddpm" in line
    line = error_line(_predict(tiny_pipeline, tmp_path / "e", "--set",
                               f"diffusion_checkpoint={tmp_path / 'none.pt'}"))  # fmt: skip
    assert "run train_diffusion first" in line
    line = error_line(_predict(tiny_pipeline, tmp_path / "f", "--set", "window=[12, 12, 12]"))
    assert "divisible by 8" in line


def test_vae_rows_decode_with_the_lr(tiny_pipeline, tmp_path):
    """The tiny VAE is LR-aware: its result and ceiling rows are decode(encode(LR | HR), LR)."""
    from ldm.data.dataset import iter_test_cases
    from ldm.inference import autoencode_volume
    from ldm.metrics import psnr
    from ldm.nets.loading import load_vae

    out = tmp_path / "pred"
    assert _predict(tiny_pipeline, out, "--set", "tune.bm4d=false").exit_code == 0
    vae, _ = load_vae(tiny_pipeline.vae, torch.device("cpu"))
    assert vae.config.uses_lr
    run = json.loads((out / "metrics.json").read_text())  # the layout the run used
    window, overlap = tuple(run["window"]), PredictConfig().overlap
    assert window == PredictConfig().window
    case = next(iter_test_cases(tiny_pipeline.data_dir))
    m = json.loads((out / case.name / "metrics.json").read_text())["metrics"]
    for key, volume in (("vae_result", case.lr), ("vae_ceiling", case.hr)):
        ours = autoencode_volume(vae, volume, window, overlap=overlap, batch_size=8,
                                lr=case.lr, progress=False)
        expected = psnr(case.to_original(ours), case.to_original(case.hr))
        assert m[key]["psnr"] == pytest.approx(expected, abs=1e-3), key
