"""Phase 2: train the paired 3D VAE (encode LR, decode HR); resumes from the last checkpoint.

Multi-GPU: torchrun --nproc_per_node=N scripts/train_vae_pair.py [--config ...]
"""

from ldm.cli import phase_app

app = phase_app("train_vae_pair", __doc__)

if __name__ == "__main__":
    app()
