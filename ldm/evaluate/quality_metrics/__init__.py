"""Quality metrics beyond PSNR/SSIM: sharpness, frequency content, and uncertainty calibration.

PSNR and SSIM (``ldm.evaluate.metrics``) reward a blurred output that sits near the conditional
mean. The metrics here say *what* was lost or kept:

* ``sharpness``: ``edge_sharpness_ratio`` (gradient magnitude on the target's edges), and the
  frequency content: ``high_frequency_energy_ratio``, ``fourier_shell_correlation``,
  ``high_band_fsc``, with ``cutoff_for_blur`` to place the cutoff where a known blur halves the
  contrast;
* ``uncertainty``: from N posterior samples, ``variance_to_error_ratio`` and ``sparsification``
  (AUSE); the latent bottleneck, ``latent_sensitivity``.

Every function takes numpy arrays or torch tensors (``inputs``), works in float64 on the CPU, and
returns Python floats or numpy arrays. Bad input (shape mismatch, NaN or inf, an undefined ratio)
raises ``UserError``.
"""

from ldm.evaluate.quality_metrics.sharpness import (
    cutoff_for_blur,
    edge_sharpness_ratio,
    fourier_shell_correlation,
    high_band_fsc,
    high_frequency_energy_ratio,
)
from ldm.evaluate.quality_metrics.uncertainty import (
    latent_sensitivity,
    sparsification,
    variance_to_error_ratio,
)

__all__ = [
    "cutoff_for_blur",
    "edge_sharpness_ratio",
    "fourier_shell_correlation",
    "high_band_fsc",
    "high_frequency_energy_ratio",
    "latent_sensitivity",
    "sparsification",
    "variance_to_error_ratio",
]
