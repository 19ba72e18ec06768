"""Entry points: the typer app (ldm3d, python -m ldm, scripts/), its shared options, run_all."""
