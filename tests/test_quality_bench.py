"""The quality bench (ldm/tools/quality_bench.py, quality_variants.py, quality_report.py) and its
scoring (ldm/tools/quality_scoring.py) on the predict-and-refine design: the rows of a scored
volume, the variants, the tables."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ldm.core.errors import UserError
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig
from ldm.diffusion.schedule import DiffusionConfig, make_schedule
from ldm.evaluate.inference import first_stage_volume
from ldm.evaluate.quality_metrics import latent_sensitivity
from ldm.nets import UNet, UNetConfig, VAEConfig
from ldm.nets.restorer import RestorerAE, RestorerAEConfig, condition_channels
from ldm.phases.predict_ldm import PredictConfig, predict_volume
from ldm.tools.quality_scoring import (
    ORACLE,
    RESTORER,
    SHUFFLED,
    ZERO,
    bias_slope,
    ldm_label,
    method_outputs,
    predict_layout_restorer,
    score,
    shuffle_positions,
    volume_scores,
    weight_label,
)

PARAMS = {"gaussian_sigma": 0.5, "heat_steps": 1, "heat_dt": 0.1, "tv_weight": 0.05,
          "nlm_h": 0.06, "nlm_patch_size": 3, "nlm_patch_distance": 1,
          "bm4d_sigma": None}  # fmt: skip
CFG = PredictConfig(window=(16, 16, 16), overlap=0.0, batch_size=4,
                    sampler=SamplerConfig(steps=2))  # fmt: skip


def tiny_first_stage() -> RestorerAE:
    torch.manual_seed(0)
    cfg = RestorerAEConfig(
        restorer=VAEConfig(channels=(4, 4), norm_groups=2, latent_channels=2, lr_skip=True,
                           residual=True),
        residual_ae=VAEConfig(channels=(4, 4), norm_groups=2, latent_channels=2),
    )  # fmt: skip
    vae = RestorerAE(cfg)
    for p in vae.parameters():  # zero-initialised output convs: make every path act
        torch.nn.init.normal_(p, std=0.1)
    return vae.eval()


def tiny_ldm() -> LatentDiffusion:
    vae = tiny_first_stage()
    c = vae.config.latent_channels
    unet = UNet(UNetConfig(in_channels=c, out_channels=c, cond_channels=condition_channels(
        vae.config), channels=(8, 8), num_res_blocks=1, num_heads=2, norm_groups=4))  # fmt: skip
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    schedule = make_schedule(DiffusionConfig(num_train_timesteps=100))
    return LatentDiffusion(vae, unet.eval(), schedule, 1.0, torch.device("cpu"), 0, 0)


def volumes(shape=(14, 12, 12)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    hr = rng.random(shape).astype(np.float32)
    return (hr + 0.2 * rng.standard_normal(shape)).astype(np.float32), hr


def test_every_row_of_a_scored_volume():
    # 14 x 12 x 12 is smaller than the window: the first stage runs it as one 14 x 12 x 12
    # window (its multiple 2), predict_volume as 16 x 12 x 12 (multiple 4): two layouts, two mu
    ldm, (x, xh) = tiny_ldm(), volumes()
    outs, seconds, extra = method_outputs(ldm, x, xh, PARAMS, CFG, CFG.window)
    assert list(outs) == [
        "Gaussian (tuned)", "heat (tuned)", "TV (tuned)", "NLM (tuned)", RESTORER, ORACLE, ZERO,
        SHUFFLED, "LDM one sample", "LDM mean of 2", "LDM mean of 4", "LDM mean of 8",
        "w = 0", "w = 0.5", "w = 1"]  # fmt: skip
    assert all(v.shape == x.shape and np.isfinite(v).all() for v in outs.values())
    assert set(seconds) == {RESTORER, *(ldm_label(n) for n in (1, 2, 4, 8)),
                            *(weight_label(w) for w in (0, 0.5, 1))}  # fmt: skip
    # Restorer and Oracle are first_stage_volume's; each LDM row is predict_volume's for its N
    assert np.array_equal(outs[RESTORER], first_stage_volume(ldm.vae, x, CFG.window,
                                                             progress=False))  # fmt: skip
    assert np.array_equal(outs[ORACLE], first_stage_volume(ldm.vae, x, CFG.window, hr=xh,
                                                           progress=False))  # fmt: skip
    for n in (1, 8):
        want = predict_volume(ldm, x, replace(CFG, num_samples=n), CFG.window)[0]
        assert np.allclose(outs[ldm_label(n)], want, atol=1e-6)
    assert not np.allclose(outs["LDM one sample"], outs["LDM mean of 8"], atol=1e-4)
    # the w rows are predict_ldm's mean of 8 at that detail_weight (exact: linear in w)
    for w in (0.0, 0.5):
        want = predict_volume(ldm, x, replace(CFG, detail_weight=w), CFG.window)[0]
        assert np.allclose(outs[weight_label(w)], want, atol=1e-5)
    assert np.allclose(outs["w = 1"], outs["LDM mean of 8"], atol=1e-6)
    assert np.allclose(extra["mu"], predict_layout_restorer(ldm, x, CFG, CFG.window))
    assert not np.allclose(extra["mu"], outs[RESTORER], atol=1e-4)  # the two layouts differ
    assert extra["std"].shape == x.shape and (extra["std"] >= 0).all()
    # the latent probes differ from the oracle only in the latent
    for row in (ZERO, SHUFFLED):
        assert not np.allclose(outs[row], outs[ORACLE], atol=1e-4)


def test_z_zero_and_shuffled_z_are_decoded_probes_of_the_oracle_latent():
    vae, (x, xh) = tiny_first_stage(), volumes((16, 16, 16))
    outs, _, _ = method_outputs(tiny_ldm(), x, xh, PARAMS, CFG, CFG.window, counts=(1,))
    vae = tiny_ldm().vae
    with torch.no_grad():
        lr, hr = (torch.from_numpy(v)[None, None] for v in (x, xh))
        mu = vae.restore(lr)
        z = vae.encode(hr - mu)[0]
        zero = (mu + vae.decode(torch.zeros_like(z)))[0, 0].numpy()
        shuffled = shuffle_positions(z, torch.Generator().manual_seed(CFG.seed))
        probe = (mu + vae.decode(shuffled))[0, 0].numpy()
    assert np.allclose(outs[ZERO], zero, atol=1e-5)  # one window: no blending
    assert np.allclose(outs[SHUFFLED], probe, atol=1e-5)


def test_shuffle_positions_moves_whole_latent_vectors():
    z = torch.randn(2, 3, 4, 4, 4)
    s = shuffle_positions(z, torch.Generator().manual_seed(0))
    assert s.shape == z.shape and not torch.equal(s, z)
    for i in range(2):  # the same set of C-vectors, in other places
        a = z[i].reshape(3, -1).T.tolist()
        b = s[i].reshape(3, -1).T.tolist()
        assert sorted(a) == sorted(b)
    again = shuffle_positions(z, torch.Generator().manual_seed(0))
    assert torch.equal(s, again)


def test_volume_scores_add_seconds_calibration_and_latent_sensitivity():
    ldm, (x, xh) = tiny_ldm(), volumes()
    outs, seconds, extra = method_outputs(ldm, x, xh, PARAMS, CFG, CFG.window)
    outs = {"Baseline": x, **outs}
    rows = volume_scores(outs, seconds, extra, xh, lambda v: 2.0 * v + 1.0, top=8)
    for label, row in rows.items():
        assert {"psnr", "ssim", "esr", "hfer", "fsc", "bias_pct", "contrast_pct"} <= set(row)
        assert ("seconds" in row) == (label in seconds)
    assert {"var_err_ratio", "ause", "ause_random"} <= set(rows["LDM mean of 8"])
    assert "var_err_ratio" not in rows["LDM mean of 4"]
    # S = ||D(z_HR) - D(z_sample)||^2 / ||HR - mu||^2 with each D taken against its own mu
    d_hr = outs[ORACLE] - outs[RESTORER]
    d_sample = outs["LDM one sample"] - extra["mu"]
    want = np.sum((d_hr - d_sample) ** 2, dtype=np.float64) / np.sum(
        (xh - outs[RESTORER]) ** 2, dtype=np.float64)  # fmt: skip
    s = rows["LDM one sample"]["latent_sensitivity"]
    assert s == pytest.approx(want, rel=1e-4)
    assert s == pytest.approx(latent_sensitivity(outs[ORACLE], outs[RESTORER] + d_sample, xh,
                                                 outs[RESTORER]))  # fmt: skip


def test_a_first_stage_alone_gets_the_filters_and_the_restorer():
    (x, xh) = volumes()
    outs, seconds, extra = method_outputs(tiny_first_stage(), x, xh, PARAMS, CFG, CFG.window)
    assert list(outs)[-1] == RESTORER and ORACLE not in outs and not extra
    assert set(seconds) == {RESTORER}


def test_score_in_original_units_with_sharpness():
    hr = np.linspace(0, 1, 12**3).reshape(12, 12, 12) + np.random.default_rng(0).random(
        (12, 12, 12))  # fmt: skip
    s = score(hr + 0.1, hr)
    assert s["bias_pct"] == pytest.approx(100 * 0.1 / float(hr.max() - hr.min()))
    assert s["contrast_pct"] == pytest.approx(0.0, abs=1e-6)
    assert s["esr"] == pytest.approx(1.0) and s["hfer"] == pytest.approx(1.0)
    # HR without energy above the cutoff: its HFER is undefined, NaN instead of an error
    smooth = 2.0 + np.cos(2 * np.pi * 2 * np.arange(12) / 12)[:, None, None] * np.ones((12, 12))
    s = score(smooth + 0.1, smooth)
    assert np.isnan(s["hfer"]) and np.isfinite(s["psnr"])
    bias, contrast = bias_slope(1.1 * hr + 0.5, hr)
    assert contrast == pytest.approx(10.0)


# --------------------------------------------------------------------------- the bench


def test_every_variant_fits_the_demo_configs():
    from ldm.tools.quality_variants import NO_DIFFUSION, VARIANTS, variant_configs

    assert set(NO_DIFFUSION) <= set(VARIANTS) and "default" in VARIANTS
    for v in VARIANTS:
        vae, diffusion = variant_configs(v)
        RestorerAE(vae.model)  # builds
    reg = variant_configs("regression")[0].model.residual_ae
    default = variant_configs("default")[0].model
    assert sum(reg.channels) < sum(default.residual_ae.channels)  # the autoencoder is tiny


def test_a_stale_variant_key_is_one_error_line_before_any_work(tmp_path, capsys, monkeypatch):
    from ldm.tools import quality_bench, quality_variants

    monkeypatch.setitem(quality_variants.VARIANTS, "old", ["model.lr_skip=true"])
    with pytest.raises(SystemExit) as e:
        quality_bench.main(["--variants", "old", "--work", str(tmp_path / "w"), "--out",
                            str(tmp_path / "q.json")])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: variant old: ") and "lr_skip" in err[0]
    assert not (tmp_path / "w").exists()


def test_bad_names_stop_before_any_training(tmp_path, capsys) -> None:
    from ldm.tools import quality_bench

    cases = [(["--datasets", "phantom,foo"], "unknown dataset foo; choose from phantom, mri"),
             (["--variants", "defualt"], "unknown variant defualt; choose from default"),
             (["--vae-minutes", "0"], "budgets must be > 0 minutes")]  # fmt: skip
    for args, expected in cases:
        with pytest.raises(SystemExit) as e:
            quality_bench.main([*args, "--work", str(tmp_path / "w"), "--out",
                                str(tmp_path / "q.json")])  # fmt: skip
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "w").exists() and not (tmp_path / "q.json").exists()


def _rows(hr: np.ndarray) -> dict:
    rows = {"Baseline": score(hr + 0.1, hr), RESTORER: {**score(hr, hr * 0.9), "seconds": 0.5},
            "LDM one sample": {**score(hr, hr * 0.95), "seconds": 2.0,
                               "latent_sensitivity": 0.25},
            "LDM mean of 8": {**score(hr, hr * 0.97), "seconds": 8.0, "var_err_ratio": 0.7,
                              "ause": 0.1, "ause_random": 0.5}}  # fmt: skip
    return rows


def test_one_table_per_dataset_with_every_row(tmp_path):
    from ldm.tools.quality_report import combine, format_table, summary_table

    hr = np.random.default_rng(0).random((12, 12, 12))
    row = _rows(hr)
    base = {"train_minutes": 2.0, "train_cpu_minutes": 1.0, "steps": {"vae": 3, "diffusion": 4},
            "params": {"restorer": 1000, "residual_ae": 2000, "unet": 3000}, "num_test": 1}
    reg = {**base, "steps": {"vae": 7}, "scores": {"test": {RESTORER: row[RESTORER]}}}
    parts = []
    for name, result in [("phantom", {"phantom/default": {**base, "scores": {"test": row}},
                                      "phantom/regression": reg}),
                         ("mri", {"mri/default": {**base, "scores": {
                             "test": row, "voxel 0.7 mm": row}}})]:  # fmt: skip
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps({"results": result}))
    report = combine(parts, tmp_path / "all.json")
    assert set(report["results"]) == {"phantom/default", "phantom/regression", "mri/default"}
    text = format_table(report)
    assert summary_table(report) == text
    assert text.count("== phantom ==") == 1 and text.count("== mri ==") == 1
    header = next(x for x in text.splitlines() if x.startswith("variant  "))
    for col in ("PSNR", "SSIM", "ESR", "HFER", "FSC hi", "bias %", "contrast %", "predict s"):
        assert col in header
    assert "regression (1 test volume): train" in text and "steps vae 7" in text
    assert "var/err 0.700" in text and "S 0.250 (LDM one sample)" in text
    assert "voxel 0.7 mm" in text and "generalisation PSNR" in text
    phantom = text.split("== mri ==")[0]
    assert phantom.count("LDM mean of 8") >= 2 and phantom.count(RESTORER) == 2


def test_profile_generalisation_needs_the_profile_run(tmp_path, monkeypatch):
    from ldm.tools.quality_bench import profile_generalisation

    monkeypatch.chdir(tmp_path)  # configs/mri's dataset/mri does not exist here
    with pytest.raises(UserError, match="run scripts/run_all.py --profile mri first"):
        profile_generalisation("mri")


def test_evaluate_scores_the_trained_pipeline(tiny_pipeline):
    """End to end on the tiny checkpoints: every row of the test setting, then the first stage
    alone (the regression variant) and a --resample generalisation case."""
    from ldm.tools.quality_scoring import classical_params, evaluate, generalisation_cases

    params = classical_params(tiny_pipeline.data_dir, with_bm4d=False)
    cfg = replace(CFG, sampler=SamplerConfig(steps=2))
    resample = [c for c in generalisation_cases(tiny_pipeline.data_dir, 1)
                if c[0] == "voxel 1.4 mm --resample"]  # fmt: skip
    ev = evaluate(tiny_pipeline.data_dir, tiny_pipeline.vae, tiny_pipeline.diffusion, params,
                  resample, cfg, counts=(1, 2))  # fmt: skip
    test = ev["scores"]["test"]
    assert ev["num_test"] >= 1 and ev["num_samples"] == [1, 2]
    assert [m for m in test if m not in ("Baseline",) and "tuned" not in m] == [
        RESTORER, ORACLE, ZERO, SHUFFLED, "LDM one sample", "LDM mean of 2", "w = 0", "w = 0.5",
        "w = 1"]  # fmt: skip
    assert "var_err_ratio" in test["LDM mean of 2"]
    assert "latent_sensitivity" in test["LDM one sample"]
    assert np.isfinite(test["w = 0.5"]["psnr"]) and test["LDM mean of 2"]["seconds"] > 0
    assert set(ev["scores"]) == {"test", "voxel 1.4 mm --resample"}
    alone = evaluate(tiny_pipeline.data_dir, tiny_pipeline.vae, None, params, False, cfg)
    assert list(alone["scores"]["test"])[-1] == RESTORER and alone["num_samples"] == []


def test_larger_smoother_anatomy_case_keeps_the_grid_and_blurs_the_structures(tiny_pipeline):
    """The generalisation case of another anatomy: the test block's shape and voxel grid (so
    --resample cannot undo it), structures smoother (less energy above 0.25 cycles/voxel)."""
    from ldm.data.dataset import iter_test_cases
    from ldm.evaluate.quality_metrics import high_frequency_energy_ratio
    from ldm.tools.quality_scoring import generalisation_cases

    (big,) = [c for c in generalisation_cases(tiny_pipeline.data_dir, 1)
              if c[0] == "anatomy x1.5, smoother"]  # fmt: skip
    _, name, lr, hr, grid = big
    case = next(iter(iter_test_cases(tiny_pipeline.data_dir)))
    assert name == case.name and grid is None and hr.shape == lr.shape == case.hr.shape
    assert np.isfinite(lr).all() and not np.allclose(lr, hr)  # degraded as in training
    assert high_frequency_energy_ratio(hr, case.to_original(case.hr), 0.25) < 0.5
