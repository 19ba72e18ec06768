"""Errors a user can fix. Scripts print them as one line and exit with code 2."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class UserError(ValueError):
    """Bad input or configuration: the message says what, which file and what to do."""


class ConfigError(UserError):
    """A YAML config or a --set override is wrong (unknown key, wrong type, bad value)."""


class DataError(UserError):
    """A volume or dataset on disk is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or belongs to a different model config."""


def os_error_message(e: OSError, folder: str | os.PathLike | None = None) -> str:
    """One line for an OS error on a user's path: which path, what happened, what to do.

    ``folder``: where the command was writing (its out_dir), named when the error carries no
    path, as a write() on a full disk does."""
    if e.filename is not None:
        where = str(e.filename)
    else:
        where = f"writing in {folder}" if folder is not None else "a file"
    what = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):  # disk full, quota
        return f"{where}: {what}; free space on that disk (or choose another out_dir), then rerun"
    if isinstance(e, NotADirectoryError) and e.filename is not None:
        blocker = file_in_the_way(Path(e.filename))
        if blocker is not None:
            return f"{where}: {blocker} is a file, not a folder; choose another path"
    fixes = {
        PermissionError: "fix its permissions or choose another location",
        NotADirectoryError: "a file stands where a folder is needed; choose another path",
        IsADirectoryError: "a folder stands where a file is needed; choose another path",
        FileExistsError: "remove it or choose another path",
        FileNotFoundError: "check the path",
    }
    fix = next((v for k, v in fixes.items() if isinstance(e, k)), "check the path and free space")
    return f"{where}: {what}; {fix}"


def file_in_the_way(path: Path) -> Path | None:
    """``path`` or its first existing ancestor when that is a file, not a folder (else None)."""
    for p in (path, *path.parents):
        if p.exists():
            return p if not p.is_dir() else None
    return None
