"""The one validation layer of every config: range, choice and count checks with one message
style (``key must be ..., got value``). Raise ``ConfigError``; the config loader adds the file
and the section (``configs/x.yaml: train.steps must be >= 1, got 0``)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ldm.core.errors import ConfigError


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: object) -> str:
    return f"{value:g}" if _real(value) else repr(value)


def check_min(key: str, value: object, minimum: float, *, exclusive: bool = False) -> None:
    """``value >= minimum`` (or ``>`` when ``exclusive``)."""
    ok = _real(value) and (value > minimum if exclusive else value >= minimum)  # type: ignore[operator]
    if not ok:
        raise ConfigError(
            f"{key} must be {'>' if exclusive else '>='} {minimum:g}, got {_fmt(value)}"
        )


def check_range(key: str, value: object, lo: float, hi: float, *, hi_open: bool = False) -> None:
    """``lo <= value <= hi`` (``< hi`` when ``hi_open``)."""
    ok = _real(value) and lo <= value and (value < hi if hi_open else value <= hi)  # type: ignore[operator]
    if not ok:
        raise ConfigError(
            f"{key} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {_fmt(value)}"
        )


def check_int(key: str, value: object, minimum: int) -> None:
    """``value`` is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {_fmt(value)}")


def check_choice(key: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
