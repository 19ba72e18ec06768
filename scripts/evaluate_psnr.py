"""evaluate_psnr: the restorer and the oracle against tuned classical filters on the test volumes.

Same as `ldm3d evaluate_psnr`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("evaluate_psnr")

if __name__ == "__main__":
    app()
