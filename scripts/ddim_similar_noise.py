"""Visual experiment: similar start noise -> similar DDIM output; eta=0 determinism; noising the
HR latent to t and denoising back. Writes GIFs, PNGs and metrics.json under out_dir.
"""

from ldm.cli import phase_app

app = phase_app("ddim_similar_noise", __doc__)

if __name__ == "__main__":
    app()
