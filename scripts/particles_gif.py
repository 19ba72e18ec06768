"""particles_gif: particles follow an image's score field until they rebuild it (GIF).

Same as `ldm3d particles_gif`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("particles_gif")

if __name__ == "__main__":
    app()
