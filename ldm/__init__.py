"""ldm3d: 3D latent diffusion for cleaner, sharper medical volumes."""

__version__ = "0.1.0"
