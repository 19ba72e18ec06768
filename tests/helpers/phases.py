"""Command lines of the phase scripts on the tiny pipeline of tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.cli import run_script

# the baselines tuned on 4 patches and two values per filter, without BM4D: seconds, not minutes
FAST_TUNE = ("--set", "tune.max_patches=4", "--set", "tune.filter_max_patches=2",
             "--set", "tune.tv_weights=[0.05, 0.2]", "--set", "tune.nlm_hs=[0.05, 0.15]",
             "--set", "tune.bm4d=false")  # fmt: skip

# the first stage of the tiny pipeline (train_vae_pair settings)
TINY_FIRST_STAGE = ("--set", "model.restorer.channels=[8, 8, 8]",
                    "--set", "model.restorer.norm_groups=4",
                    "--set", "model.residual_ae.channels=[8, 8, 8]",
                    "--set", "model.residual_ae.norm_groups=4",
                    "--set", "model.residual_ae.latent_channels=4")  # fmt: skip


def _sets(settings: dict[str, object]) -> list[str]:
    """``--set key=value`` for each setting (booleans as YAML writes them: true / false)."""
    args: list[str] = []
    for key, value in settings.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


def predict_args(tp, out: Path, *, diffusion: Path | None = None, **settings: object) -> list[str]:
    """predict_ldm options: the tiny pipeline's dataset and checkpoints (``diffusion`` in place of
    its diffusion checkpoint), 2 sampler steps on the CPU, then ``settings``."""
    return ["--set", f"data_dir={tp.data_dir}", "--set", f"vae_checkpoint={tp.vae}",
            "--set", f"diffusion_checkpoint={tp.diffusion if diffusion is None else diffusion}",
            "--set", f"out_dir={out}", "--set", "sampler.steps=2", "--set", "device=cpu",
            *_sets(settings)]  # fmt: skip


def predict_cli(tp, out: Path, *extra: object, diffusion: Path | None = None, **settings: object):
    """Run predict_ldm with :func:`predict_args`, then ``extra`` (a ``--set`` there overrides)."""
    args = predict_args(tp, out, diffusion=diffusion, **settings)
    return run_script("predict_ldm", *args, *extra)


def evaluate_args(data_dir: Path, vae: Path, out: Path) -> list[str]:
    """evaluate_psnr options: dataset, first-stage checkpoint and output folder, on the CPU."""
    return ["--set", f"data_dir={data_dir}", "--set", f"vae_checkpoint={vae}",
            "--set", f"out_dir={out}", "--set", "device=cpu"]  # fmt: skip


def evaluate_cli(tp, out: Path, *extra: object, vae: Path | None = None):
    """Run evaluate_psnr on the tiny pipeline (``vae`` in place of its first stage) with
    FAST_TUNE, then ``extra``."""
    vae = tp.vae if vae is None else vae
    return run_script("evaluate_psnr", *evaluate_args(tp.data_dir, vae, out), *FAST_TUNE, *extra)
