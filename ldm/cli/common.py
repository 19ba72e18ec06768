"""The one CLI layer every phase script shares: --config, --set, --overwrite, errors -> exit 2."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from tqdm.contrib.logging import logging_redirect_tqdm
from typer.core import TyperCommand, TyperGroup

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.errors import ConfigError, UserError, file_in_the_way, os_error_message
from ldm.core.registry import PhaseResult

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
def one_line_errors(where: list[Path | None] | None = None) -> Iterator[None]:
    """A ``UserError`` (bad config, missing input, ...) or an ``OSError`` (an unwritable output
    folder, a file where a folder should be, ...) inside becomes one line on stderr and its exit
    code (2; 130 for an interrupted run); LDM_DEBUG=1 shows the traceback instead.

    ``where``: a one-item list the caller fills with the output folder once it knows it; an OS
    error that names no file (a write() on a full disk) is then reported for that folder."""
    try:
        yield
    except UserError as e:
        if os.environ.get("LDM_DEBUG"):
            raise
        raise fail(str(e), getattr(e, "exit_code", 2)) from None
    except OSError as e:
        if os.environ.get("LDM_DEBUG"):
            raise
        raise fail(os_error_message(e, where[0] if where else None)) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler stopping the job) outside a training loop: raised in the
    main thread like Ctrl-C, so the ``finally`` blocks drop staged outputs and temp folders."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises :class:`Terminated` in the main thread (by default Python dies at
    once and leaves the staged output folder behind). A training loop installs its own handler
    on top (ldm.train.run_dir.deferred_interrupts: save at the end of the step) and restores
    this one after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum, _frame) -> None:
        raise Terminated

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _config_path(phase: str, config: Path | None) -> Path:
    """The --config file, or configs/<phase>.yaml; a folder is an error naming the file meant."""
    path = config or default_config_path(phase)
    if path.is_dir():
        inside = path / f"{phase}.yaml"
        hint = f"--config {inside}" if inside.is_file() else (
            f"a YAML file such as configs/<profile>/{phase}.yaml")  # fmt: skip
        raise ConfigError(f"{path} is a folder, not a config file; pass {hint}")
    return path


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
    where: list[Path | None] = [None]
    with one_line_errors(where), sigterm_as_interrupt():
        try:
            cfg = load_config(cls, _config_path(phase, config), overrides or [])
            out_dir = where[0] = getattr(cfg, "out_dir", None)
            if out_dir is not None:  # relative paths resolve against the current folder
                typer.echo(f"{phase}: output folder {out_dir}", err=True)
                blocker = file_in_the_way(Path(out_dir).parent)
                if blocker is not None:
                    raise UserError(
                        f"{blocker} is a file, not a folder, so out_dir {out_dir} cannot be "
                        f"made below it; choose another out_dir"
                    )
            with logging_redirect_tqdm():  # log lines above the progress bars, not through them
                result = fn(cfg)
        except KeyboardInterrupt as e:  # a training loop saves and raises Interrupted itself
            how = " (SIGTERM)" if isinstance(e, Terminated) else ""
            where_ = f"; {out_dir} is as it was" if out_dir is not None else ""
            raise fail(f"{phase} interrupted{how}{where_}", 130) from None
    typer.echo(result.text)
    return result


# click's UsageError, or typer's vendored copy of it (typer._click in recent typer versions)
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _usage_exit(e: Exception, command_path: str) -> typer.Exit:
    """A usage error (unknown option, missing value or argument, unknown command) as one
    ``error:`` line with the --help to run, exit 2 (click/typer would draw a 5-line box)."""
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else command_path
    message = e.format_message().rstrip(".")  # type: ignore[attr-defined]
    return fail(f"{message} (run '{path} --help' for the options)")


def _path(info_name: str | None, parent) -> str:
    """The command path of a context being made (``ldm3d predict_ldm``)."""
    name = info_name or "ldm3d"
    return f"{parent.command_path} {name}" if parent is not None else name


class _OneLineUsage:
    """Usage errors of this command while its arguments are parsed as one ``error:`` line."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        try:
            return super().make_context(info_name, args, parent, **extra)  # type: ignore[misc]
        except _UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the help itself, not an error
                raise
            raise _usage_exit(e, _path(info_name, parent)) from None


class OneLineUsageCommand(_OneLineUsage, TyperCommand):
    """A command whose usage errors are one ``error:`` line (see ``_usage_exit``)."""


class OneLineUsageGroup(_OneLineUsage, TyperGroup):
    """The ``ldm3d`` group: usage errors, an unknown command included, as one line."""

    def resolve_command(self, ctx, args):  # type: ignore[override]
        try:
            return super().resolve_command(ctx, args)
        except _UsageError as e:
            raise _usage_exit(e, ctx.command_path) from None


class _App(typer.Typer):
    """A Typer app whose commands (and the group) give one-line usage errors."""

    def command(self, *args, **kwargs):  # type: ignore[override]
        kwargs.setdefault("cls", OneLineUsageCommand)
        return super().command(*args, **kwargs)


def make_app(help_text: str) -> typer.Typer:
    return _App(add_completion=False, help=help_text, pretty_exceptions_enable=False,
                cls=OneLineUsageGroup)  # fmt: skip
