"""The model variants of the quality bench and their training under one CPU-time budget.

A variant is a list of overrides of configs/demo (``VARIANTS``): train_vae_pair keys, and
``diffusion.*`` keys for train_diffusion. ``train_variant`` runs train_vae_pair, prepare_latents
and train_diffusion through their functions, each network with as many steps as fit its budget of
CPU minutes (calibrated from the CPU time of a training step; wall cap ``WALL_CAP`` x the budget).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.errors import UserError
from ldm.data.dataset import load_manifest
from ldm.train.optim import TrainConfig, timed_step

DEMO = REPO_ROOT / "configs" / "demo"
# overrides of configs/demo/train_vae_pair.yaml (``diffusion.*``: of train_diffusion.yaml;
# SHARED_KEYS: of both). The first stage is model: {restorer, residual_ae, residual_scale}.
VARIANTS: dict[str, list[str]] = {
    # the demo configs: restorer + residual autoencoder (f = 4, 8 latent channels) + diffusion
    "default": [],
    # plain regression with the same CPU minutes: the restorer alone gets both budgets (the
    # residual autoencoder tiny, its loss does not reach the restorer; no diffusion)
    "regression": ["model.residual_ae.channels=[8, 8, 8]", "model.residual_ae.latent_channels=1"],
    # restorer trained on flipped / permuted / rescaled pairs with an edge term
    "aug": ["augment.flips=true", "augment.permute=true", "augment.scale=0.3",
            "augment.shift=0.1", "grad_weight=0.5", "residual_grad_weight=0.5"],
    # f = 2 residual latent (8 channels: as many numbers as voxels): room for the detail
    "f2": ["model.residual_ae.channels=[16, 32]"],
    # both networks trained in float32 on CPU: the loser of train.amp_cpu (default auto: bf16
    # autocast on CPUs with bf16 instructions, 1.3x the steps in the same CPU time)
    "fp32": ["train.amp_cpu=none"],
}  # fmt: skip
NO_DIFFUSION = ("regression",)  # variants that train the first stage only, for both budgets
SHARED_KEYS = ("train.amp",)  # variant overrides that go to both training phases


def _seconds_per_step(model: torch.nn.Module, loss_fn, train: TrainConfig,
                      reps: int = 3) -> float:  # fmt: skip
    """CPU seconds of this process per training step (median of ``reps`` after a warm-up), at
    the run's precision: on a shared, loaded machine wall-clock budgets would measure the
    neighbours, not the model."""
    step = timed_step(model, lambda: loss_fn(model), torch.device("cpu"), train)
    times = []
    for i in range(reps + 1):
        t0 = time.process_time()
        step()
        if i:
            times.append(time.process_time() - t0)
    return float(np.median(times))


def _calibrated_steps(model, loss_fn, minutes: float, train: TrainConfig) -> int:
    """Steps that fit ``minutes`` of CPU time at the measured speed (~10 % kept for validation)."""
    return max(20, int(0.9 * 60 * minutes / _seconds_per_step(model, loss_fn, train)))


WALL_CAP = 8.0  # train.max_minutes = WALL_CAP x the CPU budget: a cap for a very loaded machine


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(train_vae_pair overrides, train_diffusion overrides) of a variant."""
    diffusion = [o for o in overrides if o.startswith(("diffusion.", *SHARED_KEYS))]
    return [o for o in overrides if not o.startswith("diffusion.")], diffusion


def variant_configs(variant: str, data: Path | None = None, run: Path | None = None):
    """(TrainVAEConfig, TrainDiffusionConfig) of a variant: configs/demo with its overrides
    (and the dataset / run folders when given). Raises UserError naming the variant when an
    override does not fit the configs."""
    from ldm.phases.train_diffusion import TrainDiffusionConfig
    from ldm.phases.train_vae_pair import TrainVAEConfig

    vae_sets, diffusion_sets = split_overrides(VARIANTS[variant])
    if data is not None and run is not None:
        vae_sets = [f"data_dir={data}", f"out_dir={run / 'vae'}", *vae_sets]
        diffusion_sets = [f"data_dir={data}", f"latents_dir={run / 'latents'}",
                          f"vae_checkpoint={run / 'vae' / 'best.pt'}",
                          f"out_dir={run / 'diffusion'}", *diffusion_sets]  # fmt: skip
    try:
        return (load_config(TrainVAEConfig, DEMO / "train_vae_pair.yaml", vae_sets),
                load_config(TrainDiffusionConfig, DEMO / "train_diffusion.yaml",
                            diffusion_sets))  # fmt: skip
    except UserError as e:
        raise UserError(f"variant {variant}: {e}") from None


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _train_budgeted(phase, cfg, steps: int, minutes: float, validations: int):
    """Run the training ``phase`` (train_vae_pair / train_diffusion) with ``cfg`` set to ``steps``
    (calibrated for ``minutes`` of CPU), ``validations`` validations and checkpoints, and the
    wall cap; print its summary. -> (its PhaseResult, wall seconds, CPU seconds)."""
    every = max(10, steps // validations)
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, max_minutes=WALL_CAP * minutes,
                                     val_every=every, save_every=every))  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    result = phase(cfg, overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(result.text)
    return result, wall, cpu


def train_variant(data: Path, run: Path, variant: str, vae_min: float, diff_min: float):
    """Train one variant into ``run``: (first-stage checkpoint, diffusion checkpoint or None
    for a NO_DIFFUSION variant, training info)."""
    from ldm.diffusion.schedule import make_schedule, training_loss
    from ldm.nets import UNet
    from ldm.nets.restorer import RestorerAE, condition_channels
    from ldm.phases.prepare_latents import PrepareLatentsConfig, prepare_latents
    from ldm.phases.train_diffusion import train_diffusion
    from ldm.phases.train_vae_pair import first_stage_loss, train_vae_pair

    vae_ck = run / "vae" / "best.pt"
    cfg, dcfg = variant_configs(variant, data, run)
    diffusion = variant not in NO_DIFFUSION
    vae_budget = vae_min if diffusion else vae_min + diff_min  # regression: both budgets
    patch = load_manifest(data)["patch_size"]
    b = cfg.train.batch_size
    lr, hr = torch.rand(2, b, 1, *patch)
    first_stage = RestorerAE(cfg.model)

    steps = _calibrated_steps(first_stage, lambda m: first_stage_loss(m, lr, hr, cfg)[0],
                              vae_budget, cfg.train)  # the training loss itself  # fmt: skip
    vae, vae_s, vae_cpu = _train_budgeted(train_vae_pair, cfg, steps, vae_budget, 4)
    params = {"restorer": _params(first_stage.restorer),
              "residual_ae": _params(first_stage.residual_ae)}  # fmt: skip
    info: dict[str, Any] = {"vae_val": vae.metrics, "params": params,
                            "train_minutes": vae_s / 60, "train_cpu_minutes": vae_cpu / 60,
                            "steps": {"vae": vae.metrics["step"]}}  # fmt: skip
    if not diffusion:
        return vae_ck, None, info
    lat = run / "latents"
    prepare_latents(
        load_config(
            PrepareLatentsConfig,
            None,
            [f"data_dir={data}", f"vae_checkpoint={vae_ck}", f"out_dir={lat}"],
        ),
        overwrite=True,
    )
    # the UNet's channels as train_diffusion sets them from the latents (it overrides the YAML's)
    lc, f = cfg.model.latent_channels, cfg.model.downsample_factor
    c = replace(dcfg.model, in_channels=lc, out_channels=lc,
                cond_channels=condition_channels(cfg.model))  # fmt: skip
    z = torch.randn(dcfg.train.batch_size, lc, *(p // f for p in patch))
    cond = torch.randn(z.shape[0], c.cond_channels, *z.shape[2:])
    unet = UNet(c)
    schedule = make_schedule(dcfg.diffusion)
    steps = _calibrated_steps(unet, lambda m: training_loss(
        m, schedule, z, extra_args={"cond": cond}, min_snr_gamma=dcfg.diffusion.min_snr_gamma,
    ), diff_min, dcfg.train)  # the training loss itself (as for the first stage)  # fmt: skip
    diff, diff_s, diff_cpu = _train_budgeted(train_diffusion, dcfg, steps, diff_min, 3)
    params["unet"] = _params(unet)
    info.update({"diffusion_val": diff.metrics, "train_minutes": (vae_s + diff_s) / 60,
                 "train_cpu_minutes": (vae_cpu + diff_cpu) / 60,
                 "steps": {"vae": vae.metrics["step"],
                           "diffusion": diff.metrics["step"]}})  # fmt: skip
    return vae_ck, run / "diffusion" / "best.pt", info
