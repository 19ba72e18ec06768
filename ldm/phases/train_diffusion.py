"""train_diffusion: a conditional UNet that samples the residual latent given (mu, LR).

x_0 = scale * E(HR - mu(LR)), the residual autoencoder's mean latent; condition =
space-to-depth of (mu, LR) concatenated on channels (docs/design.md, "Predict and refine");
loss = DDPM L_simple on epsilon or v (optionally min-SNR weighted); the shared training loop.
Validation: DDIM-sample a few validation latents, report their latent MSE (best.pt: the lowest)
and the PSNR of mu + D(z) beside the restorer's and the oracle's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.core.checkpoint import file_digest
from ldm.core.device import pick_device
from ldm.core.errors import ConfigError
from ldm.core.files import save_json
from ldm.core.registry import PhaseResult
from ldm.data.dataset import PatchPairs, load_manifest
from ldm.data.latents import LatentPairs, latents_dir, load_latents_meta
from ldm.diffusion.latent_diffusion import CALIBRATION, SamplerConfig, load_ldm
from ldm.diffusion.samplers import SPACINGS, ddim_sample, make_timesteps
from ldm.diffusion.schedule import DiffusionConfig, make_schedule, training_loss
from ldm.evaluate.metrics import psnr
from ldm.nets import UNet, UNetConfig
from ldm.nets.loading import load_vae
from ldm.train.training import TrainConfig, train, training_summary


@dataclass(frozen=True)
class TrainDiffusionConfig:
    data_dir: Path = Path("dataset/vessel_phantom")
    latents_dir: Path | None = None  # default <data_dir>/latents
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    out_dir: Path = Path("checkpoint/diffusion")
    model: UNetConfig = field(default_factory=lambda: UNetConfig(channels=(32, 64)))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, batch_size=32, ema_decay=0.995, save_every=250, max_minutes=15.0,
    ))  # fmt: skip
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

    def __init__(self, cfg: TrainDiffusionConfig, val: LatentPairs, val_hr, vae, device) -> None:
        self.cfg, self.device, self.vae = cfg, device, vae
        self.schedule = make_schedule(cfg.diffusion)
        n = min(len(val), cfg.val_samples)
        self.val_cond = torch.stack([val[i][0] for i in range(n)])  # (N, 2 f^3, d, h, w)
        self.val_z = torch.stack([val[i][1] for i in range(n)])  # (N, C, d, h, w) scaled
        self.val_mu = torch.from_numpy(np.array(val.mu[:n], dtype=np.float32))  # (N, 1, *sp)
        self.val_hr = torch.stack([val_hr[i][1] for i in range(n)])  # (N, 1, D, H, W) images
        self.scale = val.scale
        with torch.no_grad():  # what a perfect diffusion model would give: the oracle
            self.oracle = psnr(self._decode(self.val_z), self.val_hr)
        self.restorer = psnr(self.val_mu, self.val_hr)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        detail = self.vae.decode((z / self.scale).to(self.device)).float().cpu()
        return self.val_mu + detail

    def loss(self, model: nn.Module, batch, generator: torch.Generator):
        cond, z = batch  # (B, 2 f^3, d, h, w), (B, C, d, h, w) scaled
        loss = training_loss(
            model, self.schedule, z, extra_args={"cond": cond}, generator=generator,
            min_snr_gamma=self.cfg.diffusion.min_snr_gamma,
        )  # fmt: skip
        return loss, {}

    def validate(self, model: nn.Module) -> dict[str, float]:
        g = torch.Generator(device=self.device).manual_seed(1234)  # same noise every validation
        cond = self.val_cond.to(self.device)
        x = torch.randn(self.val_z.shape, generator=g, device=self.device)
        timesteps = make_timesteps(self.schedule.num_train_timesteps, self.cfg.val_steps,
                                   self.cfg.val_spacing)  # fmt: skip
        z = ddim_sample(model, x, self.schedule, timesteps, extra_args={"cond": cond},
                        disable=True).float().cpu()  # fmt: skip
        mse = float(((z - self.val_z) ** 2).mean())
        return {"latent_mse": mse, "psnr": psnr(self._decode(z), self.val_hr),
                "restorer_psnr": self.restorer, "oracle_psnr": self.oracle,
                "score": -mse}  # fmt: skip


def train_diffusion(cfg: TrainDiffusionConfig, *, overwrite: bool = False) -> PhaseResult:
    load_manifest(cfg.data_dir)
    lat_dir = latents_dir(cfg.data_dir, cfg.latents_dir)
    meta = load_latents_meta(lat_dir, cfg.vae_checkpoint)
    c, factor = meta["latent_shape"][0], meta["factor"]
    # the latent's channels and the condition's (space-to-depth of mu and LR) come from the data
    m = dataclasses.replace(
        cfg.model, in_channels=c, out_channels=c, cond_channels=2 * factor ** meta["spatial_dims"]
    )
    cfg = dataclasses.replace(cfg, model=m)
    if m.spatial_dims != meta["spatial_dims"]:
        raise ConfigError(f"model.spatial_dims must be {meta['spatial_dims']} like the latents")
    scale = meta["scale_factor"]
    train_set = LatentPairs(lat_dir, "train", scale, cfg.data_dir, factor)
    split = "val" if meta["counts"]["val"] else "train"
    device = pick_device(cfg.train.device)
    vae, _ = load_vae(cfg.vae_checkpoint, device)
    val = LatentPairs(lat_dir, split, scale, cfg.data_dir, factor)
    task = LatentDiffusionTask(cfg, val, val.images, vae, device)  # HR at the latents' corners
    torch.manual_seed(cfg.train.seed)
    model = UNet(cfg.model)
    extra = {
        "diffusion": dataclasses.asdict(cfg.diffusion),
        "scale_factor": scale,
        "vae": meta["vae"],
        "latent_shape": meta["latent_shape"],
    }
    result = train(model, dataclasses.asdict(m), train_set, task, cfg.train, cfg.out_dir,
                   extra=extra, overwrite=overwrite, config=cfg)  # fmt: skip

    def describe(v: dict[str, float]) -> tuple[str, str]:
        line = (f"validation ({cfg.val_steps} DDIM steps, one sample): PSNR {v['psnr']:.2f} dB, "
                f"latent MSE {v['latent_mse']:.4f}; restorer {v['restorer_psnr']:.2f} dB, "
                f"oracle {v['oracle_psnr']:.2f} dB")  # fmt: skip
        return line, (f"val sample {v['psnr']:.2f} dB (restorer {v['restorer_psnr']:.2f}, "
                      f"oracle {v['oracle_psnr']:.2f})")  # fmt: skip

    summary = training_summary("train_diffusion", result, model, describe)
    best = Path(cfg.out_dir) / "best.pt"
    if int(os.environ.get("RANK", "0")) == 0 and best.is_file():
        cal = calibrate_std(cfg, best, device, split)
        summary.text += (f"\nuncertainty calibration ({cal['num_samples']} samples, "
                         f"{cal['patches']} {split} patches): variance-to-error "
                         f"{cal['ratio_before']:.2f} -> std x {cal['std_scale']:.2f}")  # fmt: skip
    return summary


@torch.no_grad()
def calibrate_std(
    cfg: TrainDiffusionConfig, best: Path, device: torch.device, split: str, n: int = 8,
    max_patches: int = 32,
) -> dict:  # fmt: skip
    """Sigma scaling (Laves et al. 2021) of best.pt's samples: the factor s that makes
    mean((s std)^2) / mean((mean - HR)^2) = n / (n + 1) over up to ``max_patches`` patches of
    ``split`` (the default sampler, n samples each); written to calibration.json beside it."""
    ldm = load_ldm(cfg.vae_checkpoint, best, device)
    ldm.std_scale = 1.0  # fit on the raw sample std
    pairs = PatchPairs(cfg.data_dir, split)
    idx = np.linspace(0, len(pairs) - 1, min(len(pairs), max_patches)).round().astype(int)
    g = torch.Generator(device=device).manual_seed(0)
    var = err = 0.0
    for i in range(0, len(idx), 8):
        items = [pairs[int(j)] for j in idx[i : i + 8]]
        lr = torch.stack([p[0] for p in items])
        hr = torch.stack([p[1] for p in items])
        out = ldm.refine(lr, SamplerConfig(), g, num_samples=n).float().cpu()
        var += float(out[:, 1].square().sum())
        err += float((out[:, 0] - hr[:, 0]).square().sum())
    ratio = var / max(err, 1e-30)
    scale = float(np.sqrt(n / (n + 1) / ratio)) if ratio > 0 else 1.0
    cal = {"checkpoint": best.name, "digest": file_digest(best), "std_scale": scale,
           "ratio_before": ratio, "num_samples": n, "patches": len(idx),
           "split": split}  # fmt: skip
    save_json(cal, best.parent / CALIBRATION)
    return cal
