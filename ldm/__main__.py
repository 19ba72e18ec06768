"""``python -m ldm <phase> ...``: the same commands as ``ldm3d``."""

from ldm.cli.app import main

main()
