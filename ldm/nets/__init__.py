"""Networks: the KL autoencoder (:class:`VAE`) and the denoising UNet (:class:`UNet`).

Both work in 2D or 3D (``spatial_dims``) and are built from a frozen config dataclass, so a
checkpoint holding ``dataclasses.asdict(config)`` rebuilds the net from the file alone. They know
nothing of noise schedules.
"""

from __future__ import annotations

from ldm.nets.unet import UNet, UNetConfig
from ldm.nets.vae import VAE, VAEConfig, kl_divergence

__all__ = ["UNet", "UNetConfig", "VAE", "VAEConfig", "kl_divergence"]
