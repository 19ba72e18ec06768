"""The one CLI layer every phase script shares: --config, --set, --overwrite, errors -> exit 2."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.config import REPO_ROOT, load_config
from ldm.errors import UserError
from ldm.phase import PhaseResult

T = TypeVar("T")

ConfigOption = Annotated[
    Optional[Path],  # noqa: UP045  (typer needs Optional on Python 3.10)
    typer.Option("--config", "-c", help="YAML config; default configs/<phase>.yaml"),
]
SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--set", "-s", help="override a key: --set train.steps=200 (YAML value); repeat"),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="replace this phase's existing outputs")
]


def default_config_path(phase: str) -> Path:
    return REPO_ROOT / "configs" / f"{phase}.yaml"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners swap it), not the one at setup."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        """Ignored: the stream is always the current sys.stderr."""


def setup_logging() -> None:
    """INFO logs to stderr in a short format (tqdm bars go to stderr as well)."""
    level = os.environ.get("LDM_LOG_LEVEL", "INFO").upper()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def fail(message: str) -> typer.Exit:
    """Print one error line and return the exit (code 2) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def run_phase(
    phase: str,
    cls: type[T],
    config: Path | None,
    overrides: list[str] | None,
    fn: Callable[[T], PhaseResult],
) -> PhaseResult:
    """Load the phase config, run ``fn`` on it and print its summary.

    A ``UserError`` (bad config, missing input, ...) becomes one line on stderr and exit code 2;
    set LDM_DEBUG=1 to see the traceback instead.
    """
    setup_logging()
    try:
        cfg = load_config(cls, config or default_config_path(phase), overrides or [])
        with logging_redirect_tqdm():  # log lines above the progress bars, not through them
            result = fn(cfg)
    except UserError as e:
        if os.environ.get("LDM_DEBUG"):
            raise
        raise fail(str(e)) from None
    typer.echo(result.text)
    return result


def make_app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, help=help_text, pretty_exceptions_enable=False)


def phase_app(name: str, help_text: str) -> typer.Typer:
    """The standard script of a registered phase: --config, --set, --overwrite, nothing else."""
    from ldm.pipeline import get_phase

    phase = get_phase(name)
    app = make_app(help_text)

    @app.command(help=help_text)
    def main(
        config: ConfigOption = None, set_: SetOption = None, overwrite: OverwriteOption = False
    ) -> None:
        run_phase(name, phase.config_cls(), config, set_,
                  lambda cfg: phase.run_fn()(cfg, overwrite=overwrite))  # fmt: skip

    return app
