"""Phase 5: the trained LDM on whole test volumes (or your own volume with --input).

Writes results/ldm_prediction/<case>/1_input_LR.png, 2_target_HR.png, 3_output_LDM.png, the
output volume in the input's format and original intensity units, and metrics.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli import ConfigOption, OverwriteOption, SetOption, make_app, run_phase
from ldm.phases.predict_ldm import PredictConfig, predict_ldm

app = make_app(__doc__)


@app.command(help=__doc__)
def main(
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    input_path: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--input", help="a 3D LR volume (.nii.gz, .raw+.mhd, .npy); no HR needed"),
    ] = None,
) -> None:
    run_phase("predict_ldm", PredictConfig, config, set_,
              lambda cfg: predict_ldm(cfg, overwrite=overwrite, input_path=input_path))  # fmt: skip


if __name__ == "__main__":
    app()
