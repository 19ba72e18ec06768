"""``python -m ldm <phase> ...``: the same commands as ``ldm3d``."""

from ldm.app import main

main()
