"""train_diffusion: train the conditional latent diffusion UNet.

Same as `ldm3d train_diffusion`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("train_diffusion")

if __name__ == "__main__":
    app()
