"""What every phase returns, so scripts print it and run_all reports it the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PhaseResult:
    """Outcome of one phase run.

    text: the multi-line summary the phase's script prints.
    key: one short string for run_all's one-line-per-phase report (e.g. "PSNR 31.2 dB").
    metrics: numbers worth keeping (also written to the phase's metrics.json where it has one).
    outputs: the main files or folders the phase wrote.
    """

    text: str
    key: str
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
