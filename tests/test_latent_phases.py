from __future__ import annotations

import json

import numpy as np
import pytest

from ldm.checkpoint import load_checkpoint
from ldm.data.latents import LatentPairs, load_latents_meta
from ldm.diffusion.latent_diffusion import load_ldm
from ldm.errors import CheckpointError, DataError
from tests.helpers.cli import error_line, run_script


def test_latents_meta_and_shapes(tiny_pipeline):
    lat = tiny_pipeline.data_dir / "latents"
    meta = json.loads((lat / "meta.json").read_text())
    assert meta["latent_shape"] == [4, 4, 4, 4]  # 16^3 patches, f = 4
    hr = np.load(lat / "train" / "hr.npy")
    assert meta["scale_factor"] == pytest.approx(1 / hr.std(), rel=1e-5)
    pairs = LatentPairs(lat, "train", meta["scale_factor"])
    assert float(pairs[0][1].std()) > 0 and len(pairs) == meta["counts"]["train"]
    assert meta["vae"]["step"] == load_checkpoint(tiny_pipeline.vae, "vae")["step"]


def test_latents_of_another_vae_are_refused(tiny_pipeline, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_pipeline.vae.read_bytes() + b"x")  # any different file
    with pytest.raises(DataError, match="latents were made by another VAE checkpoint"):
        load_latents_meta(tiny_pipeline.data_dir / "latents", other)
    line = error_line(run_script(
        "train_diffusion", "--set", f"data_dir={tiny_pipeline.data_dir}",
        "--set", f"vae_checkpoint={tiny_pipeline.vae.parent / 'last.pt'}",
        "--set", f"out_dir={tmp_path / 'd'}",
    ))  # fmt: skip
    assert "latents were made by another VAE checkpoint" in line and "last.pt" in line


def test_missing_latents_say_run_prepare_latents(tiny_pipeline, tmp_path):
    line = error_line(run_script(
        "train_diffusion", "--set", f"data_dir={tiny_pipeline.data_dir}",
        "--set", f"latents_dir={tmp_path / 'none'}", "--set", f"vae_checkpoint={tiny_pipeline.vae}",
    ))  # fmt: skip
    assert "run prepare_latents first" in line


def test_missing_vae_checkpoint_for_latents(tiny_pipeline, tmp_path):
    line = error_line(run_script(
        "prepare_latents", "--set", f"data_dir={tiny_pipeline.data_dir}",
        "--set", f"vae_checkpoint={tmp_path / 'nope.pt'}", "--set", f"out_dir={tmp_path / 'l'}",
    ))  # fmt: skip
    assert "run train_vae_pair first" in line


def test_diffusion_checkpoint_holds_schedule_scale_and_vae(tiny_pipeline):
    ldm = load_ldm(tiny_pipeline.vae, tiny_pipeline.diffusion, "cpu")
    assert ldm.schedule.num_train_timesteps == 1000 and ldm.scale > 0 and ldm.factor == 4


def test_ldm_refuses_a_vae_it_was_not_trained_on(tiny_pipeline, tmp_path):
    other = tmp_path / "vae.pt"
    other.write_bytes(tiny_pipeline.vae.read_bytes())
    state = load_checkpoint(other, "vae")
    state["step"] += 1
    import torch

    torch.save(state, other)
    with pytest.raises(CheckpointError, match="trained on latents of another VAE checkpoint"):
        load_ldm(other, tiny_pipeline.diffusion, "cpu")


def _tiny_diffusion(tiny_pipeline, out, *overrides: str):
    """A tiny train_diffusion run on the session's latents into ``out``; its best.pt."""
    sets = [f"data_dir={tiny_pipeline.data_dir}", f"vae_checkpoint={tiny_pipeline.vae}",
            f"out_dir={out}", "model.channels=[8, 16]", "model.norm_groups=4",
            "model.num_res_blocks=1", "val_samples=2", "val_steps=2", "train.steps=2",
            "train.batch_size=2", "train.device=cpu", *overrides]  # fmt: skip
    result = run_script("train_diffusion", *(a for s in sets for a in ("--set", s)))
    assert result.exit_code == 0, result.output
    return out / "best.pt"


def _residual_diffusion(tiny_pipeline, tmp_path):
    out = tmp_path / "diffusion_residual"
    return _tiny_diffusion(tiny_pipeline, out, "diffusion.target=residual")


def test_residual_target_chain_ends_at_the_lr_latent_when_no_residual_is_predicted(
    tiny_pipeline, tmp_path
):
    """diffusion.target residual: x_0 is (z_HR - z_LR) / rms, so a network that predicts no
    residual samples exactly the LR latent, i.e. the LDM gives the VAE result."""
    import torch

    from ldm.diffusion.latent_diffusion import SamplerConfig

    ckpt = _residual_diffusion(tiny_pipeline, tmp_path)
    lat = tiny_pipeline.data_dir / "latents"
    meta = json.loads((lat / "meta.json").read_text())
    lr, hr = np.load(lat / "train" / "lr.npy"), np.load(lat / "train" / "hr.npy")
    rms = float(np.sqrt(((hr.astype(np.float64) - lr) ** 2).mean())) * meta["scale_factor"]
    extra = load_checkpoint(ckpt, "diffusion")["extra"]
    assert extra["residual_scale"] == pytest.approx(1 / rms, rel=1e-5)
    ldm = load_ldm(tiny_pipeline.vae, ckpt, "cpu")
    assert ldm.space.target == "residual"
    abar = ldm.schedule.alphas_cumprod.float()

    def no_residual(x, t, cond):  # v of x_0 = 0: x_t = sqrt(1 - abar) eps, v = sqrt(abar) eps
        a = abar[t].reshape(-1, 1, 1, 1, 1)
        return a.sqrt() * x / (1 - a).sqrt()

    ldm.unet = no_residual
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 4, 4, 4, 4, generator=g)
    noise = torch.randn(cond.shape, generator=g)
    for sampler in (SamplerConfig(steps=5), SamplerConfig(steps=3, init="cond", t_start=300)):
        x, t_start = ldm.initial_latent(cond, sampler, g)
        z = ldm.sample(cond, x if t_start else noise, sampler, t_start=t_start)
        torch.testing.assert_close(z, cond, atol=1e-4, rtol=1e-4)
    seen = []
    ldm.sample(cond, noise, SamplerConfig(steps=2), callback=lambda d: seen.append(d))
    torch.testing.assert_close(seen[-1]["pred_original_sample"], cond, atol=1e-4, rtol=1e-4)


def test_residual_checkpoint_without_its_scale_is_refused(tiny_pipeline, tmp_path):
    import torch

    ckpt = _residual_diffusion(tiny_pipeline, tmp_path)
    state = load_checkpoint(ckpt, "diffusion")
    del state["extra"]["residual_scale"]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="residual target without its scale"):
        load_ldm(tiny_pipeline.vae, ckpt, "cpu")


def test_best_diffusion_checkpoint_has_the_closest_samples(tiny_pipeline, tmp_path):
    """best.pt of train_diffusion is the validation with the lowest latent MSE (not the decoded
    PSNR, which is flat when the decoder ignores its latent)."""
    out = tmp_path / "d"
    _tiny_diffusion(tiny_pipeline, out, "train.steps=5", "train.val_every=1", "train.lr=0.01")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val"]["latent_mse"] for r in rows if "val" in r}
    assert len(vals) == 5
    assert load_checkpoint(out / "best.pt", "diffusion")["step"] == min(vals, key=vals.get)
