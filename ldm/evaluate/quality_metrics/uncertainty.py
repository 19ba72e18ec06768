"""Uncertainty of sampled outputs and what the latent can change.

* ``variance_to_error_ratio`` and ``sparsification`` (AUSE): whether the spread of N posterior
  samples matches, and ranks, the error of their mean;
* ``latent_sensitivity`` (S): how far a perfect latent could move the output, relative to the
  error the restorer still has.
"""

from __future__ import annotations

import numpy as np

from ldm.core.errors import UserError
from ldm.evaluate.quality_metrics.inputs import ArrayLike, _as_arrays


def _check_std(std: np.ndarray, name: str) -> None:
    if (std < 0).any():
        raise UserError(f"{name}: std must be >= 0 everywhere, got a minimum of {std.min()}")


def variance_to_error_ratio(std: ArrayLike, mean: ArrayLike, target: ArrayLike) -> float:
    """Variance-to-error ratio mean(std^2) / mean((mean - target)^2) over all voxels.

    ``std`` and ``mean`` are the per-voxel standard deviation and mean of N posterior samples.
    If the target were one more draw from the same distribution (calibrated samples),
    E[(mean - target)^2] = sigma^2 (1 + 1 / N) while the unbiased sample variance (ddof=1) has
    E[std^2] = sigma^2, so the ideal ratio is N / (N + 1) (with ddof=0 it is (N - 1) / (N + 1)).
    Below that the samples are over-confident, above it under-confident. Any shape is accepted.
    """
    name = "variance_to_error_ratio"
    s, m, t = _as_arrays(name, False, std=std, mean=mean, target=target)
    _check_std(s, name)
    err = float(np.mean((m - t) ** 2))
    if err == 0.0:
        raise UserError(f"{name}: mean equals target everywhere, so the ratio is undefined")
    return float(np.mean(s**2)) / err


def _sparsification_curve(err: np.ndarray, order: np.ndarray, steps: int) -> np.ndarray:
    """MSE of the voxels left after removing the first floor(i n / steps) of ``order``, i < steps.

    Normalised by the MSE of all voxels (i = 0).
    """
    n = err.size
    suffix = np.cumsum(err[order][::-1])[::-1]  # suffix[j] = sum of err[order][j:]
    removed = np.array([i * n // steps for i in range(steps)], dtype=np.int64)
    mse = suffix[removed] / (n - removed)
    return mse / mse[0]


def sparsification(
    std: ArrayLike, mean: ArrayLike, target: ArrayLike, steps: int = 20, seed: int = 0
) -> dict[str, float | np.ndarray]:
    """Sparsification curves and the area under the sparsification error (AUSE).

    The squared error e = (mean - target)^2 per voxel. For the fractions f = i / steps,
    i = 0 .. steps - 1, remove the fraction f of voxels (floor(f n) of them) ranked by
    decreasing ``std`` and compute the MSE of the rest; the same with voxels ranked by
    decreasing true error e gives the oracle curve, the best any uncertainty ranking can do.
    Both curves are divided by the MSE of all voxels (their value at f = 0). An uncertainty
    that ranks errors well gives a by_std curve that falls like the oracle.

    ``ause`` = mean over the ``steps`` fractions of (by_std - by_error): a plain mean, i.e. the
    left Riemann sum of the area on [0, 1); 0 is perfect. ``ause_random`` is the same area for
    a uniformly random ranking (``np.random.default_rng(seed)``), about the area between the
    constant curve 1 and the oracle: an uninformative std scores near it. Ties in std (and in
    e) keep the voxels' raster order (stable sort).

    Returns {"ause", "ause_random", "fractions", "by_std", "by_error"}; the last three are
    arrays of length ``steps``. Any shape is accepted.
    """
    name = "sparsification"
    s, m, t = _as_arrays(name, False, std=std, mean=mean, target=target)
    _check_std(s, name)
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise UserError(f"{name}: steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    err = ((m - t) ** 2).reshape(-1)
    if float(err.sum()) == 0.0:
        raise UserError(f"{name}: mean equals target everywhere, so the curves are undefined")
    by_std = _sparsification_curve(err, np.argsort(-s.reshape(-1), kind="stable"), steps)
    by_error = _sparsification_curve(err, np.argsort(-err, kind="stable"), steps)
    random_order = np.random.default_rng(seed).permutation(err.size)
    by_random = _sparsification_curve(err, random_order, steps)
    return {
        "ause": float(np.mean(by_std - by_error)),
        "ause_random": float(np.mean(by_random - by_error)),
        "fractions": np.arange(steps) / steps,
        "by_std": by_std,
        "by_error": by_error,
    }


# --------------------------------------------------------------------------------------------
# latent bottleneck


def latent_sensitivity(
    decoded_hr_latent: ArrayLike,
    decoded_cond_latent: ArrayLike,
    target: ArrayLike,
    restorer: ArrayLike,
) -> float:
    """Latent sensitivity S = sum (a - b)^2 / sum (target - restorer)^2.

    a = the decoded oracle latent z_HR = E(HR - mu) (restorer + D(z_HR)) and b = the decoded
    latent to compare (a sample, or z = 0), both added to the same restorer output. The
    numerator is how much the output can change if the diffusion moved the latent all the way
    to z_HR, the denominator
    the squared error the restorer (the output being judged) still has. S << 1: even a perfect
    latent changes the output by far less than the remaining error, so the latent path (and
    diffusion in it) cannot fix much; the decoder's other inputs dominate. Any shape is
    accepted.
    """
    name = "latent_sensitivity"
    a, b, t, r = _as_arrays(
        name,
        False,
        decoded_hr_latent=decoded_hr_latent,
        decoded_cond_latent=decoded_cond_latent,
        target=target,
        restorer=restorer,
    )
    den = float(np.sum((t - r) ** 2))
    if den == 0.0:
        raise UserError(
            f"{name}: restorer equals target everywhere, so its remaining error (the "
            "denominator) is 0 and S is undefined"
        )
    return float(np.sum((a - b) ** 2)) / den
