"""benchmark: speed and memory of the hot paths (not a test); writes benchmark.json.

Same as `ldm3d benchmark`; `--help` lists the options.
"""

from ldm.cli.app import script_app

app = script_app("benchmark")

if __name__ == "__main__":
    app()
