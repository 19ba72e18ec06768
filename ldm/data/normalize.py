"""Intensity normalisation: LR percentiles map to [0, 1] (only LR exists at inference)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm.core.errors import ConfigError, DataError


@dataclass(frozen=True)
class NormalizeConfig:
    """Map LR percentiles [low, high] to [0, 1]; the same map is applied to HR."""

    low_percentile: float = 0.5
    high_percentile: float = 99.5

    def __post_init__(self) -> None:
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ConfigError(
                "normalize: need 0 <= low_percentile < high_percentile <= 100, got "
                f"{self.low_percentile}, {self.high_percentile}"
            )


def normalisation(lr: np.ndarray, cfg: NormalizeConfig, where: str) -> tuple[float, float]:
    """LR percentiles (low, high); ``where`` names the file in the error for a constant volume."""
    low, high = np.percentile(lr, [cfg.low_percentile, cfg.high_percentile])
    if not high > low:
        raise DataError(
            f"{where}: the LR volume is constant between the normalisation percentiles "
            f"({cfg.low_percentile}, {cfg.high_percentile}); check the file or widen normalize"
        )
    return float(low), float(high)
