"""The trained latent diffusion model as one object: first stage + UNet + schedule + scale.

Predict and refine (docs/design.md): the restorer gives mu(LR); the UNet samples the scaled
latent z of the residual HR - mu, conditioned on (mu, LR) brought to the latent grid by
space-to-depth; the output is ``mu + w D(z / scale)``. ``z = 0`` (or ``w = 0``) is the restorer.
Used by predict_ldm, the quality bench and the ddim_similar_noise experiment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.core.checkpoint import file_digest
from ldm.core.config import config_from_dict
from ldm.core.errors import CheckpointError, ConfigError
from ldm.core.validate import check_choice, check_min, check_range
from ldm.diffusion.samplers import SAMPLERS, SPACINGS, sampler_timesteps
from ldm.diffusion.schedule import DiffusionConfig, NoiseSchedule, add_noise, make_schedule
from ldm.nets import UNet
from ldm.nets.loading import load_unet, load_vae
from ldm.nets.restorer import RestorerAE, condition

INITS = ("noise", "restorer")


@dataclass(frozen=True)
class SamplerConfig:
    kind: str = "ddim"  # ddim | ddpm (ancestral over all T steps)
    steps: int = 5  # DDIM steps (ignored by ddpm)
    eta: float = 0.0  # DDIM eta: 0 = deterministic given the start noise
    spacing: str = "trailing"  # trailing | leading | linspace
    # Where the reverse process starts: 'noise' = x_T ~ N(0, I); 'restorer' = z = 0 (about the
    # restorer's output: mu + D(0)) noised to t_start, x_t = sqrt(1 - abar) eps (SDEdit-like)
    init: str = "noise"
    t_start: int | None = None  # init 'restorer' only: the timestep z = 0 is noised to

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, SAMPLERS)
        check_choice("init", self.init, INITS)
        if (self.init == "restorer") != (self.t_start is not None):
            raise ConfigError("sampler.t_start is set exactly when sampler.init is 'restorer'")
        if self.t_start is not None:
            check_min("t_start", self.t_start, 1)
        check_choice("spacing", self.spacing, SPACINGS)
        check_min("steps", self.steps, 1)
        check_range("eta", self.eta, 0, 1)


# items per call of the UNet (latent windows) and of the residual decoder (image windows) on
# the CPU; measured on 2 cores, predict_ldm 128^3: UNet 64 -> 8 and decoder 64 -> 2 items
CPU_CHUNKS = {"unet": 8, "decode": 2}


@dataclass
class LatentDiffusion:
    vae: RestorerAE  # the first stage: restorer + residual autoencoder
    unet: UNet
    schedule: NoiseSchedule
    scale: float  # latent scale factor: the UNet works on scale * residual latent
    device: torch.device
    vae_step: int
    unet_step: int
    # restorer output (1, 1, *sp) that decode() adds when called without one (lr_context)
    default_mu: torch.Tensor | None = None
    # sigma scaling of the samples' std (Laves et al. 2021), fitted by train_diffusion on
    # validation patches (calibration.json beside the checkpoint); 1 = the raw sample std
    std_scale: float = 1.0

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)  # "cpu" works too

    def _in_chunks(self, fn: Callable, what: str) -> Callable:
        """``fn(x, *args, **kw)`` run on chunks of CPU_CHUNKS[what] items of ``x`` (and of the
        tensors among args/kw with x's batch size) on the CPU, whole elsewhere: on 2 cores small
        batches stay in cache (predict_ldm 128^3: 17.6 -> 8.9 s, docs/experiments.md). Each
        item is computed alone either way (GroupNorm and attention are per item)."""
        k = CPU_CHUNKS[what]
        if self.device.type != "cpu":
            return fn

        def run(x: torch.Tensor, *args, **kw) -> torch.Tensor:
            if x.shape[0] <= k:
                return fn(x, *args, **kw)

            def part(v, i):
                same = isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == x.shape[0]
                return v[i : i + k] if same else v

            return torch.cat([fn(x[i : i + k], *(part(a, i) for a in args),
                                 **{n: part(v, i) for n, v in kw.items()})
                              for i in range(0, x.shape[0], k)])  # fmt: skip

        return run

    @property
    def factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def window_multiple(self) -> int:
        """What every image-space window side must be a multiple of: the residual
        autoencoder's factor x UNet downsampling (and the restorer's factor)."""
        unet = self.factor * 2 ** (len(self.unet.config.channels) - 1)
        return max(unet, self.vae.config.window_multiple)

    @torch.no_grad()
    def restore(self, lr: torch.Tensor) -> torch.Tensor:
        """LR image batch (B, 1, *sp) -> the restorer's output mu (B, 1, *sp)."""
        return self.vae.restore(lr.to(self.device))

    @torch.no_grad()
    def condition(self, lr: torch.Tensor, mu: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's condition (B, 2 f^3, *sp / f): space-to-depth of (mu, LR)."""
        lr = lr.to(self.device)
        mu = self.restore(lr) if mu is None else mu
        return condition(mu.float(), lr.float(), self.factor)

    @torch.no_grad()
    def encode_target(self, hr: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """The scaled mean latent of HR - mu: x_0 of the chain that a perfect sampler returns."""
        return self.vae.encode(hr.to(self.device) - mu)[0] * self.scale

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, mu: torch.Tensor | None = None, w: float = 1.0
    ) -> torch.Tensor:
        """Scaled latent (B, C, *sp / f) -> image mu + w D(z / scale) (B, 1, *sp); ``mu`` (B or
        1, 1, *sp) defaults to the one of :meth:`lr_context`."""
        mu = self.default_mu if mu is None else mu
        if mu is None:
            raise ValueError("decode needs the restorer output mu (or an lr_context)")
        return mu.to(self.device) + w * self.vae.decode(z / self.scale)

    @contextmanager
    def lr_context(self, lr: torch.Tensor) -> Iterator[torch.Tensor]:
        """Within it, decode(z) adds the restorer output of ``lr`` (1, 1, *sp), computed once:
        for experiments that decode many latents of one window (ddim_similar_noise)."""
        before, self.default_mu = self.default_mu, self.restore(lr)
        try:
            yield self.default_mu
        finally:
            self.default_mu = before

    def initial_latent(
        self, shape: tuple[int, ...], sampler: SamplerConfig, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, int | None]:
        """(x at the first sampler step, its t_start or None for x_T) per ``sampler.init``:
        x_T ~ N(0, I), or z = 0 (the restorer) noised to t_start."""
        noise = torch.randn(shape, generator=generator, device=self.device)
        if sampler.init == "noise":
            return noise, None
        t_start = int(sampler.t_start)
        if t_start >= self.schedule.num_train_timesteps:
            raise ConfigError(
                f"sampler.t_start {t_start} must be < {self.schedule.num_train_timesteps}"
            )
        t = torch.full((shape[0],), t_start, device=self.device, dtype=torch.long)
        return add_noise(self.schedule, torch.zeros_like(noise), noise, t), t_start

    @torch.no_grad()
    def refine(
        self, lr: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator | None = None,
        num_samples: int = 1, w: float = 1.0,
    ) -> torch.Tensor:  # fmt: skip
        """LR window batch (B, 1, *sp) -> (B, 3, *sp): the mean of ``num_samples`` outputs
        mu + w D(z_k), their per-voxel sample std (Bessel-corrected, ddof 1: calibrated samples
        give a variance-to-error ratio of N / (N + 1)), and the first sample. The samples of one
        window run as one batch; the restorer runs once."""
        lr = lr.to(self.device)
        b, n = lr.shape[0], num_samples
        with torch.autocast(self.device.type, enabled=False):  # mu in float32 under any autocast:
            mu = self.restore(lr.float()).float()  # w = 0 is the restorer exactly
        cond = condition(mu, lr.float(), self.factor)  # (B, 2 f^3, *sp / f)
        cond = cond.repeat_interleave(n, dim=0)  # (B N, ...): sample k of window i at i N + k
        shape = (b * n, self.vae.config.latent_channels, *cond.shape[2:])
        x, t_start = self.initial_latent(shape, sampler, generator)
        z = self.sample(cond, x, sampler, generator=generator, t_start=t_start)
        decode = self._in_chunks(self.vae.decode, "decode")
        detail = (w * decode(z / self.scale).float()).reshape(b, n, *lr.shape[2:])
        mean = mu[:, 0] + detail.mean(1)
        std = detail.std(1, correction=1) * self.std_scale if n > 1 else torch.zeros_like(mean)
        return torch.stack([mean, std, mu[:, 0] + detail[:, 0]], dim=1)

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
        """Scaled residual latent from ``noise`` (x_T, or x_{t_start}) conditioned on ``cond``;
        ``callback`` sees x_t and the predicted x_0."""
        if sampler.steps > self.schedule.num_train_timesteps:
            raise ConfigError(
                f"steps {sampler.steps} > the model's {self.schedule.num_train_timesteps} "
                "training timesteps; lower steps"
            )
        timesteps = sampler_timesteps(sampler.kind, self.schedule.num_train_timesteps,
                                      sampler.steps, sampler.spacing, t_start)  # fmt: skip
        return SAMPLERS[sampler.kind](
            self._in_chunks(self.unet, "unet"), noise, self.schedule, timesteps, eta=sampler.eta,
            extra_args={"cond": cond}, generator=generator, callback=callback, disable=True,
        )  # fmt: skip


def load_ldm(
    vae_checkpoint: Path, diffusion_checkpoint: Path, device: torch.device
) -> LatentDiffusion:
    """Both checkpoints, checked to belong together (the UNet was trained on this first stage's
    latents)."""
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
                           int(vae_state["step"]), int(state["step"]),
                           std_scale=load_std_scale(Path(diffusion_checkpoint)))  # fmt: skip


CALIBRATION = "calibration.json"


def load_std_scale(checkpoint: Path) -> float:
    """The sigma-scaling factor fitted for ``checkpoint`` (calibration.json beside it, written
    by train_diffusion for best.pt), or 1 when there is none or it belongs to another file."""
    path = checkpoint.parent / CALIBRATION
    if not path.is_file():
        return 1.0
    try:
        cal = json.loads(path.read_text())
        if (cal.get("checkpoint"), cal.get("digest")) == (checkpoint.name,
                                                          file_digest(checkpoint)):  # fmt: skip
            return float(cal["std_scale"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 1.0
