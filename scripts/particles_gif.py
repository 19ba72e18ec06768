"""particles_gif: random particles follow an image's score field until they rebuild it (GIF)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli import ConfigOption, OverwriteOption, SetOption, make_app, run_phase
from ldm.phases.particles_gif import ParticlesConfig, run_particles

app = make_app(__doc__)

ImageOption = Annotated[
    Optional[Path],  # noqa: UP045  (typer needs Optional on Python 3.10)
    typer.Option("--image", help="PNG/JPEG to rebuild; default: the config's image or built-in"),
]


@app.command(help=__doc__)
def main(
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    image: ImageOption = None,
) -> None:
    run_phase("particles_gif", ParticlesConfig, config, set_,
              lambda cfg: run_particles(cfg, overwrite=overwrite, image=image))  # fmt: skip


if __name__ == "__main__":
    app()
