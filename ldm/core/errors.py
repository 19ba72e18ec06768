"""Errors a user can fix. Scripts print them as one line and exit with code 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or configuration: the message says what, which file and what to do."""


class ConfigError(UserError):
    """A YAML config or a --set override is wrong (unknown key, wrong type, bad value)."""


class DataError(UserError):
    """A volume or dataset on disk is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or belongs to a different model config."""


def os_error_message(e: OSError) -> str:
    """One line for an OS error on a user's path: which path, what happened, what to do."""
    where = e.filename if e.filename is not None else "a file"
    what = e.strerror or type(e).__name__
    fixes = {
        PermissionError: "fix its permissions or choose another location",
        NotADirectoryError: "a file stands where a folder is needed; choose another path",
        IsADirectoryError: "a folder stands where a file is needed; choose another path",
        FileExistsError: "remove it or choose another path",
        FileNotFoundError: "check the path",
    }
    fix = next((v for k, v in fixes.items() if isinstance(e, k)), "check the path and free space")
    return f"{where}: {what}; {fix}"
