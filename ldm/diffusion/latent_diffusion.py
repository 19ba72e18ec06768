"""The trained latent diffusion model as one object: VAE + UNet + noise schedule + scale factor.

Sampling of an HR latent conditioned on an LR image window, with DDIM or DDPM; used by
predict_ldm and the ddim_similar_noise experiment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import file_digest
from ldm.config import config_from_dict
from ldm.diffusion.samplers import SAMPLERS, SPACINGS, sampler_timesteps
from ldm.diffusion.schedule import DiffusionConfig, NoiseSchedule, make_schedule
from ldm.errors import CheckpointError, ConfigError
from ldm.nets import UNet3d, VAE3d
from ldm.nets.loading import load_unet, load_vae
from ldm.validate import check_choice, check_min, check_range


@dataclass(frozen=True)
class SamplerConfig:
    sampler: str = "ddim"  # ddim | ddpm (ancestral over all T steps)
    steps: int = 50  # DDIM steps (ignored by ddpm)
    eta: float = 0.0  # DDIM eta: 0 = deterministic
    spacing: str = "trailing"  # trailing | leading | linspace

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("spacing", self.spacing, SPACINGS)
        check_min("steps", self.steps, 1)
        check_range("eta", self.eta, 0, 1)


@dataclass
class LatentDiffusion:
    vae: VAE3d
    unet: UNet3d
    schedule: NoiseSchedule
    scale: float  # latent scale factor: the UNet works on scale * VAE latent
    device: torch.device
    vae_step: int
    unet_step: int

    @property
    def factor(self) -> int:
        return self.vae.config.downsample_factor

    @torch.no_grad()
    def encode_cond(self, lr: torch.Tensor) -> torch.Tensor:
        """LR image batch (B, 1, *sp) -> scaled LR mean latent (B, C, *sp/f): the condition."""
        return self.vae.encode(lr.to(self.device))[0] * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image (B, 1, *sp)."""
        return self.vae.decode(z / self.scale)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        sampler: SamplerConfig,
        generator: torch.Generator | None = None,
        callback: Callable | None = None,
        t_start: int | None = None,
    ) -> torch.Tensor:
        """Scaled HR latent from ``noise`` (x_T, or x_{t_start}) conditioned on ``cond``."""
        if sampler.steps > self.schedule.num_train_timesteps:
            raise ConfigError(
                f"steps {sampler.steps} > the model's {self.schedule.num_train_timesteps} "
                "training timesteps; lower steps"
            )
        timesteps = sampler_timesteps(sampler.sampler, self.schedule.num_train_timesteps,
                                      sampler.steps, sampler.spacing, t_start)  # fmt: skip
        return SAMPLERS[sampler.sampler](
            self.unet, noise, self.schedule, timesteps, eta=sampler.eta,
            extra_args={"cond": cond}, generator=generator, callback=callback, disable=True,
        )  # fmt: skip


def load_ldm(
    vae_checkpoint: Path, diffusion_checkpoint: Path, device: torch.device
) -> LatentDiffusion:
    """Both checkpoints, checked to belong together (the UNet was trained on this VAE's latents)."""
    vae, vae_state = load_vae(vae_checkpoint, device)
    unet, state = load_unet(diffusion_checkpoint, device)
    extra = state.get("extra", {})
    if "scale_factor" not in extra or "diffusion" not in extra:
        raise CheckpointError(f"{diffusion_checkpoint}: lacks the latent scale / schedule; retrain")
    expected = extra["vae"]["digest"]
    if file_digest(Path(vae_checkpoint)) != expected:
        raise CheckpointError(
            f"{diffusion_checkpoint} was trained on latents of another VAE checkpoint "
            f"({extra['vae']['path']}, step {extra['vae']['step']}) than {vae_checkpoint}; "
            "point vae_checkpoint at that file or rerun prepare_latents and train_diffusion"
        )
    cfg = config_from_dict(DiffusionConfig, extra["diffusion"], f"{diffusion_checkpoint}")
    return LatentDiffusion(vae, unet, make_schedule(cfg), float(extra["scale_factor"]), device,
                           int(vae_state["step"]), int(state["step"]))  # fmt: skip
