"""The trained latent diffusion model as one object: VAE + UNet + noise schedule + scale factor.

Sampling of an HR latent conditioned on an LR image window, with DDIM or DDPM; used by
predict_ldm and the ddim_similar_noise experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import file_digest
from ldm.config import config_from_dict
from ldm.diffusion.samplers import SAMPLERS, SPACINGS, sampler_timesteps
from ldm.diffusion.schedule import DiffusionConfig, NoiseSchedule, add_noise, make_schedule
from ldm.errors import CheckpointError, ConfigError
from ldm.nets import UNet3d, VAE3d
from ldm.nets.loading import load_unet, load_vae
from ldm.validate import check_choice, check_min, check_range

INITS = ("noise", "cond")


@dataclass(frozen=True)
class SamplerConfig:
    sampler: str = "ddim"  # ddim | ddpm (ancestral over all T steps)
    steps: int = 50  # DDIM steps (ignored by ddpm)
    eta: float = 0.0  # DDIM eta: 0 = deterministic
    spacing: str = "trailing"  # trailing | leading | linspace
    # Where the reverse process starts: 'noise' = x_T ~ N(0, I); 'cond' = the LR latent noised
    # to t_start, x_t = sqrt(abar) z_LR + sqrt(1 - abar) eps (SDEdit-like refinement of z_LR:
    # the steps only close the gap z_HR - z_LR; docs/design.md "Starting from the LR latent").
    init: str = "noise"
    t_start: int | None = None  # init 'cond' only: the timestep the LR latent is noised to

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("init", self.init, INITS)
        if (self.init == "cond") != (self.t_start is not None):
            raise ConfigError("sampler.t_start is set exactly when sampler.init is 'cond'")
        if self.t_start is not None:
            check_min("t_start", self.t_start, 1)
        check_choice("spacing", self.spacing, SPACINGS)
        check_min("steps", self.steps, 1)
        check_range("eta", self.eta, 0, 1)


@dataclass(frozen=True)
class ChainSpace:
    """What x_0 of the diffusion chain is, in terms of the scaled HR latent z and the scaled LR
    latent ``cond`` (DiffusionConfig.target): z itself, or the residual (z - cond) times
    ``residual_scale`` (1 / rms of that residual on the train latents)."""

    target: str = "latent"
    residual_scale: float = 1.0

    def to_x(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return z if self.target == "latent" else (z - cond) * self.residual_scale

    def from_x(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x if self.target == "latent" else cond + x / self.residual_scale


@dataclass
class LatentDiffusion:
    vae: VAE3d
    unet: UNet3d
    schedule: NoiseSchedule
    scale: float  # latent scale factor: the UNet works on scale * VAE latent
    device: torch.device
    vae_step: int
    unet_step: int
    # LR image (1, 1, *sp) that decode() uses when called without one (see :meth:`lr_context`)
    default_lr: torch.Tensor | None = None
    space: ChainSpace = ChainSpace()  # x_0 of the chain: the HR latent or the HR - LR residual

    @property
    def factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def window_multiple(self) -> int:
        """What every image-space window side must be a multiple of: VAE factor x UNet
        downsampling."""
        return self.factor * 2 ** (len(self.unet.config.channels) - 1)

    @torch.no_grad()
    def encode_cond(self, lr: torch.Tensor) -> torch.Tensor:
        """LR image batch (B, 1, *sp) -> scaled LR mean latent (B, C, *sp/f): the condition."""
        return self.vae.encode(lr.to(self.device))[0] * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor, lr: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latent -> image (B, 1, *sp); ``lr`` (B, 1, *sp), the LR image window, is
        required by an LR-aware VAE (``vae.config.uses_lr``) and ignored by a plain one."""
        lr = self.default_lr if lr is None else lr
        if lr is not None and self.vae.config.uses_lr:
            lr = lr.to(self.device)
            if lr.shape[0] == 1 and z.shape[0] > 1:  # one LR window, many latents
                lr = lr.expand(z.shape[0], *lr.shape[1:])
        return self.vae.decode(z / self.scale, lr)

    @contextmanager
    def lr_context(self, lr: torch.Tensor) -> Iterator[None]:
        """Within it, decode(z) without an LR image decodes with ``lr`` (1, 1, *sp): for
        experiments that decode many latents of one window (ddim_similar_noise)."""
        before, self.default_lr = self.default_lr, lr
        try:
            yield
        finally:
            self.default_lr = before

    def initial_latent(
        self, cond: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, int | None]:
        """(x at the first sampler step, in chain space, and its t_start or None for x_T) per
        ``sampler.init``: x_T ~ N(0, I), or the LR latent's chain value noised to t_start."""
        noise = torch.randn(cond.shape, generator=generator, device=cond.device)
        if sampler.init == "noise":
            return noise, None
        t_start = int(sampler.t_start)
        if t_start >= self.schedule.num_train_timesteps:
            raise ConfigError(
                f"sampler.t_start {t_start} must be < {self.schedule.num_train_timesteps}"
            )
        t = torch.full((cond.shape[0],), t_start, device=cond.device, dtype=torch.long)
        return add_noise(self.schedule, self.space.to_x(cond, cond), noise, t), t_start

    @torch.no_grad()
    def denoise(
        self, lr: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """LR image batch (B, 1, *sp) -> LDM output (B, 1, *sp): encode the condition, sample
        the HR latent (from noise or the noised LR latent), decode it with the LR image."""
        lr = lr.to(self.device)
        cond = self.encode_cond(lr).float()  # (B, C, *sp/f), scaled
        x, t_start = self.initial_latent(cond, sampler, generator)
        z = self.sample(cond, x, sampler, generator=generator, t_start=t_start)
        return self.decode(z, lr)

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
        """Scaled HR latent from ``noise`` (x_T, or x_{t_start}, in chain space: ``space.to_x``)
        conditioned on ``cond``; ``callback`` sees x_t and the predicted x_0 as latents."""
        if sampler.steps > self.schedule.num_train_timesteps:
            raise ConfigError(
                f"steps {sampler.steps} > the model's {self.schedule.num_train_timesteps} "
                "training timesteps; lower steps"
            )
        timesteps = sampler_timesteps(sampler.sampler, self.schedule.num_train_timesteps,
                                      sampler.steps, sampler.spacing, t_start)  # fmt: skip
        from_x = self.space.from_x

        def as_latents(d: dict) -> None:
            callback({**d, "x": from_x(d["x"], cond),
                      "pred_original_sample": from_x(d["pred_original_sample"], cond)})  # fmt: skip

        x = SAMPLERS[sampler.sampler](
            self.unet, noise, self.schedule, timesteps, eta=sampler.eta,
            extra_args={"cond": cond}, generator=generator,
            callback=None if callback is None else as_latents, disable=True,
        )  # fmt: skip
        return from_x(x, cond)


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
    if cfg.target == "residual" and "residual_scale" not in extra:
        raise CheckpointError(f"{diffusion_checkpoint}: residual target without its scale; retrain")
    space = ChainSpace(cfg.target, float(extra.get("residual_scale", 1.0)))
    return LatentDiffusion(vae, unet, make_schedule(cfg), float(extra["scale_factor"]), device,
                           int(vae_state["step"]), int(state["step"]), space=space)  # fmt: skip
