"""ddim_similar_noise: similar starting noises under deterministic DDIM; forward/backward.

Same as `ldm3d ddim_similar_noise`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("ddim_similar_noise")

if __name__ == "__main__":
    app()
