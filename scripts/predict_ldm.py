"""predict_ldm: the whole LDM on test volumes or your own scan (--input).

Same as `ldm3d predict_ldm`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("predict_ldm")

if __name__ == "__main__":
    app()
