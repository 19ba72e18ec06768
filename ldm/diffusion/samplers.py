"""Stateless DDPM and DDIM samplers: small pure functions, the schedule is passed in.

Every model is called as ``model(x, t, **extra_args)`` with ``t`` a LongTensor (B,) of 0-based
timesteps and returns a tensor shaped like ``x`` (epsilon or v, per ``schedule.prediction_type``).
``t_prev = -1`` is the clean end of the chain, where alpha-bar = 1. Nothing is clipped: samples
live in an unbounded latent space.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.core.errors import UserError
from ldm.diffusion.schedule import Model, NoiseSchedule, model_output_to_x0_eps, noise_like

SPACINGS = ("trailing", "leading", "linspace")
Callback = Callable[[dict[str, Any]], None]


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be an integer, got {value!r}")
    return int(value)


def make_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "trailing", t_start: int | None = None
) -> list[int]:
    """Descending timesteps for a ``steps``-step sampler (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Table 2).

    The steps cover [0, t_top], t_top = ``t_start`` if given (img2img, forward/backward runs) else
    T - 1. With n = t_top + 1: "trailing" = round(n - i n / steps) - 1 (starts at t_top);
    "linspace" = round(i t_top / (steps - 1)) (both ends); "leading" = i (n // steps) (never reaches
    t_top). E.g. T = 1000, 10 steps: trailing 999, 899, ..., 99; leading 900, ..., 0.
    """
    T = _as_int("num_train_timesteps", num_train_timesteps)
    if T < 1:
        raise UserError(f"num_train_timesteps must be an integer >= 1, got {T}")
    if spacing not in SPACINGS:
        raise UserError(
            f"unknown timestep spacing {spacing!r}; expected one of: {', '.join(SPACINGS)}"
        )
    t_top = T - 1 if t_start is None else _as_int("t_start", t_start)
    if not 0 <= t_top < T:
        raise UserError(f"t_start must be an integer in [0, {T - 1}], got {t_start!r}")
    n = t_top + 1
    steps = _as_int("steps", steps)
    if not 1 <= steps <= n:
        where = f"t_start + 1 = {n}" if t_start is not None else f"num_train_timesteps = {T}"
        raise UserError(f"steps must be an integer in [1, {where}], got {steps!r}")
    # exact rationals, rounded half to even like np.round; the float formulas of diffusers can be
    # off by one at exact halves and (trailing) even return steps + 1 entries
    if spacing == "trailing":
        ts = [round(Fraction(n * (steps - i), steps)) - 1 for i in range(steps)]
    elif spacing == "linspace":
        ts = [0] if steps == 1 else [round(Fraction(t_top * i, steps - 1)) for i in range(steps)]
        ts.reverse()
    else:
        if t_start is not None:
            # leading never reaches t_top: the model would be told a smaller t than x is at
            raise UserError(
                "spacing 'leading' cannot start at t_start (its first step is below it); "
                "use trailing or linspace"
            )
        ts = [i * (n // steps) for i in reversed(range(steps))]
    if not (all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0 and ts[0] <= t_top):
        raise ValueError(f"{steps} {spacing} steps give no strictly decreasing timesteps: {ts}")
    return ts


def _alpha_cumprod(schedule: NoiseSchedule, t: int) -> float:
    """abar_t as a Python float (float64), with abar_{-1} = 1."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def ddim_sigma(schedule: NoiseSchedule, t: int, t_prev: int, eta: float) -> Tensor:
    """DDIM eq. 16: sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).

    ``t_prev = -1`` means abar_prev = 1 (sigma = 0). Returns a float64 scalar tensor.
    """
    T = schedule.num_train_timesteps
    if not (0 <= int(t) < T and -1 <= int(t_prev) < int(t)):
        raise UserError(f"expected -1 <= t_prev < t <= {T - 1}, got t={t}, t_prev={t_prev}")
    abar_t = _alpha_cumprod(schedule, int(t))
    abar_prev = _alpha_cumprod(schedule, int(t_prev))
    var = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    return torch.tensor(eta * math.sqrt(max(var, 0.0)), dtype=torch.float64)


def ddim_step(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x: Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM update x_t -> x_{t_prev} (DDIM eq. 12); returns (x_prev, pred_original_sample).

    | code            | DDIM paper (its alpha is DDPM's alpha-bar) |
    |-----------------|---------------------------------------------|
    | abar_t          | alpha_t                                     |
    | abar_prev       | alpha_{t-1} (previous step of the subsequence) |
    | x0, eps         | predicted x_0, epsilon_theta(x_t)           |
    | sigma           | sigma_t(eta), eq. 16                        |
    """
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
    # 1. predicted x_0 and epsilon from the network output (eq. 9 / v-parametrisation)
    x0, eps = model_output_to_x0_eps(schedule, model_output, x, t_batch)
    # 2. alpha-bar of the previous step of the subsequence (float64 scalar, abar_{-1} = 1)
    abar_prev = _alpha_cumprod(schedule, t_prev)
    # 3. sigma_t(eta), eq. 16
    sigma = float(ddim_sigma(schedule, t, t_prev, eta))
    # 4. "direction pointing to x_t": sqrt(1 - abar_prev - sigma^2) eps
    dir_coef = math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0))
    # 5. x_prev = sqrt(abar_prev) x0 + direction + sigma z, eq. 12
    x_prev = math.sqrt(abar_prev) * x0 + dir_coef * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise_like(x, generator)
    return x_prev, x0


def _working_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, otherwise x's own floating dtype."""
    if not x.is_floating_point():
        raise UserError(f"the sampler start x must be a floating-point tensor, got {x.dtype}")
    return torch.promote_types(x.dtype, torch.float32)


@torch.no_grad()
def ddim_sample(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    *,
    eta: float = 0.0,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from x = x_{timesteps[0]} down to x_0.

    ``eta = 0`` is deterministic; ``eta = 1`` with all T steps is DDPM ancestral sampling.
    ``callback`` gets {"i", "t", "x" (the x_t fed to the model), "pred_original_sample"} each step.
    """
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")

    def step(out: Tensor, x: Tensor, i: int, t: int) -> tuple[Tensor, Tensor]:
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        return ddim_step(schedule, out, x, t, t_prev, eta, generator)

    return _chain(model, x, timesteps, step, extra_args, callback, disable, "DDIM")


def _chain(model: Model, x: Tensor, timesteps: list[int], step, extra_args, callback, disable,
           desc: str) -> Tensor:  # fmt: skip
    """The loop every sampler shares: model call at each t, ``step`` to the next x, callback."""
    in_dtype, extra_args = x.dtype, extra_args or {}
    x = x.to(_working_dtype(x))
    for i, t in enumerate(tqdm(timesteps, disable=disable, desc=desc, leave=False)):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
        model_output = model(x, t_batch, **extra_args)
        x_prev, x0 = step(model_output, x, i, t)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_original_sample": x0})
        x = x_prev
    return x.to(in_dtype)


def ddpm_step(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x: Tensor,
    t: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral step x_t -> x_{t-1} ~ N(mu-tilde, beta-tilde I) (DDPM eq. 6-7).

    | code             | DDPM paper                                |
    |------------------|-------------------------------------------|
    | beta_t, alpha_t  | beta_t, alpha_t                           |
    | abar_t, abar_prev| alpha-bar_t, alpha-bar_{t-1}              |
    | x0               | predicted x_0 (eq. 15, or from v)         |
    | mean, var        | mu-tilde_t(x_t, x_0), beta-tilde_t (eq. 7)|
    """
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
    # 1. predicted x_0 from the network output (no clipping)
    x0, _ = model_output_to_x0_eps(schedule, model_output, x, t_batch)
    # 2. schedule values at t (float64 scalars, abar_{-1} = 1)
    beta_t = float(schedule.betas[t])
    alpha_t = float(schedule.alphas[t])
    abar_t = _alpha_cumprod(schedule, t)
    abar_prev = _alpha_cumprod(schedule, t - 1)
    # 3. posterior mean, eq. 7: mu = sqrt(abar_prev) beta_t / (1 - abar_t) x_0
    #                                + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
    c_x0 = math.sqrt(abar_prev) * beta_t / (1 - abar_t)
    c_xt = math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)
    mean = c_x0 * x0 + c_xt * x
    # 4. posterior variance, eq. 7: beta-tilde = (1 - abar_prev) / (1 - abar_t) beta_t; 0 at t = 0
    var = (1 - abar_prev) / (1 - abar_t) * beta_t
    if t > 0:
        mean = mean + math.sqrt(var) * noise_like(x, generator)
    return mean, x0


@torch.no_grad()
def ddpm_sample(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    *,
    eta: float = 1.0,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2, sigma_t^2 = beta-tilde_t) over
    consecutive ``timesteps`` t, t - 1, ..., 0. ``eta`` is unused: the variance is fixed.

    ``callback`` gets {"i", "t", "x" (the x_t fed to the model), "pred_original_sample"} each step.
    """
    if list(timesteps) != list(range(timesteps[0], -1, -1)):
        raise UserError("DDPM steps through every timestep down to 0; use sampler ddim for fewer")

    def step(out: Tensor, x: Tensor, i: int, t: int) -> tuple[Tensor, Tensor]:
        return ddpm_step(schedule, out, x, t, generator)

    return _chain(model, x, timesteps, step, extra_args, callback, disable, "DDPM")


Sampler = Callable[..., Tensor]
# k-diffusion's rule: one signature, picked by name.
# sampler(model, x, schedule, timesteps, *, eta, extra_args, generator, callback, disable)
SAMPLERS: dict[str, Sampler] = {"ddim": ddim_sample, "ddpm": ddpm_sample}


def sampler_timesteps(
    name: str, num_train_timesteps: int, steps: int, spacing: str, t_start: int | None = None
) -> list[int]:
    """The timesteps sampler ``name`` walks: DDPM every one from t_start (or T - 1) to 0; DDIM
    ``steps`` of them spaced by ``spacing``."""
    if name not in SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    if name == "ddpm":
        top = num_train_timesteps - 1 if t_start is None else _as_int("t_start", t_start)
        return list(range(top, -1, -1))
    return make_timesteps(num_train_timesteps, steps, spacing, t_start)
