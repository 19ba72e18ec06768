"""train_vae_pair: the first stage of the LDM, a restorer and the autoencoder of its residual.

Loss = L1(mu(LR), HR) (+ grad_weight on spatial differences) for the restorer mu, and
MSE(D(z), s r) + residual_grad_weight x L1 on spatial differences + kl_weight x KL for the
residual autoencoder, r = HR - mu(LR) with mu detached, s = 1 / rms(HR - mu) (a running average
over the training batches, saved with the weights) (docs/design.md, "Predict and refine").
One restorer forward serves both terms in the joint stage; with ``residual_ae_fraction`` > 0
(the default) a second stage follows: the residual autoencoder alone (a fresh warmup + cosine)
on the residuals of the restorer frozen at its EMA weights, randomly flipped. Validation reports
the restorer, the oracle mu + D(E(r)) (what a perfect diffusion could reach), mu + D(0), and the
oracle headroom over the restorer: the most any diffusion on this latent can add.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.core.device import pick_device
from ldm.core.errors import ConfigError, DataError
from ldm.core.registry import PhaseResult
from ldm.core.validate import check_range
from ldm.data.dataset import (
    AugmentConfig,
    PatchPairs,
    augment_pair,
    check_patch_size,
    load_manifest,
)
from ldm.evaluate.metrics import psnr
from ldm.nets import kl_divergence
from ldm.nets.restorer import RestorerAE, RestorerAEConfig, gradient_l1, l1_with_gradients
from ldm.train.training import TrainConfig, train, training_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainVAEConfig:
    data_dir: Path = Path("dataset/vessel_phantom")
    out_dir: Path = Path("checkpoint/vae_denoise")
    model: RestorerAEConfig = field(default_factory=RestorerAEConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1200, batch_size=4, lr=2e-3, warmup_steps=50, ema_decay=0.99, val_every=200,
        save_every=200, max_minutes=15.0,
    ))  # fmt: skip
    kl_weight: float = 1e-6  # on the per-element mean KL of the residual latent
    grad_weight: float = 0.0  # restorer: L1 on spatial finite differences (edges)
    residual_grad_weight: float = 0.0  # residual autoencoder: L1 on spatial differences
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_patches: int = 64  # validation patches scored at each validation (from the val split)
    # > 0: after the joint steps, the residual autoencoder trains alone on the frozen restorer's
    # residuals (flipped at random) for this fraction of train.steps; 0: one joint stage
    residual_ae_fraction: float = 0.4

    def __post_init__(self) -> None:
        if min(self.kl_weight, self.grad_weight, self.residual_grad_weight) < 0:
            raise ConfigError("kl_weight, grad_weight and residual_grad_weight must be >= 0")
        check_range("residual_ae_fraction", self.residual_ae_fraction, 0, 1, hi_open=True)
        if self.val_patches < 1:
            raise ConfigError(f"val_patches must be >= 1, got {self.val_patches}")

    @property
    def residual_ae_steps(self) -> int:
        """Steps of the residual autoencoder's stage (0: one joint stage)."""
        n = round(self.residual_ae_fraction * self.train.steps)
        return min(max(n, 1), self.train.steps - 1) if self.residual_ae_fraction > 0 else 0


@torch.no_grad()
def first_stage_scores(
    model: RestorerAE, lr: torch.Tensor, hr: torch.Tensor, device: torch.device, batch: int = 8
) -> dict[str, float]:
    """PSNR of the restorer, the oracle mu + D(E(HR - mu)) and mu + D(0) on patch batches."""
    outs: dict[str, list[torch.Tensor]] = {"psnr": [], "oracle_psnr": [], "zero_latent_psnr": []}
    for i in range(0, len(lr), batch):
        x, y = lr[i : i + batch].to(device), hr[i : i + batch].to(device)
        mu = model.restore(x)
        z = model.encode(y - mu)[0]
        outs["psnr"].append(mu.float().cpu())
        outs["oracle_psnr"].append((mu + model.decode(z)).float().cpu())
        outs["zero_latent_psnr"].append((mu + model.decode(torch.zeros_like(z))).float().cpu())
    v = {k: psnr(torch.cat(o), hr) for k, o in outs.items()}
    v["headroom_db"] = v["oracle_psnr"] - v["psnr"]
    return v


def first_stage_loss(
    model: nn.Module, lr: torch.Tensor, hr: torch.Tensor, cfg: TrainVAEConfig,
    generator: torch.Generator | None = None, stage: str = "joint",
) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The loss of one (LR, HR) batch (module doc) and its parts for the log; ``stage``: which
    nets train (RestorerAE.forward)."""
    mu, r, r_hat, mean, logvar = model(lr, hr, generator=generator, stage=stage)
    if stage == "residual":  # the restorer is frozen: its loss is only logged
        with torch.no_grad():
            l1_restorer = F.l1_loss(mu.float(), hr)
    else:
        l1_restorer = l1_with_gradients(mu.float(), hr, cfg.grad_weight)
    r_hat, r = r_hat.float(), r.float()
    mse_residual = (r_hat - r).square().mean()
    if cfg.residual_grad_weight > 0:
        mse_residual = mse_residual + cfg.residual_grad_weight * gradient_l1(r_hat, r)
    kl = kl_divergence(mean.float(), logvar.float())
    loss = mse_residual + cfg.kl_weight * kl + (l1_restorer if stage == "joint" else 0.0)
    return loss, {"l1_restorer": l1_restorer.item(), "mse_residual": mse_residual.item(),
                  "kl": kl.item()}  # fmt: skip


class VAEPairTask:
    """The first stage's loss on (LR, HR) patch batches and its validation scores."""

    kind = "vae"

    def __init__(self, cfg: TrainVAEConfig, val: PatchPairs, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        n = min(len(val), cfg.val_patches)
        pairs = [val[i] for i in range(n)]
        self.val_lr = torch.stack([p[0] for p in pairs])  # (N, 1, D, H, W), kept on CPU
        self.val_hr = torch.stack([p[1] for p in pairs])
        self.baseline = psnr(self.val_lr, self.val_hr)
        self.stage = "joint"
        n_ae = cfg.residual_ae_steps
        self.joint_steps = cfg.train.steps - n_ae if n_ae else 0  # 0: only the joint stage
        if n_ae:  # two stages (RunState trains each parameter group on its own steps)
            self.stages = self._stages

    def _stages(self, model: RestorerAE) -> list[tuple[list, list[tuple[int, int]]]]:
        n = self.joint_steps  # the joint stage; then the autoencoder's own schedule
        return [(list(model.restorer.parameters()), [(0, n)]),
                (list(model.residual_ae.parameters()), [(0, n), (n, self.cfg.train.steps)])]

    def begin_step(self, step: int, model: RestorerAE, ema: RestorerAE) -> None:
        if not self.joint_steps:
            return
        self.stage = "joint" if step < self.joint_steps else "residual"
        if step == self.joint_steps:  # freeze the restorer at its EMA weights (the ones
            with torch.no_grad():  # saved), so the autoencoder learns their residuals
                for p, q in zip(model.restorer.parameters(), ema.restorer.parameters()):
                    p.copy_(q)

    def loss(self, model: nn.Module, batch, generator: torch.Generator):
        lr, hr = augment_pair(*batch, self.cfg.augment, generator)  # (B, 1, D, H, W) each
        return first_stage_loss(model, lr, hr, self.cfg, generator, self.stage)

    def validate(self, model: nn.Module) -> dict[str, float]:
        v = first_stage_scores(model, self.val_lr, self.val_hr, self.device)
        # best.pt by restorer + oracle: the fidelity floor and the room above it both count
        return {**v, "baseline_psnr": self.baseline, "score": v["psnr"] + v["oracle_psnr"]}


def residual_scale(pairs: PatchPairs, max_items: int = 512) -> float:
    """1 / rms(HR - LR) over (up to ``max_items`` evenly spaced) train patches."""
    idx = np.linspace(0, len(pairs) - 1, min(len(pairs), max_items)).round().astype(int)
    sq = [float(((pairs.hr[i] - pairs.lr[i]).astype(np.float64) ** 2).mean()) for i in idx]
    rms = float(np.sqrt(np.mean(sq)))
    if not np.isfinite(rms) or rms <= 0:
        raise DataError(f"{pairs.split} patches: LR equals HR; there is nothing to restore")
    return 1.0 / rms


def train_vae_pair(cfg: TrainVAEConfig, *, overwrite: bool = False) -> PhaseResult:
    """Train (or resume) the restorer + residual autoencoder into ``cfg.out_dir``."""
    manifest = load_manifest(cfg.data_dir)
    check_patch_size(manifest["patch_size"], cfg.model.window_multiple, str(cfg.data_dir))
    train_set = PatchPairs(cfg.data_dir, "train")
    val_set = PatchPairs(
        cfg.data_dir, "val" if manifest["splits"]["val"]["num_patches"] else "train"
    )
    torch.manual_seed(cfg.train.seed)
    model = RestorerAE(cfg.model)
    if cfg.model.residual_scale is None:  # measured: starts at 1 / rms(HR - LR)
        model.residual_rms.fill_(1.0 / residual_scale(train_set))
    task = VAEPairTask(cfg, val_set, pick_device(cfg.train.device))
    result = train(
        model, dataclasses.asdict(cfg.model), train_set, task, cfg.train, cfg.out_dir,
        extra={"data_dir": str(cfg.data_dir), "patch_size": manifest["patch_size"]},
        overwrite=overwrite, config=cfg,
    )  # fmt: skip

    def describe(v: dict[str, float]) -> tuple[str, str]:
        line = (f"validation PSNR: restorer {v['psnr']:.2f} dB | Baseline "
                f"{v['baseline_psnr']:.2f} dB | oracle mu + D(E(HR - mu)) "
                f"{v['oracle_psnr']:.2f} dB (headroom {v['headroom_db']:+.2f} dB) | mu + D(0) "
                f"{v['zero_latent_psnr']:.2f} dB")  # fmt: skip
        return line, (f"restorer {v['psnr']:.2f} dB, oracle {v['oracle_psnr']:.2f} dB "
                      f"(baseline {v['baseline_psnr']:.2f})")  # fmt: skip

    return training_summary("train_vae_pair", result, model, describe)
