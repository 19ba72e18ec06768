"""Shared fixtures: a tiny but real dataset, VAE and diffusion checkpoints, built once."""

from __future__ import annotations

import locale
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import run_script
from tests.helpers.phases import TINY_FIRST_STAGE

# Tests run on 2 shared cores: one thread per test process is faster for these tiny tensors.
torch.set_num_threads(1)


@dataclass(frozen=True)
class TinyPipeline:
    data_dir: Path
    vae: Path  # best.pt of train_vae_pair
    diffusion: Path  # best.pt of train_diffusion
    root: Path


@pytest.fixture(autouse=True)
def _keep_locale():
    """Tests that write DICOM with SimpleITK directly leave GDCM's "C" locale behind (the
    product's own DICOM code restores it: ldm.data.dicom.series.keep_locale); put it back so a
    later test's subprocess output decodes as UTF-8."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def _ok(result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    root = tmp_path_factory.mktemp("tiny_pipeline")
    data = root / "dataset"
    _ok(run_script(
        "prepare_data", "--set", f"out_dir={data}", "--set", "phantom.num_cases=4",
        "--set", "phantom.shape=[24, 24, 24]", "--set", "patches.size=[16, 16, 16]",
        "--set", "patches.stride=[8, 8, 8]", "--set", "split.val_fraction=0.25",
        "--set", "split.test_fraction=0.25",
    ))  # fmt: skip
    tiny_train = ["--set", "train.steps=2", "--set", "train.batch_size=2",
                  "--set", "train.val_every=1", "--set", "train.device=cpu"]  # fmt: skip
    _ok(run_script(
        "train_vae_pair", "--set", f"data_dir={data}", "--set", f"out_dir={root / 'vae'}",
        *TINY_FIRST_STAGE, *tiny_train,
    ))  # fmt: skip
    vae = root / "vae" / "best.pt"
    _ok(run_script("prepare_latents", "--set", f"data_dir={data}", "--set", f"vae_checkpoint={vae}",
                   "--set", "device=cpu"))  # fmt: skip
    _ok(run_script(
        "train_diffusion", "--set", f"data_dir={data}", "--set", f"vae_checkpoint={vae}",
        "--set", f"out_dir={root / 'diffusion'}", "--set", "model.channels=[8, 16]",
        "--set", "model.norm_groups=4", "--set", "model.num_res_blocks=1",
        "--set", "val_samples=2", "--set", "val_steps=2", *tiny_train,
    ))  # fmt: skip
    return TinyPipeline(data, vae, root / "diffusion" / "best.pt", root)
