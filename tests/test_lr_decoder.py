"""The LR-aware VAE decoder (lr_skip / residual), its two-path training, the LDM inference path
that feeds it the LR, the start from the noised LR latent, augmentation and the bench metrics."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from ldm.config import config_from_dict
from ldm.data.dataset import AugmentConfig, augment_pair
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig
from ldm.diffusion.schedule import DiffusionConfig, make_schedule
from ldm.errors import ConfigError, UserError
from ldm.inference import autoencode_volume
from ldm.nets import UNet3d, UNetConfig, VAE3d, VAEConfig
from ldm.phases.train_vae_pair import TrainVAEConfig, VAEPairTask
from ldm.quality_scoring import bias_slope


def tiny_vae(**kw) -> VAE3d:
    torch.manual_seed(0)
    return VAE3d(VAEConfig(channels=(4, 4, 4), norm_groups=2, **kw)).eval()


def tiny_ldm(vae: VAE3d) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = UNet3d(UNetConfig(channels=(8, 8), num_res_blocks=1, num_heads=2, norm_groups=4))
    for p in unet.parameters():  # the UNet's output conv is zero-initialised: make it act
        torch.nn.init.normal_(p, std=0.05)
    schedule = make_schedule(DiffusionConfig(num_train_timesteps=100))
    return LatentDiffusion(vae, unet.eval(), schedule, 1.0, torch.device("cpu"), 0, 0)


class DecodeSpy:
    """Wraps ``vae.decode`` and records the LR image of every call."""

    def __init__(self, vae: VAE3d) -> None:
        self.inner, self.lrs = vae.decode, []
        vae.decode = self

    def __call__(self, z, lr=None):
        self.lrs.append(lr)
        return self.inner(z, lr)


@pytest.mark.parametrize("kw", [dict(lr_skip=True), dict(residual=True),
                                dict(lr_skip=True, residual=True)])  # fmt: skip
def test_lr_aware_decode_shapes_and_uses_the_lr(kw):
    vae = tiny_vae(**kw)
    x = torch.rand(2, 1, 8, 8, 16)
    recon, mu, _ = vae(x, sample=False)
    assert recon.shape == x.shape and mu.shape == (2, 4, 2, 2, 4)
    with torch.no_grad():
        a, b = vae.decode(mu, x), vae.decode(mu, torch.zeros_like(x))
        c = vae.decode(mu + 1.0, x)
    assert (a - b).abs().max() > 1e-3  # the LR path reaches the output
    assert (a - c).abs().max() > 1e-3  # ... and so does the latent
    with pytest.raises(UserError, match="pass lr"):
        vae.decode(mu)
    with pytest.raises(UserError, match="does not match"):
        vae.decode(mu, x[..., :8])


def test_residual_adds_the_lr():
    vae = tiny_vae(residual=True)
    torch.nn.init.zeros_(vae.decoder.conv_out.weight)
    torch.nn.init.zeros_(vae.decoder.conv_out.bias)
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(x)[0], x), x)


def test_plain_vae_and_old_checkpoint_configs_are_unchanged():
    old = {
        k: v
        for k, v in asdict(VAEConfig(channels=(4, 4), norm_groups=2)).items()
        if k not in ("lr_skip", "residual")
    }  # a model_config written before these keys
    cfg = config_from_dict(VAEConfig, old, "old checkpoint")
    assert not cfg.lr_skip and not cfg.residual and not cfg.uses_lr
    plain = VAE3d(cfg)
    assert not any(k.startswith(("lr_encoder", "decoder.fuse")) for k in plain.state_dict())
    x = torch.rand(1, 1, 8, 8, 8)
    mu = plain.encode(x)[0]
    assert torch.equal(plain.decode(mu), plain.decode(mu, x))  # the LR is ignored
    skip = VAE3d(VAEConfig(channels=(4, 4), norm_groups=2, lr_skip=True))
    assert any(k.startswith("lr_encoder") for k in skip.state_dict())
    with pytest.raises(UserError, match="lr_skip"):
        VAEConfig(lr_skip="yes")


def test_training_decodes_both_latents_with_the_lr_and_reports_decode_zero():
    vae = tiny_vae(lr_skip=True, residual=True).train()
    lr, hr = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    task = VAEPairTask(TrainVAEConfig(grad_weight=0.5), [(lr[i], hr[i]) for i in range(2)],
                       torch.device("cpu"))  # fmt: skip
    spy = DecodeSpy(vae)
    loss, logs = task.loss(vae, (lr, hr), torch.Generator().manual_seed(0))
    # one decode of [z_LR, z_HR] with [LR, LR]: the ceiling path decode(z_HR, LR) is trained
    assert len(spy.lrs) == 1 and torch.equal(spy.lrs[0], torch.cat([lr, lr]))
    loss.backward()
    assert vae.lr_encoder.stem.weight.grad.abs().sum() > 0
    assert vae.encoder.stem.weight.grad.abs().sum() > 0
    v = task.validate(vae.eval())
    assert {"psnr", "hr_psnr", "zero_latent_psnr"} <= set(v)


def test_ldm_inference_passes_the_lr_to_the_decoder():
    ldm = tiny_ldm(tiny_vae(lr_skip=True, residual=True))
    spy = DecodeSpy(ldm.vae)
    lr = torch.rand(2, 1, 16, 16, 16)
    out = ldm.denoise(lr, SamplerConfig(steps=2), torch.Generator().manual_seed(0))
    assert out.shape == lr.shape and torch.equal(spy.lrs[-1], lr)
    vol = np.random.default_rng(0).random((16, 16, 24)).astype(np.float32)
    autoencode_volume(ldm.vae, vol, (16, 16, 16), progress=False)
    assert spy.lrs[-1].shape == (2, 1, 16, 16, 16)  # the windows of the volume itself
    z = torch.zeros(3, 4, 4, 4, 4)
    with ldm.lr_context(lr[:1]):  # one window, many latents (ddim_similar_noise)
        assert ldm.decode(z).shape == (3, 1, 16, 16, 16)
    with pytest.raises(UserError, match="pass lr"):
        ldm.decode(z)


def test_predict_window_fn_goes_through_denoise(monkeypatch):
    from ldm.phases.predict_ldm import ldm_window_fn

    ldm = tiny_ldm(tiny_vae(lr_skip=True))
    seen = []
    monkeypatch.setattr(LatentDiffusion, "denoise", lambda self, lr, s, g: seen.append(lr) or lr)
    lr = torch.rand(1, 1, 16, 16, 16)
    ldm_window_fn(ldm, SamplerConfig(steps=2), torch.Generator())(lr)
    assert len(seen) == 1 and torch.equal(seen[0], lr)


def test_start_from_the_noised_lr_latent():
    ldm = tiny_ldm(tiny_vae(lr_skip=True))
    cond = torch.randn(1, 4, 4, 4, 4)
    s = SamplerConfig(steps=3, init="cond", t_start=20)
    x, t = ldm.initial_latent(cond, s, torch.Generator().manual_seed(0))
    abar = float(ldm.schedule.alphas_cumprod[20])
    eps = (x - abar**0.5 * cond) / (1 - abar) ** 0.5
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(0))
    assert t == 20 and torch.allclose(eps, noise, atol=1e-5)
    seen = []
    ldm.sample(cond, x, s, callback=lambda d: seen.append(int(d["t"])), t_start=t)
    assert seen[0] == 20 and len(seen) == 3
    with pytest.raises(ConfigError, match="t_start"):
        SamplerConfig(init="cond")
    with pytest.raises(ConfigError, match="t_start"):
        ldm.initial_latent(cond, SamplerConfig(init="cond", t_start=100), None)


def test_augmentation_is_the_same_on_lr_and_hr_and_seeded():
    lr = torch.rand(4, 1, 6, 6, 6)
    cfg = AugmentConfig(flips=True, permute=True, scale=0.5, shift=0.2)
    a_lr, a_hr = augment_pair(lr, lr.clone(), cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a_lr, a_hr) and not torch.allclose(a_lr, lr)
    b_lr, _ = augment_pair(lr, lr.clone(), cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a_lr, b_lr)
    f_lr, _ = augment_pair(lr, lr, AugmentConfig(flips=True, permute=True),
                           torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(f_lr.flatten(1).sort(1).values, lr.flatten(1).sort(1).values)
    assert augment_pair(lr, lr, AugmentConfig(), torch.Generator())[0] is lr


def test_bias_and_contrast_slope():
    hr = np.linspace(0, 10, 1000)
    bias, contrast = bias_slope(1.1 * hr + 0.5, hr)
    assert contrast == pytest.approx(10.0) and bias == pytest.approx(100 * (0.5 + 0.5) / 10)


def test_quality_case_runs_only_when_asked(monkeypatch, tmp_path):
    from ldm import benchmark

    ran = []
    monkeypatch.setattr(
        benchmark,
        "run_in_child",
        lambda name, dev, threads, **kw: ran.append(name) or {"error": "not run"},
    )
    benchmark.run_plan("cpu", 1, "quality", tmp_path / "b.json", echo=lambda *a: None)
    assert ran == ["quality"] and "quality" in benchmark.CASES
    ran.clear()
    monkeypatch.setattr(benchmark, "PLAN", [("vae_train", {})])
    benchmark.run_plan("cpu", 1, "", tmp_path / "b.json", echo=lambda *a: None)
    assert ran == ["vae_train"]


def test_bench_report_combines_and_tabulates(tmp_path):
    from ldm.quality_bench import combine, summary_table
    from ldm.quality_scoring import score

    hr = np.linspace(0, 1, 12**3).reshape(12, 12, 12)
    row = {"Baseline": score(hr + 0.1, hr), "LDM (noise, 20 steps)": score(hr, hr)}
    assert row["Baseline"]["bias_pct"] == pytest.approx(10.0)
    base = {
        "train_minutes": 2.0,
        "train_cpu_minutes": 1.0,
        "steps": {"vae": 3},
        "num_test": 1,
        "predict_seconds": {"LDM (noise, 20 steps)": 4.0},
    }
    parts = []
    for name, scores in [("phantom/a", {"test": row}),
                         ("mri/a", {"test": row, "voxel 0.7 mm": row})]:  # fmt: skip
        parts.append(tmp_path / f"{name.split('/')[0]}.json")
        parts[-1].write_text(json.dumps({"results": {name: {**base, "scores": scores}}}))
    report = combine(parts, tmp_path / "all.json")
    assert set(report["results"]) == {"phantom/a", "mri/a"}
    text = summary_table(report)
    assert "voxel 0.7 mm" in text and "predict 4 s" in text and text.count("Baseline") == 3


def test_quality_bench_baselines_are_the_phases_tuned_filters(tiny_pipeline):
    """The bench tunes and runs the same baselines as evaluate_psnr/predict_ldm (ldm.baselines)."""
    from ldm.data.dataset import iter_test_cases
    from ldm.quality_scoring import classical_outputs, classical_params

    params = classical_params(tiny_pipeline.data_dir, with_bm4d=False)
    assert params["bm4d_sigma"] is None and params["gaussian_sigma"] >= 0
    lr = next(iter_test_cases(tiny_pipeline.data_dir)).lr
    out = classical_outputs(lr, params)
    assert list(out) == ["Gaussian (tuned)", "heat (tuned)", "TV (tuned)", "NLM (tuned)"]
    assert all(v.shape == lr.shape and np.isfinite(v).all() for v in out.values())


def test_profile_generalisation_needs_the_profile_run(tmp_path, monkeypatch):
    from ldm.quality_bench import profile_generalisation

    monkeypatch.chdir(tmp_path)  # configs/mri's dataset/mri does not exist here
    with pytest.raises(UserError, match="run scripts/run_all.py --profile mri first"):
        profile_generalisation("mri")


def test_generalisation_cases_use_the_given_degradation(tiny_pipeline):
    """Each test case gives 6 settings; the noise follows the given preset and data range."""
    from ldm.data.degrade import DegradeConfig
    from ldm.quality_scoring import generalisation_cases

    deg = DegradeConfig(blur_sigma=(0, 0, 0), downsample=(1, 1, 1), noise="gaussian",
                        noise_sigma=0.1)  # fmt: skip
    small = generalisation_cases(tiny_pipeline.data_dir, 1, deg, data_range=1.0)
    large = generalisation_cases(tiny_pipeline.data_dir, 1, deg, data_range=3.0)
    assert [c[0] for c in small] == [
        "voxel 0.7 mm", "voxel 0.7 mm --resample", "voxel 1.4 mm", "voxel 1.4 mm --resample",
        "intensity x0.5 + 10% max", "intensity x2.0 + 10% max"]  # fmt: skip
    noise = [float(np.std(c[2] - c[3])) for c in (small[0], large[0])]
    assert noise[0] == pytest.approx(0.1, rel=0.1) and noise[1] == pytest.approx(0.3, rel=0.1)


def test_quality_bench_bad_names_stop_before_any_training(tmp_path, capsys) -> None:
    # a run trains for tens of minutes: a typo'd dataset (was taken for mri) or variant (was a
    # KeyError) is one error line and exit 2, with nothing prepared
    from ldm import quality_bench

    cases = [(["--datasets", "phantom,foo"], "unknown dataset foo; choose from phantom, mri"),
             (["--variants", "lr_skip+residul"], "unknown variant lr_skip+residul; choose from"),
             (["--vae-minutes", "0"], "budgets must be > 0 minutes")]  # fmt: skip
    for args, expected in cases:
        with pytest.raises(SystemExit) as e:
            quality_bench.main([*args, "--work", str(tmp_path / "w"), "--out",
                                str(tmp_path / "q.json")])  # fmt: skip
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "w").exists() and not (tmp_path / "q.json").exists()
