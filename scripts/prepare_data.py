"""prepare_data: volumes or the phantom -> normalised LR/HR patch dataset, split by case.

Same as `ldm3d prepare_data`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("prepare_data")

if __name__ == "__main__":
    app()
