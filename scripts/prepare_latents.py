"""Phase 3: encode every LR/HR patch with the trained VAE into latents + one scale factor."""

from ldm.cli import phase_app

app = phase_app("prepare_latents", __doc__)

if __name__ == "__main__":
    app()
