"""prepare_latents and train_diffusion on the tiny pipeline: the latents folder (mu, z, meta),
the checks between phases, and the chain the diffusion samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm.core.checkpoint import load_checkpoint
from ldm.core.errors import CheckpointError, DataError
from ldm.data.dataset import PatchPairs
from ldm.data.latents import LATENTS_VERSION, LatentPairs, load_latents_meta
from ldm.diffusion.latent_diffusion import SamplerConfig, load_ldm
from ldm.evaluate.volume_latents import case_arrays
from ldm.nets.loading import load_vae
from ldm.nets.restorer import condition
from tests.helpers.cli import error_line, run_script


def test_latents_meta_and_shapes(tiny_pipeline):
    """prepare_latents writes mu(LR) and the mean latent of HR - mu of every whole case volume
    (the first stage in sliding windows); LatentPairs crops the diffusion's pairs (space-to-depth
    of (mu, LR), scale * z) at start and start / f."""
    lat = tiny_pipeline.data_dir / "latents"
    meta = json.loads((lat / "meta.json").read_text())
    assert meta["format_version"] == LATENTS_VERSION == 3
    assert meta["latent_shape"] == [4, 4, 4, 4] and meta["factor"] == 4  # 16^3 patches, f = 4
    assert meta["window"] == [64, 64, 64] and meta["starts_rounded"] == 0
    index = json.loads((lat / "train" / "patches.json").read_text())
    assert len(index) == meta["counts"]["train"] and not list(lat.rglob("mu.npy"))
    case = index[1]["case"]
    mu, z = np.load(lat / "train" / f"{case}_mu.npy"), np.load(lat / "train" / f"{case}_z.npy")
    assert mu.shape == (1, 24, 24, 24) and z.shape == (4, 6, 6, 6)  # 24^3 volumes
    assert meta["vae"]["step"] == load_checkpoint(tiny_pipeline.vae, "vae")["step"]
    # the stored arrays are the first stage's on the whole volume
    vae, _ = load_vae(tiny_pipeline.vae)
    patches = PatchPairs(tiny_pipeline.data_dir, "train")
    want_mu, want_z = case_arrays(vae, patches.lr.volume(case), patches.hr.volume(case),
                                  (64, 64, 64))  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(mu[0]), torch.from_numpy(want_mu))
    torch.testing.assert_close(torch.from_numpy(z), torch.from_numpy(want_z))
    pairs = LatentPairs(lat, "train", meta["scale_factor"], tiny_pipeline.data_dir, 4)
    assert len(pairs) == meta["counts"]["train"]
    crops = np.stack([pairs.z[i] for i in range(len(pairs))])  # the per-patch latents
    assert meta["scale_factor"] == pytest.approx(1 / crops.std(), rel=1e-5)
    cond, scaled = pairs[1]
    assert cond.shape == (2 * 4**3, 4, 4, 4) and float(scaled.std()) > 0
    image = tuple(slice(a, a + 16) for a in index[1]["start"])
    mu_crop = torch.from_numpy(mu[(slice(None), *image)])[None]
    torch.testing.assert_close(cond, condition(mu_crop, patches[1][0][None], 4)[0])
    z_crop = z[(slice(None), *(slice(a // 4, a // 4 + 4) for a in index[1]["start"]))]
    torch.testing.assert_close(scaled, torch.from_numpy(z_crop) * meta["scale_factor"])
    assert pairs.mu[:2].shape == (2, 1, 16, 16, 16)  # train_diffusion's validation reads these


def test_latents_of_the_earlier_format_are_refused(tiny_pipeline, tmp_path):
    old = tmp_path / "latents"
    old.mkdir()
    meta = json.loads((tiny_pipeline.data_dir / "latents" / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))  # lr/hr latents
    with pytest.raises(DataError, match="unsupported latents format; rerun prepare_latents"):
        load_latents_meta(old, tiny_pipeline.vae)
    line = error_line(run_script(
        "train_diffusion", "--set", f"data_dir={tiny_pipeline.data_dir}",
        "--set", f"latents_dir={old}", "--set", f"vae_checkpoint={tiny_pipeline.vae}",
        "--set", f"out_dir={tmp_path / 'd'}",
    ))  # fmt: skip
    assert "unsupported latents format" in line and str(old) in line
    assert not (tmp_path / "d").exists()


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


def test_a_unet_predicting_no_residual_samples_z_0_and_outputs_mu_plus_d_0(tiny_pipeline):
    """x_0 of the chain is the scaled residual latent: a network that predicts x_0 = 0 samples
    z = 0 from noise and from the restorer start (z = 0 noised to t_start), and refine's output
    is then mu + w D(0) for every sample (std 0)."""
    ldm = load_ldm(tiny_pipeline.vae, tiny_pipeline.diffusion, "cpu")
    assert ldm.schedule.prediction_type == "v"
    abar = ldm.schedule.alphas_cumprod.float()

    def no_residual(x, t, cond):  # v of x_0 = 0: x_t = sqrt(1 - abar) eps, v = sqrt(abar) eps
        a = abar[t].reshape(-1, 1, 1, 1, 1)
        return a.sqrt() * x / (1 - a).sqrt()

    ldm.unet = no_residual
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 2 * 4**3, 4, 4, 4, generator=g)
    shape = (2, 4, 4, 4, 4)
    for sampler in (SamplerConfig(steps=5), SamplerConfig(steps=3, init="restorer", t_start=300)):
        x, t_start = ldm.initial_latent(shape, sampler, torch.Generator().manual_seed(1))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        if t_start is None:  # x_T ~ N(0, I)
            assert torch.equal(x, noise)
        else:  # z = 0 noised to t_start
            assert t_start == 300
            torch.testing.assert_close(x, (1 - abar[300]).sqrt() * noise)
        seen: list[int] = []
        z = ldm.sample(cond, x, sampler, callback=lambda d, seen=seen: seen.append(int(d["t"])),
                       t_start=t_start)  # fmt: skip
        torch.testing.assert_close(z, torch.zeros(shape), atol=1e-4, rtol=0)
        assert len(seen) == sampler.steps and (t_start is None or seen[0] == t_start)
    lr = torch.from_numpy(PatchPairs(tiny_pipeline.data_dir, "test").lr[:1].copy()).float()
    lr = lr.reshape(1, 1, 16, 16, 16)
    out = ldm.refine(lr, SamplerConfig(steps=3), torch.Generator().manual_seed(0), 3, w=0.5)
    with torch.no_grad():
        mu = ldm.vae.restore(lr)
        want = mu + 0.5 * ldm.vae.decode(torch.zeros(1, 4, 4, 4, 4))
    torch.testing.assert_close(out[:, 0:1], want, atol=1e-4, rtol=1e-4)  # the mean
    torch.testing.assert_close(out[:, 2:3], want, atol=1e-4, rtol=1e-4)  # the first sample
    assert float(out[:, 1].abs().max()) < 1e-4  # every sample the same: std 0


def test_diffusion_checkpoint_without_its_scale_is_refused(tiny_pipeline, tmp_path):
    state = load_checkpoint(tiny_pipeline.diffusion, "diffusion")
    del state["extra"]["scale_factor"]
    ckpt = tmp_path / "best.pt"
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="lacks the latent scale"):
        load_ldm(tiny_pipeline.vae, ckpt, "cpu")


def test_best_diffusion_checkpoint_has_the_closest_samples(tiny_pipeline, tmp_path):
    """best.pt of train_diffusion is the validation with the lowest latent MSE (not the decoded
    PSNR of one sample, which rewards blur over detail)."""
    out = tmp_path / "d"
    _tiny_diffusion(tiny_pipeline, out, "train.steps=5", "train.val_every=1", "train.lr=0.01")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val"]["latent_mse"] for r in rows if "val" in r}
    assert len(vals) == 5
    assert load_checkpoint(out / "best.pt", "diffusion")["step"] == min(vals, key=vals.get)
