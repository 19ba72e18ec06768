"""train_vae_pair: train the paired 3D VAE (LR -> HR denoiser, HR -> HR).

Same as `ldm3d train_vae_pair`; `--help` lists the options.
"""

from ldm.app import script_app

app = script_app("train_vae_pair")

if __name__ == "__main__":
    app()
