"""The one CLI layer every phase script shares: --config, --set, --overwrite, errors -> exit 2."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.errors import UserError, os_error_message
from ldm.core.pipeline import PhaseResult

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
    """configs/<phase>.yaml of the current folder, else of the checkout (see REPO_ROOT)."""
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


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line and return the exit (code 2) to raise."""
    typer.echo(f"error: {message}" if code == 2 else message, err=True)
    return typer.Exit(code)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A ``UserError`` (bad config, missing input, ...) or an ``OSError`` (an unwritable output
    folder, a file where a folder should be, ...) inside becomes one line on stderr and its exit
    code (2; 130 for an interrupted run); LDM_DEBUG=1 shows the traceback instead."""
    try:
        yield
    except UserError as e:
        if os.environ.get("LDM_DEBUG"):
            raise
        raise fail(str(e), getattr(e, "exit_code", 2)) from None
    except OSError as e:
        if os.environ.get("LDM_DEBUG"):
            raise
        raise fail(os_error_message(e)) from None


def run_phase(
    phase: str,
    cls: type[T],
    config: Path | None,
    overrides: list[str] | None,
    fn: Callable[[T], PhaseResult],
) -> PhaseResult:
    """Load the phase config, run ``fn`` on it and print its summary; errors as
    :func:`one_line_errors`, Ctrl-C outside a training loop as one line and exit code 130."""
    setup_logging()
    out_dir = None
    with one_line_errors():
        try:
            cfg = load_config(cls, config or default_config_path(phase), overrides or [])
            out_dir = getattr(cfg, "out_dir", None)
            if out_dir is not None:  # relative paths resolve against the current folder
                typer.echo(f"{phase}: output folder {out_dir}", err=True)
            with logging_redirect_tqdm():  # log lines above the progress bars, not through them
                result = fn(cfg)
        except KeyboardInterrupt:  # a training loop saves and raises Interrupted itself
            where = f"; {out_dir} is as it was" if out_dir is not None else ""
            raise fail(f"{phase} interrupted{where}", 130) from None
    typer.echo(result.text)
    return result


def make_app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, help=help_text, pretty_exceptions_enable=False)
