"""train_vae_pair: a KL autoencoder that encodes LR and decodes HR (the denoiser of the LDM).

Loss = L1(decode(encode(LR)), HR) + hr_weight * L1(decode(encode(HR)), HR) + kl_weight * KL
(+ grad_weight * the same two terms on the spatial gradients).
The second term gives HR a faithful latent for the diffusion phase to target. With an LR-aware
decoder (model.lr_skip / model.residual) both terms decode WITH the LR image: decode(z_HR, LR)
is the ceiling path that makes the decoder use the latent (trained on decode(z_LR, LR) alone it
learns to ignore it, docs/design.md "LR-aware decoder"); validation also reports decode(0, LR).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm.data.dataset import (
    AugmentConfig,
    PatchPairs,
    augment_pair,
    check_patch_size,
    load_manifest,
)
from ldm.distributed import pick_device
from ldm.errors import ConfigError
from ldm.metrics import psnr
from ldm.nets import VAE3d, VAEConfig, kl_divergence
from ldm.pipeline import PhaseResult
from ldm.training import TrainConfig, train, training_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainVAEConfig:
    data_dir: Path = Path("dataset/vessel_phantom")
    out_dir: Path = Path("checkpoint/vae_denoise")
    model: VAEConfig = field(default_factory=VAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kl_weight: float = 1e-4  # on the per-element mean KL
    hr_weight: float = 1.0  # weight of the HR -> HR reconstruction term
    grad_weight: float = 0.0  # weight of the L1 loss on spatial finite differences (edges)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_patches: int = 64  # validation patches scored at each validation (from the val split)

    def __post_init__(self) -> None:
        if self.kl_weight < 0 or self.hr_weight < 0 or self.grad_weight < 0:
            raise ConfigError("kl_weight, hr_weight and grad_weight must be >= 0")
        if self.val_patches < 1:
            raise ConfigError(f"val_patches must be >= 1, got {self.val_patches}")


class VAEPairTask:
    """The VAE's loss on (LR, HR) patch batches and its validation PSNR (LR -> HR)."""

    kind = "vae"

    def __init__(self, cfg: TrainVAEConfig, val: PatchPairs, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        n = min(len(val), cfg.val_patches)
        pairs = [val[i] for i in range(n)]
        self.val_lr = torch.stack([p[0] for p in pairs])  # (N, 1, D, H, W), kept on CPU
        self.val_hr = torch.stack([p[1] for p in pairs])
        self.baseline = psnr(self.val_lr, self.val_hr)

    def _l1(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = (x - target).abs().mean()
        w = self.cfg.grad_weight
        for d in range(2, x.ndim) if w > 0 else ():  # finite differences along each spatial axis
            loss = loss + w * (x.diff(dim=d) - target.diff(dim=d)).abs().mean()
        return loss

    def loss(self, model: nn.Module, batch, generator: torch.Generator):
        lr, hr = augment_pair(*batch, self.cfg.augment, generator)  # (B, 1, D, H, W) each
        both = torch.cat([lr, hr])  # one forward pass for both terms (DDP needs one per step)
        # an LR-aware decoder decodes z_LR AND z_HR with the LR image (ignored by a plain VAE)
        recon, mu, logvar = model(both, sample=True, generator=generator, lr=torch.cat([lr, lr]))
        rec_lr, rec_hr = recon.float().chunk(2)
        l1_lr = self._l1(rec_lr, hr)
        l1_hr = self._l1(rec_hr, hr)
        kl = kl_divergence(mu.float(), logvar.float())
        loss = l1_lr + self.cfg.hr_weight * l1_hr + self.cfg.kl_weight * kl
        return loss, {"l1_lr": l1_lr.item(), "l1_hr": l1_hr.item(), "kl": kl.item()}

    def validate(self, model: nn.Module) -> dict[str, float]:
        uses_lr = model.config.uses_lr
        out_lr, out_hr, out_zero = [], [], []
        for i in range(0, len(self.val_lr), 8):
            lr = self.val_lr[i : i + 8].to(self.device)
            hr = self.val_hr[i : i + 8].to(self.device)
            z_lr = model.encode(lr)[0]
            out_lr.append(model.decode(z_lr, lr).float().cpu())
            out_hr.append(model.decode(model.encode(hr)[0], lr).float().cpu())
            if uses_lr:  # what the decoder makes of the LR alone: the latent's share is the gap
                out_zero.append(model.decode(torch.zeros_like(z_lr), lr).float().cpu())
        result = psnr(torch.cat(out_lr), self.val_hr)
        ceiling = psnr(torch.cat(out_hr), self.val_hr)
        v = {"psnr": result, "baseline_psnr": self.baseline, "hr_psnr": ceiling, "score": result}
        if uses_lr:
            v["zero_latent_psnr"] = psnr(torch.cat(out_zero), self.val_hr)
        return v


def train_vae_pair(cfg: TrainVAEConfig, *, overwrite: bool = False) -> PhaseResult:
    """Train (or resume) the paired VAE into ``cfg.out_dir``; returns the validation summary."""
    manifest = load_manifest(cfg.data_dir)
    check_patch_size(manifest["patch_size"], cfg.model.downsample_factor, str(cfg.data_dir))
    train_set = PatchPairs(cfg.data_dir, "train")
    val_set = PatchPairs(
        cfg.data_dir, "val" if manifest["splits"]["val"]["num_patches"] else "train"
    )
    torch.manual_seed(cfg.train.seed)
    model = VAE3d(cfg.model)
    task = VAEPairTask(cfg, val_set, pick_device(cfg.train.device))
    result = train(
        model, dataclasses.asdict(cfg.model), train_set, task, cfg.train, cfg.out_dir,
        extra={"data_dir": str(cfg.data_dir), "patch_size": manifest["patch_size"]},
        overwrite=overwrite, config=cfg,
    )  # fmt: skip

    def describe(v: dict[str, float]) -> tuple[str, str]:
        line = (f"validation PSNR: VAE result {v['psnr']:.2f} dB | Baseline "
                f"{v['baseline_psnr']:.2f} dB | HR->HR ceiling {v['hr_psnr']:.2f} dB "
                f"(best {result.best_score:.2f} dB)")  # fmt: skip
        if "zero_latent_psnr" in v:
            line += f" | decode(0, LR) {v['zero_latent_psnr']:.2f} dB"
        return line, f"val PSNR {v['psnr']:.2f} dB (baseline {v['baseline_psnr']:.2f})"

    return training_summary("train_vae_pair", result, model, describe)
