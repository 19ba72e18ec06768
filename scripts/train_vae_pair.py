"""train_vae_pair: train the first stage (restorer mu(LR) + autoencoder of HR - mu).

Same as `ldm3d train_vae_pair`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("train_vae_pair")

if __name__ == "__main__":
    app()
