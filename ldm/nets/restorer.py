"""Predict-and-refine first stage: a restorer mu(LR) and an autoencoder of its residual HR - mu.

docs/design.md, "Predict and refine". The restorer is the LR-aware decoder path run on a zero
latent (decode(0, LR): LR features at every level, output added to the LR), trained with L1 on
HR. The residual autoencoder is a plain KL autoencoder (:class:`VAE` without LR inputs) of
r = HR - mu(LR) with mu detached: its decoder never sees the LR, so its latent is the only way
detail beyond the restorer reaches the output (a decoder that sees the LR learns to ignore its
latent: Lee et al., ICLR 2019). The diffusion then samples that latent given (mu, LR), and the
output is ``mu + w * D(z)``: ``w = 0`` is the restorer exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.core.errors import UserError
from ldm.nets.vae import VAE, VAEConfig, _Decoder, _LRFeatures

STAGES = ("joint", "residual")  # what a training pass trains (RestorerAE.forward)
RMS_MOMENTUM = 0.05  # of the running rms(HR - mu) behind the residual scale s


def _default_restorer() -> VAEConfig:
    return VAEConfig(lr_skip=True, residual=True)


def _default_residual() -> VAEConfig:
    return VAEConfig(channels=(16, 32, 64), latent_channels=8)


@dataclass(frozen=True)
class RestorerAEConfig:
    """``restorer``: widths of the LR-aware path (``lr_skip`` and ``residual`` must be true);
    ``residual_ae``: the plain autoencoder of HR - mu (``lr_skip``/``residual`` false); its
    factor f and latent channels are the diffusion's latent grid."""

    restorer: VAEConfig = field(default_factory=_default_restorer)
    residual_ae: VAEConfig = field(default_factory=_default_residual)
    # the autoencoder works on s (HR - mu): at the residual's own small scale an untrained
    # decoder's all-zero output is a strong minimum and the latent is never used. null = measured:
    # s follows 1 / rms(HR - mu) of the training batches (a running average, saved with the
    # weights; train_vae_pair starts it at 1 / rms(HR - LR)); a number = that s, fixed
    residual_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("restorer", "residual_ae"):  # dicts from YAML/JSON -> VAEConfig
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, VAEConfig(**value))
        if not (self.restorer.lr_skip and self.restorer.residual):
            raise UserError("restorer needs lr_skip and residual (the LR-aware path)")
        if self.residual_ae.uses_lr:
            raise UserError("residual_ae must not see the LR: set lr_skip and residual false")
        if self.restorer.spatial_dims != self.residual_ae.spatial_dims:
            raise UserError("restorer and residual_ae must have the same spatial_dims")
        if self.residual_scale is not None and not self.residual_scale > 0:
            raise UserError(f"residual_scale must be > 0, got {self.residual_scale}")

    @property
    def spatial_dims(self) -> int:
        return self.residual_ae.spatial_dims

    @property
    def downsample_factor(self) -> int:
        """Image -> latent factor f of the residual autoencoder (the diffusion's grid)."""
        return self.residual_ae.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.residual_ae.latent_channels

    @property
    def window_multiple(self) -> int:
        """Image sizes must be multiples of this for both paths."""
        return max(self.downsample_factor, self.restorer.downsample_factor)


class Restorer(nn.Module):
    """mu(LR) = decoder(0, LR features) + LR: a regression restorer, (B, 1, *sp) -> same."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.lr_encoder = _LRFeatures(cfg)
        self.decoder = _Decoder(cfg)
        if cfg.spatial_dims == 3:
            self.to(memory_format=torch.channels_last_3d)

    def forward(self, lr: Tensor) -> Tensor:
        f, c = self.config.downsample_factor, self.config.latent_channels
        z = lr.new_zeros(lr.shape[0], c, *(s // f for s in lr.shape[2:]))
        return self.decoder(z, self.lr_encoder(lr)) + lr


class RestorerAE(nn.Module):
    """The first stage of the LDM: :class:`Restorer` + the residual :class:`VAE`."""

    def __init__(self, config: RestorerAEConfig) -> None:
        super().__init__()
        self.config = config
        self.restorer = Restorer(config.restorer)
        self.residual_ae = VAE(config.residual_ae)
        fixed = config.residual_scale is not None
        # rms of the residual the autoencoder expects, s = 1 / residual_rms: measured during
        # training (saved with the weights) unless the config fixes s
        rms = 1.0 / float(config.residual_scale) if fixed else 1.0
        self.register_buffer("residual_rms", torch.tensor(rms), persistent=not fixed)

    @property
    def s(self) -> Tensor:
        """The autoencoder's working scale s = 1 / rms(HR - mu)."""
        return 1.0 / self.residual_rms

    def restore(self, lr: Tensor) -> Tensor:
        """The restorer's output mu(LR), (B, 1, *sp)."""
        return self.restorer(lr)

    def encode(self, residual: Tensor) -> tuple[Tensor, Tensor]:
        """``HR - mu`` (B, 1, *sp) -> (mean, logvar) of the latent, each (B, C, *sp / f)."""
        return self.residual_ae.encode(residual * self.s)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, C, *sp / f) -> the residual it stands for, D(z) (B, 1, *sp)."""
        return self.residual_ae.decode(z) / self.s

    def forward(
        self, lr: Tensor, hr: Tensor, generator: torch.Generator | None = None,
        stage: str = "joint",
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """Training pass: (mu, s r with r = HR - mu detached, s D(z) with z ~ q(z | s r), mean,
        logvar): the residual terms at the autoencoder's working scale s. ``stage``: "joint"
        (both nets) or "residual" (the restorer frozen: mu without gradients; r randomly
        flipped along each axis, the autoencoder's augmentation)."""
        if stage not in STAGES:
            raise ValueError(f"RestorerAE.forward: stage must be one of {STAGES}, got {stage!r}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage != "residual"):
            mu = self.restore(lr)
        r = hr - mu.detach()  # the autoencoder learns what the restorer misses
        if self.training and self.config.residual_scale is None:
            with torch.no_grad():  # s follows the restorer as it improves (momentum 0.05)
                self.residual_rms.lerp_(r.float().square().mean().sqrt(), RMS_MOMENTUM)
        if stage == "residual":
            coin = torch.rand(r.ndim - 2, generator=generator, device=r.device)
            dims = [2 + i for i in range(r.ndim - 2) if coin[i] < 0.5]
            r = r.flip(dims) if dims else r
        r = r * self.s
        r_hat, mean, logvar = self.residual_ae(r, sample=True, generator=generator)
        return mu, r, r_hat, mean, logvar


def space_to_depth(x: Tensor, f: int) -> Tensor:
    """(B, C, D, H, W) -> (B, C f^3, D / f, H / f, W / f) (2D: f^2), no information lost.

    How the full-resolution condition (mu, LR) reaches the latent grid of the UNet
    (pixel_unshuffle in 3D).
    """
    if f == 1:
        return x
    b, c, *sp = x.shape
    shape = [b, c]
    for s in sp:
        shape += [s // f, f]
    x = x.reshape(shape)
    nd = len(sp)
    perm = [0, 1] + [3 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
    return x.permute(perm).reshape(b, c * f**nd, *(s // f for s in sp))


def condition(mu: Tensor, lr: Tensor, f: int) -> Tensor:
    """The UNet's condition: space_to_depth of (mu, LR), (B, 2 f^3, *sp / f)."""
    return space_to_depth(torch.cat([mu, lr], dim=1), f).contiguous()


def condition_channels(cfg: RestorerAEConfig) -> int:
    return 2 * cfg.downsample_factor**cfg.spatial_dims


def gradient_l1(x: Tensor, target: Tensor) -> Tensor:
    """Sum over the spatial axes of the L1 between the finite differences of x and target."""
    return sum(F.l1_loss(x.diff(dim=d), target.diff(dim=d)) for d in range(2, x.ndim))


def l1_with_gradients(x: Tensor, target: Tensor, grad_weight: float) -> Tensor:
    """L1 plus ``grad_weight`` x L1 of the finite differences along each spatial axis (edges)."""
    loss = F.l1_loss(x, target)
    return loss + grad_weight * gradient_l1(x, target) if grad_weight > 0 else loss
