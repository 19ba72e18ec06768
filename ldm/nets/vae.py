"""KL autoencoder (the "VAE" of latent diffusion, Rombach et al. 2022, sec. 3), 2D or 3D.

Built for a 2-core CPU first: the encoder has only a thin stem at full resolution and goes down
with strided convs at once; the decoder ends with one full-resolution residual block so it can
still draw fine detail (vessel edges). Shapes are written for 3D, ``(B, C, D, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.core.errors import UserError
from ldm.core.validate import check_int
from ldm.nets.blocks import (
    Downsample,
    ResBlock,
    Upsample,
    as_channel_tuple,
    check_input,
    check_spatial_dims,
    conv3x3,
    conv_nd,
)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of :class:`VAE`; plain fields so ``VAEConfig(**asdict(cfg)) == cfg``.

    ``channels`` is the width per resolution level, full resolution first; the downsampling
    factor is ``f = 2 ** (len(channels) - 1)``. ``num_res_blocks`` residual blocks run at every
    level below full resolution (in encoder and decoder); full resolution has a stem conv in the
    encoder and one residual block at the end of the decoder.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    norm_groups: int = 8
    # The decoder also sees the LR image (docs/design.md "LR-aware decoder"): ``lr_skip`` adds
    # features of a small LR encoder at every decoder level (StableSR-like feature wrapping);
    # ``residual`` adds the decoder output to the LR image. Both off = the plain KL autoencoder
    # (and the layout of checkpoints written before these keys existed).
    lr_skip: bool = False
    residual: bool = False

    def __post_init__(self) -> None:
        check_spatial_dims("VAEConfig", self.spatial_dims)
        for name in ("lr_skip", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"VAEConfig.{name}: expected true or false")
        if self.residual and self.in_channels != self.out_channels:
            raise UserError("VAEConfig.residual needs in_channels == out_channels")
        for name in ("in_channels", "out_channels", "latent_channels", "norm_groups"):
            check_int(f"VAEConfig.{name}", getattr(self, name), 1)
        check_int("VAEConfig.num_res_blocks", self.num_res_blocks, 0)
        channels = as_channel_tuple("VAEConfig", self.channels, self.norm_groups)
        object.__setattr__(self, "channels", channels)  # a list from YAML/JSON -> tuple

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling factor ``f`` between image and latent."""
        return 2 ** (len(self.channels) - 1)

    @property
    def uses_lr(self) -> bool:
        """True when ``decode`` needs the LR image besides the latent."""
        return self.lr_skip or self.residual


class _Encoder(nn.Module):
    """``(B, Cin, D, H, W) -> (B, 2 * latent, D/f, H/f, W/f)`` (mu and logvar stacked)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        sd, ch, g = cfg.spatial_dims, cfg.channels, cfg.norm_groups
        self.stem = conv3x3(sd, cfg.in_channels, ch[0])  # the only full-resolution layer
        layers: list[nn.Module] = []
        for level in range(1, len(ch)):
            layers.append(Downsample(sd, ch[level - 1], ch[level]))
            layers += [ResBlock(sd, ch[level], ch[level], g) for _ in range(cfg.num_res_blocks)]
        layers.append(ResBlock(sd, ch[-1], ch[-1], g))  # middle block at the latent resolution
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, ch[-1])
        self.conv_out = conv3x3(sd, ch[-1], 2 * cfg.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.stem(x))  # (B, ch[-1], D/f, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    """``(B, latent, D/f, H/f, W/f) -> (B, Cout, D, H, W)``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        sd, ch, g = cfg.spatial_dims, cfg.channels, cfg.norm_groups
        layers: list[nn.Module] = [conv3x3(sd, cfg.latent_channels, ch[-1])]
        layers.append(ResBlock(sd, ch[-1], ch[-1], g))  # middle block at the latent resolution
        for level in range(len(ch) - 1, 0, -1):
            layers += [ResBlock(sd, ch[level], ch[level], g) for _ in range(cfg.num_res_blocks)]
            layers.append(Upsample(sd, ch[level], ch[level - 1]))
        layers.append(ResBlock(sd, ch[0], ch[0], g))  # final full-resolution block: fine detail
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, ch[0])
        # 1x1 output conv: the block above gives the spatial context, and a 3x3x3 conv to a
        # single channel is as slow on CPU as a full 16 -> 16 one.
        self.conv_out = conv_nd(sd, ch[0], cfg.out_channels, 1)
        self.fuse: nn.ModuleList | None = None
        if cfg.lr_skip:  # one 1x1 conv per level: h += fuse(cat(h, LR features)), latent first
            self.fuse = nn.ModuleList(conv_nd(sd, 2 * c, c, 1) for c in reversed(ch))

    def forward(self, z: Tensor, skips: list[Tensor] | None = None) -> Tensor:
        """``skips``: LR features per level, full resolution first (``lr_skip`` only)."""
        if self.fuse is None or skips is None:
            h = self.body(z)  # (B, ch[0], D, H, W)
        else:
            level = len(skips) - 1
            h = z
            for i, layer in enumerate(self.body):
                h = layer(h)
                if i == 0 or isinstance(layer, Upsample):  # entered a new level
                    h = h + self.fuse[len(skips) - 1 - level](torch.cat([h, skips[level]], 1))
                    level -= 1
        return self.conv_out(F.silu(self.norm_out(h)))


class _LRFeatures(nn.Module):
    """LR image -> features at every level, full resolution first: the decoder's LR path.

    A stem and one residual block at full resolution (where the detail the latent cannot hold
    lives), then one strided conv per level down to the latent resolution.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        sd, ch, g = cfg.spatial_dims, cfg.channels, cfg.norm_groups
        self.stem = conv3x3(sd, cfg.in_channels, ch[0])
        self.block = ResBlock(sd, ch[0], ch[0], g)
        self.down = nn.ModuleList(Downsample(sd, ch[i - 1], ch[i]) for i in range(1, len(ch)))

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.block(self.stem(x))
        feats = [h]
        for down in self.down:
            h = down(F.silu(h))
            feats.append(h)
        return feats


class VAE(nn.Module):
    """KL autoencoder with GroupNorm + SiLU residual blocks; 2D or 3D by ``config.spatial_dims``.

    Knows nothing of training losses beyond :func:`kl_divergence`; ``decode(encode(x))`` may map
    a low-quality input to a high-quality output when trained on pairs.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.lr_encoder = _LRFeatures(config) if config.lr_skip else None
        if config.spatial_dims == 3:
            # channels-last 3D weights (the activations follow): a VAE training step on 2 CPU
            # cores takes 0.66 s instead of 0.78 s (README, Benchmark); not faster for the UNet
            self.to(memory_format=torch.channels_last_3d)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, Cin, D, H, W)`` -> ``(mu, logvar)``, each ``(B, latent, D/f, H/f, W/f)``.

        ``logvar`` is clamped to ``[-30, 20]`` so ``exp`` stays finite.
        """
        cfg = self.config
        check_input("VAE.encode", x, cfg.spatial_dims, cfg.in_channels, cfg.downsample_factor)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Tensor, lr: Tensor | None = None) -> Tensor:
        """``z (B, latent, d, h, w)`` -> ``(B, Cout, f*d, f*h, f*w)``.

        ``lr (B, Cin, f*d, f*h, f*w)``, the LR image, is required when ``config.uses_lr`` (and
        ignored otherwise): the decoder's full-resolution path and/or the residual's base.
        """
        cfg = self.config
        check_input("VAE.decode", z, cfg.spatial_dims, cfg.latent_channels, 1)
        if not cfg.uses_lr:
            return self.decoder(z)
        if lr is None:
            raise ValueError(
                "VAE.decode: this VAE (lr_skip/residual) decodes with the LR image; pass lr"
            )
        want = tuple(s * cfg.downsample_factor for s in z.shape[2:])
        check_input("VAE.decode(lr)", lr, cfg.spatial_dims, cfg.in_channels, 1)
        if tuple(lr.shape[2:]) != want or lr.shape[0] != z.shape[0]:
            raise ValueError(
                f"VAE.decode: lr shape {tuple(lr.shape)} does not match the latent "
                f"{tuple(z.shape)} (expected spatial size {want})"
            )
        skips = self.lr_encoder(lr) if self.lr_encoder is not None else None
        out = self.decoder(z, skips)
        return out + lr if cfg.residual else out

    def forward(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None,
        lr: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Encode, draw ``z = mu + exp(logvar / 2) * eps`` (or ``z = mu`` when not ``sample``),
        decode (with ``lr``, default ``x`` itself, when ``config.uses_lr``); returns
        ``(recon, mu, logvar)``.

        Reparameterisation trick of Kingma & Welling 2014, sec. 2.4; ``eps`` from ``generator``.
        """
        mu, logvar = self.encode(x)
        z = mu
        if sample:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z, x if lr is None else lr), mu, logvar


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL( N(mu, exp(logvar)) || N(0, I) ), averaged over every element (batch, channels, voxels).

    Closed form per element (Kingma & Welling 2014, appendix B):
    ``0.5 * (mu^2 + exp(logvar) - 1 - logvar)``. The mean (not the sum) keeps the value, and so the
    KL weight, independent of batch and patch size; multiply by ``mu[0].numel()`` for the
    per-sample sum of the paper.
    """
    if mu.shape != logvar.shape:
        raise ValueError(
            f"kl_divergence: mu and logvar must have the same shape, got {tuple(mu.shape)} "
            f"and {tuple(logvar.shape)}"
        )
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()
