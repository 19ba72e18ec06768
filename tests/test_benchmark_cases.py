"""The benchmark's cases (ldm/tools/benchmark.py, ldm/tools/bench_monai.py) build the
predict-and-refine networks with the channels train_diffusion gives them, on the demo-sized configs
(fast)."""

from __future__ import annotations

import pytest
import torch

import ldm.tools.bench_monai as bench_monai
import ldm.tools.benchmark as benchmark
from ldm.core.config import REPO_ROOT

DEMO = REPO_ROOT / "configs" / "demo"
CPU = torch.device("cpu")


@pytest.fixture
def demo_configs(monkeypatch):
    """The cases read configs/*.yaml; here the demo ones (same keys, smaller and faster)."""
    configs = bench_monai.model_configs

    monkeypatch.setattr(benchmark, "model_configs", lambda folder=None: configs(DEMO))
    monkeypatch.setattr(bench_monai, "model_configs", lambda folder=None: configs(DEMO))


def test_model_configs_give_the_unet_the_latent_and_condition_channels():
    bench_monai.model_configs()  # configs/*.yaml, what the benchmark reads, load
    vae, diffusion = bench_monai.model_configs(DEMO)
    f, c = vae.model.downsample_factor, vae.model.latent_channels
    unet = diffusion.model
    assert (unet.in_channels, unet.out_channels, unet.cond_channels) == (c, c, 2 * f**3)
    assert bench_monai.latent_patch(vae) == tuple(s // f for s in bench_monai.PATCH)


def test_cases_run_on_the_restorer_design(demo_configs):
    from ldm.diffusion.latent_diffusion import SamplerConfig

    ldm = benchmark._random_ldm(CPU)
    out = ldm.refine(torch.rand(1, 1, 32, 32, 32), SamplerConfig(steps=1), num_samples=2)
    assert out.shape == (1, 3, 32, 32, 32)
    r = benchmark.vae_train(CPU, reps=1)
    assert r["step_s"] > 0 and r["batch_pairs"] >= 1
    assert benchmark.unet_train(CPU, reps=1)["step_s"] > 0
    r = benchmark.sliding_window(CPU, size=32)
    assert r["seconds"] > 0
    r = benchmark.predict_128(CPU, steps=1, size=32)
    assert r["num_samples"] == benchmark.default_num_samples() and r["seconds"] > 0


def test_the_mri_profile_case_times_the_profiles_own_nets_and_configs():
    mri = benchmark._random_ldm(CPU, "mri")  # configs/mri: 16 latent channels
    assert mri.vae.config.latent_channels == 16 and mri.unet.config.in_channels == 16
    r = benchmark.predict_mri_profile(CPU, size=32)
    assert r["profile"] == "mri" and r["size"] == 32 and r["seconds"] > 0
    assert r["num_samples"] == 8 and r["ddim_steps"] == 5  # configs/mri/predict_ldm.yaml


def test_predict_vs_bm4d_reports_the_predict_time_without_bm4d(monkeypatch):
    import ldm.evaluate.classical

    monkeypatch.setattr(benchmark, "predict_128",
                        lambda device, steps, size: {"size": size, "seconds": 3.0})  # fmt: skip
    monkeypatch.setattr(ldm.evaluate.classical, "bm4d_available", lambda: False)
    r = benchmark.predict_vs_bm4d(CPU, size=128, bm4d_size=32)
    assert r["seconds"] == 3.0 and "not installed" in r["bm4d_skipped"]
    assert "bm4d_ratio" not in r


def test_our_vae_and_unet_of_the_monai_comparison(demo_configs):
    vae, diffusion = bench_monai.model_configs(DEMO)
    net, loss, b = bench_monai.build("vae", "ours")
    assert net.config == vae.model.residual_ae and b == vae.train.batch_size
    assert torch.isfinite(loss(net))
    net, loss, b = bench_monai.build("unet", "ours")
    assert net.config.cond_channels == diffusion.model.cond_channels
    assert torch.isfinite(loss(net))


def test_dataset_scaling_case_runs_in_a_tiny_setting():
    """ldm/tools/bench_dataset.py: prepare_data and prepare_latents in child processes on tiny
    phantom cubes, with a tiny untrained first stage; the row the disk target reads."""
    from ldm.tools import bench_dataset, bench_targets

    assert benchmark.CASES["dataset_scaling"] is bench_dataset.dataset_scaling
    r = bench_dataset.dataset_scaling(CPU, sizes=(24, 24, 24, 32), patch=16, stride=4,
                                      first_stage="tiny")  # fmt: skip
    for phase in ("prepare_data", "prepare_latents"):
        assert r[phase]["seconds"] > 0 and r[phase]["peak_rss_mb"] > 50  # python + torch
    assert r["source_mb"] > 0 and r["dataset_mb"] > 0 and r["latents_mb"] > 0
    assert sum(r["patches"].values()) > 0 and r["per_patch_latents_mb"] > r["latents_mb"]
    assert r["disk_ratio"] == bench_dataset.disk_ratio(r) <= 2.0
    check = next(c for c in bench_targets.check_targets([{"case": "dataset_scaling", **r}])
                 if c["figure"].startswith("dataset + latents"))  # fmt: skip
    assert check["met"] is True
    assert "x 24^3" in bench_targets.describe("dataset_scaling", r)
