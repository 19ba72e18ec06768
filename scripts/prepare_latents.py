"""prepare_latents: restorer output and residual latent of every patch + one scale factor.

Same as `ldm3d prepare_latents`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("prepare_latents")

if __name__ == "__main__":
    app()
