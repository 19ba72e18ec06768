"""train_diffusion: a conditional UNet that turns scaled LR latents into HR latents.

x_0 = scale * HR latent (or, with diffusion.target residual, the scaled HR - LR latent residual
over its rms), condition = scale * LR latent (concatenated on channels);
loss = DDPM L_simple on epsilon or v (optionally min-SNR weighted); the shared training loop.
Validation: DDIM-sample a few validation latents, report latent MSE (best.pt: the lowest) and
decoded PSNR vs HR.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.data.dataset import PatchPairs, load_manifest
from ldm.data.latents import LatentPairs, latents_dir, load_latents_meta
from ldm.diffusion.latent_diffusion import ChainSpace
from ldm.diffusion.samplers import SPACINGS, ddim_sample, make_timesteps
from ldm.diffusion.schedule import DiffusionConfig, make_schedule, training_loss
from ldm.distributed import pick_device
from ldm.errors import ConfigError, DataError
from ldm.metrics import psnr
from ldm.nets import UNet3d, UNetConfig
from ldm.nets.loading import load_vae
from ldm.pipeline import PhaseResult
from ldm.training import TrainConfig, train, training_summary


@dataclass(frozen=True)
class TrainDiffusionConfig:
    data_dir: Path = Path("dataset/vessel_phantom")
    latents_dir: Path | None = None  # default <data_dir>/latents
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    out_dir: Path = Path("checkpoint/diffusion")
    model: UNetConfig = field(default_factory=lambda: UNetConfig(channels=(64, 128)))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_samples: int = 16  # validation latents sampled at each validation
    val_steps: int = 25  # DDIM steps of the validation sampler
    val_spacing: str = "trailing"

    def __post_init__(self) -> None:
        if self.val_samples < 1 or self.val_steps < 1:
            raise ConfigError("val_samples and val_steps must be >= 1")
        if self.val_spacing not in SPACINGS:
            raise ConfigError(f"val_spacing must be one of {', '.join(SPACINGS)}")


class LatentDiffusionTask:
    kind = "diffusion"

    def __init__(
        self, cfg: TrainDiffusionConfig, val: LatentPairs, val_hr, vae, device, space: ChainSpace
    ) -> None:
        self.cfg, self.device, self.vae, self.space = cfg, device, vae, space
        self.schedule = make_schedule(cfg.diffusion)
        n = min(len(val), cfg.val_samples)
        self.val_cond = torch.stack([val[i][0] for i in range(n)])  # (N, C, d, h, w) scaled
        self.val_z = torch.stack([val[i][1] for i in range(n)])
        self.val_hr = torch.stack([val_hr[i][1] for i in range(n)])  # (N, 1, D, H, W) images
        self.val_lr = torch.stack([val_hr[i][0] for i in range(n)])  # an LR-aware VAE needs it
        self.scale = val.scale
        with torch.no_grad():  # what a perfect diffusion model would give: decode(HR latent)
            self.ceiling = psnr(self._decode(self.val_z), self.val_hr)
        # the latent error of the VAE result (z = z_LR), which the diffusion should undercut
        self.lr_mse = float(((self.val_cond - self.val_z) ** 2).mean())

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        lr = self.val_lr.to(self.device)  # ignored by a plain VAE
        return self.vae.decode((z / self.scale).to(self.device), lr).float().cpu()

    def loss(self, model: nn.Module, batch, generator: torch.Generator):
        cond, z = batch  # (B, C, d, h, w) each, scaled
        loss = training_loss(
            model, self.schedule, self.space.to_x(z, cond), extra_args={"cond": cond},
            generator=generator,
            min_snr_gamma=self.cfg.diffusion.min_snr_gamma,
        )  # fmt: skip
        return loss, {}

    def validate(self, model: nn.Module) -> dict[str, float]:
        g = torch.Generator(device=self.device).manual_seed(1234)  # same noise every validation
        cond = self.val_cond.to(self.device)
        x = torch.randn(cond.shape, generator=g, device=self.device)
        timesteps = make_timesteps(self.schedule.num_train_timesteps, self.cfg.val_steps,
                                   self.cfg.val_spacing)  # fmt: skip
        x = ddim_sample(model, x, self.schedule, timesteps, extra_args={"cond": cond}, disable=True)
        z = self.space.from_x(x, cond).float().cpu()
        mse = float(((z - self.val_z) ** 2).mean())
        decoded = psnr(self._decode(z), self.val_hr)
        # best.pt by the samples' distance to z_HR, what the diffusion controls: the decoded
        # PSNR is flat where an LR-aware decoder ignores its latent, and its noise picked the
        # step (step 250 of 2000 in one run)
        return {"latent_mse": mse, "lr_latent_mse": self.lr_mse, "psnr": decoded,
                "hr_latent_psnr": self.ceiling, "score": -mse}  # fmt: skip


def residual_scale(pairs: LatentPairs, max_items: int = 4096) -> float:
    """1 / rms of the scaled residual z_HR - z_LR over (up to ``max_items`` of) ``pairs``."""
    idx = np.linspace(0, len(pairs) - 1, min(len(pairs), max_items)).round().astype(int)
    sq = [float(((pairs.hr[i] - pairs.lr[i]).astype(np.float64) ** 2).mean()) for i in idx]
    rms = float(np.sqrt(np.mean(sq))) * pairs.scale
    if not np.isfinite(rms) or rms <= 0:
        raise DataError(
            f"{pairs.folder}: LR and HR latents are identical or not finite; "
            "diffusion.target residual has nothing to learn, use target latent"
        )
    return 1.0 / rms


def train_diffusion(cfg: TrainDiffusionConfig, *, overwrite: bool = False) -> PhaseResult:
    load_manifest(cfg.data_dir)
    lat_dir = latents_dir(cfg.data_dir, cfg.latents_dir)
    meta = load_latents_meta(lat_dir, cfg.vae_checkpoint)
    c = meta["latent_shape"][0]
    m = cfg.model
    if m.in_channels != c or m.out_channels != c or m.cond_channels != c:
        raise ConfigError(
            f"model.in_channels, out_channels and cond_channels must equal the latent channels "
            f"({c}) of {lat_dir}; got {m.in_channels}, {m.out_channels}, {m.cond_channels}"
        )
    if m.spatial_dims != meta["spatial_dims"]:
        raise ConfigError(f"model.spatial_dims must be {meta['spatial_dims']} like the latents")
    scale = meta["scale_factor"]
    train_set = LatentPairs(lat_dir, "train", scale)
    split = "val" if meta["counts"]["val"] else "train"
    device = pick_device(cfg.train.device)
    vae, _ = load_vae(cfg.vae_checkpoint, device)
    residual = cfg.diffusion.target == "residual"
    space = ChainSpace(cfg.diffusion.target, residual_scale(train_set) if residual else 1.0)
    task = LatentDiffusionTask(
        cfg, LatentPairs(lat_dir, split, scale), PatchPairs(cfg.data_dir, split), vae, device, space
    )
    torch.manual_seed(cfg.train.seed)
    model = UNet3d(cfg.model)
    extra = {
        "diffusion": dataclasses.asdict(cfg.diffusion),
        "scale_factor": scale,
        "residual_scale": space.residual_scale,
        "vae": meta["vae"],
        "latent_shape": meta["latent_shape"],
    }
    result = train(model, dataclasses.asdict(m), train_set, task, cfg.train, cfg.out_dir,
                   extra=extra, overwrite=overwrite, config=cfg)  # fmt: skip

    def describe(v: dict[str, float]) -> tuple[str, str]:
        line = (f"validation ({cfg.val_steps} DDIM steps): decoded PSNR {v['psnr']:.2f} dB, "
                f"latent MSE {v['latent_mse']:.4f} (LR latent {v['lr_latent_mse']:.4f}); "
                f"decode(HR latent) ceiling {v['hr_latent_psnr']:.2f} dB")  # fmt: skip
        return line, f"val PSNR {v['psnr']:.2f} dB (ceiling {v['hr_latent_psnr']:.2f})"

    return training_summary("train_diffusion", result, model, describe)
