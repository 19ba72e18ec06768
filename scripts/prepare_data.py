"""Phase 1: cut paired LR/HR volumes (or the built-in vessel phantoms) into a patch dataset."""

from ldm.cli import phase_app

app = phase_app("prepare_data", __doc__)

if __name__ == "__main__":
    app()
