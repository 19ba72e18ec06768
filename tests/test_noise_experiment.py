from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.core.errors import ConfigError
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig, load_ldm
from ldm.diffusion.schedule import DiffusionConfig, make_schedule
from ldm.nets import UNet, UNetConfig, VAEConfig
from ldm.nets.restorer import RestorerAE, RestorerAEConfig, condition_channels
from ldm.phases.ddim_similar_noise import DDIMSimilarNoiseConfig, run_experiment, window_slices
from ldm.phases.ddim_similar_noise.sweeps import (
    check_determinism,
    mix_noise,
    replace_block,
    run_sweeps,
    slerp_noise,
)
from tests.helpers.cli import error_line, run_script

FAST = ["--set", "steps=3", "--set", "mix_s=[0, 0.5, 1]", "--set", "slerp_a=[0, 1]", "--set",
        "block_edges=[0, 4]", "--set", "forward_t=[0, 999]", "--set", "device=cpu"]  # fmt: skip


def _noises(shape=(1, 4, 4, 4, 4)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.fixture(scope="module")
def tiny(tiny_pipeline):
    """The tiny real LDM, the condition (1, 2 f^3, 4, 4, 4) of one LR window and two noises."""
    model = load_ldm(tiny_pipeline.vae, tiny_pipeline.diffusion, torch.device("cpu"))
    lr = torch.rand((1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(1))
    with model.lr_context(lr) as mu:  # decode(z) = mu(LR) + D(z) of this window
        cond = model.condition(lr, mu)
        assert cond.shape == (1, 2 * 4**3, 4, 4, 4)
        yield model, cond, *_noises()


def test_noise_paths_known_values():
    n0, n1 = _noises()
    assert torch.equal(mix_noise(n0, n1, 0.0), n0) and torch.equal(mix_noise(n0, n1, 1.0), n1)
    torch.testing.assert_close(mix_noise(n0, n1, 0.6), 0.8 * n0 + 0.6 * n1)
    assert torch.equal(slerp_noise(n0, n1, 0.0), n0) and torch.equal(slerp_noise(n0, n1, 1.0), n1)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])  # orthogonal, theta = pi / 2
    torch.testing.assert_close(slerp_noise(e1, e2, 0.5), torch.tensor([[1.0, 2.0]]) / math.sqrt(2))
    block = replace_block(n0, n1, 2)
    changed = block != n0
    assert changed.sum() == 4 * 8 and changed[:, :, 1:3, 1:3, 1:3].all()  # centred 2^3 cube
    assert torch.equal(replace_block(n0, n1, 0), n0) and torch.equal(replace_block(n0, n1, 9), n1)


def test_eta0_is_deterministic_eta1_is_not(tiny):
    model, cond, n0, _ = tiny
    d = check_determinism(model, cond, n0, steps=3)
    assert d.eta0_other_seed == 0.0  # same noise, other generator: bit-identical
    assert d.eta1_other_noise > 1e-4  # fresh noise at every step changes the output
    assert d.eta1_same_seed == 0.0  # ... but a fixed seed reproduces it


def test_mixing_distance_starts_at_zero_and_grows(tiny):
    model, cond, n0, n1 = tiny
    sweeps = {"mixing": [0.0, 0.1, 0.5, 1.0], "slerp": [0.0, 1.0], "block": [0, 2, 4]}
    results, base = run_sweeps(model, cond, n0, n1, sweeps, SamplerConfig(steps=3), batch_size=3)
    mixing, slerp, block = results
    assert mixing.noise_l2[0] == 0.0 and mixing.output_l2[0] == 0.0
    assert np.all(np.diff(mixing.noise_l2) > 0)
    assert 0.0 < mixing.output_l2[1] < mixing.output_l2[-1]
    assert mixing.output_l2[1] <= mixing.output_l2[2] <= mixing.output_l2[3]
    np.testing.assert_array_equal(mixing.outputs[0], base)
    # every path ends at n1, sampled once: the same output at the end of each sweep
    assert mixing.output_l2[-1] == slerp.output_l2[-1] == block.output_l2[-1]
    assert mixing.outputs.shape == (4, 16, 16, 16) and block.noises.shape == (3, 4, 4, 4, 4)


def test_window_is_centred_and_checked():
    assert window_slices((24, 20), (8, 16), 8) == (slice(8, 16), slice(2, 18))
    with pytest.raises(ConfigError, match="window: sizes must be multiples of 8"):
        window_slices((24, 24), (12, 8), 8)
    with pytest.raises(ConfigError, match="window: expected 3 sizes"):
        window_slices((24, 24, 24), (8, 8), 8)


def test_experiment_works_for_2d_models(tmp_path):
    torch.manual_seed(0)
    cfg2d = RestorerAEConfig(
        restorer=VAEConfig(spatial_dims=2, channels=(8, 8), norm_groups=4, lr_skip=True,
                           residual=True),
        residual_ae=VAEConfig(spatial_dims=2, channels=(8, 8, 8), norm_groups=4),
    )  # fmt: skip
    vae = RestorerAE(cfg2d).eval()
    unet = UNet(UNetConfig(spatial_dims=2, channels=(8, 16), num_res_blocks=1, attention=False,
                             norm_groups=4, cond_channels=condition_channels(cfg2d)))  # fmt: skip
    unet = unet.eval()
    assert condition_channels(cfg2d) == 2 * 4**2  # (mu, LR), f = 4 in 2D
    schedule = make_schedule(DiffusionConfig(num_train_timesteps=100, prediction_type="v"))
    model = LatentDiffusion(vae, unet, schedule, 1.0, torch.device("cpu"), 0, 0)
    rng = np.random.default_rng(0)
    lr, hr = rng.random((16, 16), np.float32), rng.random((16, 16), np.float32)
    cfg = DDIMSimilarNoiseConfig(
        steps=2, mix_s=(0, 1), slerp_a=(0, 0.5, 1), block_edges=(0, 4), forward_t=(0, 99)
    )
    m = run_experiment(model, lr, hr, cfg, tmp_path)
    assert m["latent_shape"] == [4, 4, 4] and m["sweeps"]["block"]["values"] == [0, 4]
    assert set(m["files"]) <= {p.name for p in tmp_path.iterdir()}
    gif = Image.open(tmp_path / "outputs_slerp.gif")
    assert gif.n_frames == 3 and gif.size[0] >= 128  # one upscaled panel per frame in 2D
    with pytest.raises(ConfigError, match=r"forward_t: every t must be in \[0, 99\]"):
        run_experiment(model, lr, hr, DDIMSimilarNoiseConfig(forward_t=(0, 100)), tmp_path)


def test_cli_writes_the_files(tiny_pipeline, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        "ddim_similar_noise", "--set", f"data_dir={tiny_pipeline.data_dir}",
        "--set", f"vae_checkpoint={tiny_pipeline.vae}",
        "--set", f"diffusion_checkpoint={tiny_pipeline.diffusion}", "--set", f"out_dir={out}",
        *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "eta=0: same noise twice -> max |diff| = 0 (identical)" in result.output
    assert "eta=1: same start noise, different sampler noise" in result.output
    names = {p.name for p in out.iterdir()}
    for sweep in ("block", "mixing", "slerp"):
        assert {f"noise_{sweep}.gif", f"outputs_{sweep}.gif", f"diff_{sweep}.png"} <= names
    assert {"distance_plot.png", "forward_backward.png", "forward_backward_psnr.png",
            "metrics.json", "config.yaml"} <= names  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["sweeps"]["mixing"]["output_l2"][0] == 0.0 and m["window"]["size"] == [16, 16, 16]
    assert len(m["forward_backward"]["psnr_denoised"]) == 2
    fb = m["forward_backward"]  # the latent-space view: noising moves x_t away from z_HR
    assert 0 <= fb["latent_noised"][0] < 0.1 * fb["latent_noised"][1]
    assert len(fb["latent_denoised"]) == 2 and fb["latent_restorer"] > 0  # z = 0 vs z_HR
    assert set(m["reference_psnr"]) == {"LR input", "oracle mu + D(z_HR)", "restorer (z = 0)",
                                        "sample from pure noise"}  # fmt: skip
    assert "in latent space, RMS distance to the HR latent: t=0:" in result.output
    assert Image.open(out / "noise_mixing.gif").n_frames == 3


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("mix_s=[0, 1.5]", "mix_s: every value must be in [0, 1]"),
        ("slerp_a=[0]", "slerp_a: a sweep needs >= 2 points"),
        ("block_edges=[0, 5]", "block_edges: every edge must be in [0, 4]"),
        ("forward_t=[0, 1000]", "forward_t: every t must be in [0, 999]"),
        ("window=[12, 12, 12]", "window: sizes must be multiples of 8"),
        ("case=nope", "no test case 'nope'; test cases:"),
        ("diffusion_checkpoint=/nonexistent/best.pt", "run train_diffusion first"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_pipeline, tmp_path, override, expected):
    line = error_line(run_script(
        "ddim_similar_noise", "--set", f"data_dir={tiny_pipeline.data_dir}",
        "--set", f"vae_checkpoint={tiny_pipeline.vae}",
        "--set", f"diffusion_checkpoint={tiny_pipeline.diffusion}",
        "--set", f"out_dir={tmp_path / 'out'}", *FAST, "--set", override,
    ))  # fmt: skip
    assert expected in line
