"""run_all: every phase in order on a profile (demo: configs/demo, default: configs).

Same as `ldm3d run_all`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("run_all")

if __name__ == "__main__":
    app()
