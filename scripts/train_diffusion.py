"""Phase 4: train the conditional latent diffusion UNet (LR latent -> HR latent); resumes.

Multi-GPU: torchrun --nproc_per_node=N scripts/train_diffusion.py [--config ...]
"""

from ldm.cli import phase_app

app = phase_app("train_diffusion", __doc__)

if __name__ == "__main__":
    app()
