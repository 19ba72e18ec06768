"""Networks: the KL autoencoder (:class:`VAE3d`) and the denoising UNet (:class:`UNet3d`).

Both work in 2D or 3D (``spatial_dims``) and are built from a frozen config dataclass, so a
checkpoint holding ``dataclasses.asdict(config)`` rebuilds the net from the file alone. They know
nothing of noise schedules.
"""

from __future__ import annotations

from ldm.nets.unet import UNet3d, UNetConfig
from ldm.nets.vae import VAE3d, VAEConfig, kl_divergence

__all__ = ["UNet3d", "UNetConfig", "VAE3d", "VAEConfig", "kl_divergence"]
