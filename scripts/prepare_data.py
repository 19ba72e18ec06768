"""Phase 1: cut paired LR/HR volumes (or the built-in vessel phantoms) into a patch dataset."""

from __future__ import annotations

from ldm.cli import ConfigOption, OverwriteOption, SetOption, make_app, run_phase
from ldm.data.prepare import PrepareDataConfig, prepare_data

app = make_app(__doc__)


@app.command()
def main(
    config: ConfigOption = None, set_: SetOption = None, overwrite: OverwriteOption = False
) -> None:
    run_phase(
        "prepare_data", PrepareDataConfig, config, set_,
        lambda cfg: prepare_data(cfg, overwrite=overwrite),
    )  # fmt: skip


if __name__ == "__main__":
    app()
