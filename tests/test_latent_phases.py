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
