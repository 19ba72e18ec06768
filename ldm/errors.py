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
