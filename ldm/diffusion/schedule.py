"""Noise schedules, the forward process q(x_t | x_0) and the training loss of the latent diffusion.

Timesteps are 0-based as in diffusers: ``t = 0 .. T-1``, and index ``t`` is step ``t + 1`` of the
DDPM paper (Ho et al. 2020), which counts ``1 .. T``. The samplers use ``t = -1`` for the clean end
of the chain, where alpha-bar = 1.

| code                  | paper (DDPM)                                  |
|-----------------------|-----------------------------------------------|
| ``betas[t]``          | beta_t                                        |
| ``alphas[t]``         | alpha_t = 1 - beta_t                          |
| ``alphas_cumprod[t]`` | alpha-bar_t = prod_{s <= t} alpha_s (DDIM: alpha_t) |
| ``x0``                | x_0                                           |
| ``noise``, ``eps``    | epsilon ~ N(0, I)                             |
| ``v``                 | sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0 (Salimans & Ho 2022) |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ldm.core.errors import UserError
from ldm.core.validate import check_choice, check_int

BETA_SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v")
COSINE_S = 0.008  # Nichol & Dhariwal 2021, sec. 3.2: small offset so beta_1 is not too small
COSINE_MAX_BETA = 0.999  # same paper: clip beta_t to avoid a singularity at t = T

Model = Callable[..., Tensor]


@dataclass(frozen=True)
class DiffusionConfig:
    """How the latent diffusion adds noise and what its network predicts."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" (DDPM: 1e-4..0.02) | "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    prediction_type: str = "v"  # "epsilon" | "v"
    min_snr_gamma: float = 5.0  # 0 = plain MSE; > 0 = min-SNR-gamma weighting (Hang et al. 2023)

    def __post_init__(self) -> None:
        check_int("num_train_timesteps", self.num_train_timesteps, 1)
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise UserError(
                "beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if not self.min_snr_gamma >= 0.0:
            raise UserError(f"min_snr_gamma must be >= 0 (0 = off), got {self.min_snr_gamma}")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The fixed forward-process variances: 1-D float64 CPU tensors of length T."""

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    prediction_type: str
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        n = self.betas.shape
        if len(n) != 1 or self.alphas.shape != n or self.alphas_cumprod.shape != n:
            raise ValueError(f"betas, alphas, alphas_cumprod must be 1D of one length, got {n}")

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of forward-process steps."""
        return self.betas.shape[0]

    def table(self, name: str, device: torch.device) -> Tensor:
        """``sqrt_abar``, ``sqrt_1m_abar`` or ``snr`` (T,) on ``device``, made once per device so
        that a step indexes it with a device ``t`` without a host sync (float64; float32 on MPS)."""
        key = (name, str(device))
        if key not in self._tables:
            abar = self.alphas_cumprod
            values = {"sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt(),
                      "snr": snr(self)}[name]  # fmt: skip
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
            self._tables[key] = values.to(device, dtype)
        return self._tables[key]


def _cosine_betas(num_train_timesteps: int) -> Tensor:
    """Cosine betas (Nichol & Dhariwal 2021, eq. 17): abar(t) = f(t) / f(0), T + 1 knots."""
    tau = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    # f(tau) = cos^2((tau + s) / (1 + s) * pi / 2), tau = t / T
    f = torch.cos((tau + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2  # (T + 1,)
    alpha_bar = f / f[0]
    # beta_t = 1 - alpha-bar_t / alpha-bar_{t-1}, clipped to <= 0.999 (same paper, sec. 3.2)
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=COSINE_MAX_BETA)


def make_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """Build the float64 beta / alpha / alpha-bar tables of ``cfg``."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":  # DDPM sec. 4: beta_1 = 1e-4 .. beta_T = 0.02, T = 1000
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    else:
        betas = _cosine_betas(T)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    return NoiseSchedule(betas, alphas, alphas_cumprod, cfg.prediction_type)


def _check_t(schedule: NoiseSchedule, t: Tensor, x: Tensor) -> Tensor:
    """``t`` as a LongTensor of shape (B,) on its own device, checked against ``x`` (B, ...).

    A wrong ``t`` is a caller's bug (ValueError, with its traceback). The range is checked only
    for a CPU ``t``: reading a GPU tensor's min/max would wait for the GPU on every step.
    """
    if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"timesteps t must be an integer tensor of shape (B,), got {t!r}")
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    T = schedule.num_train_timesteps
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(
            f"timesteps must lie in [0, {T - 1}], got min {int(t.min())}, max {int(t.max())}"
        )
    return t.long()


def _gather(schedule: NoiseSchedule, name: str, t: Tensor, x: Tensor) -> Tensor:
    """``schedule.table(name)[t]`` as a (B, 1, ..., 1) tensor with x's dtype and device."""
    out = schedule.table(name, t.device)[t].to(device=x.device, dtype=x.dtype)  # (B,)
    return out.reshape(-1, *([1] * (x.ndim - 1)))


def noise_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device, moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def add_noise(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4) with given noise."""
    t = _check_t(schedule, t, x0)
    # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                      # (B, C, *spatial)
    return (
        _gather(schedule, "sqrt_abar", t, x0) * x0
        + _gather(schedule, "sqrt_1m_abar", t, x0) * noise
    )


def get_velocity(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The v target: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    t = _check_t(schedule, t, x0)
    return (
        _gather(schedule, "sqrt_abar", t, x0) * noise
        - _gather(schedule, "sqrt_1m_abar", t, x0) * x0
    )


def model_output_to_x0_eps(
    schedule: NoiseSchedule, model_output: Tensor, x_t: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """(pred_original_sample, pred_epsilon) from an epsilon or v network output at x_t.

    epsilon: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)  (DDPM eq. 15, DDIM eq. 9).
    v:       x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,
             eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t  (Salimans & Ho 2022, App. D).
    """
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"model output shape {tuple(model_output.shape)} != input shape {tuple(x_t.shape)}; "
            "check the network's out_channels"
        )
    t = _check_t(schedule, t, x_t)
    model_output = model_output.to(x_t.dtype)
    sqrt_abar = _gather(schedule, "sqrt_abar", t, x_t)  # sqrt(abar_t), (B, 1, ...)
    sqrt_1m_abar = _gather(schedule, "sqrt_1m_abar", t, x_t)  # sqrt(1 - abar_t)
    if schedule.prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sqrt_1m_abar * eps) / sqrt_abar
    else:
        v = model_output
        x0 = sqrt_abar * x_t - sqrt_1m_abar * v
        eps = sqrt_abar * v + sqrt_1m_abar * x_t
    return x0, eps


def posterior_variance(schedule: NoiseSchedule) -> Tensor:
    """beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (DDPM eq. 7), abar_{-1} = 1; (T,)."""
    abar = schedule.alphas_cumprod
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return (1 - abar_prev) / (1 - abar) * schedule.betas


def snr(schedule: NoiseSchedule) -> Tensor:
    """Signal-to-noise ratio SNR(t) = abar_t / (1 - abar_t) for every t; (T,) float64."""
    abar = schedule.alphas_cumprod
    return abar / (1 - abar)


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, gamma: float) -> Tensor:
    """Per-sample loss weight of min-SNR-gamma (Hang et al. 2023, sec. 3.4); (B,) on t's device.

    The weight min(SNR, gamma) is stated for an x_0 loss; written for our targets it becomes
    min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v.
    """
    if not gamma > 0:
        raise UserError(f"min_snr_gamma must be > 0 here (0 = off), got {gamma}")
    s = schedule.table("snr", t.device)[t.long()]  # (B,), no host sync
    clipped = s.clamp(max=gamma)
    return clipped / s if schedule.prediction_type == "epsilon" else clipped / (s + 1)


def training_loss(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    min_snr_gamma: float = 0.0,
) -> Tensor:
    """DDPM L_simple (eq. 14): MSE between the network output and eps (or v) at a uniform random t.

    ``model(x_t, t, **extra_args)``; x0 is (B, C, *spatial). With ``min_snr_gamma > 0`` each
    sample's MSE is weighted by :func:`min_snr_weight`. Returns the scalar batch mean in float32.
    """
    if not min_snr_gamma >= 0:
        raise UserError(f"min_snr_gamma must be >= 0 (0 = off), got {min_snr_gamma}")
    B = x0.shape[0]
    device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator, device=device)
    t = t.to(x0.device)  # (B,)
    noise = noise_like(x0, generator)  # eps, (B, C, *spatial)
    x_t = add_noise(schedule, x0, noise, t)
    target = (
        noise if schedule.prediction_type == "epsilon" else get_velocity(schedule, x0, noise, t)
    )
    model_output = model(x_t, t, **(extra_args or {}))
    if model_output.shape != target.shape:
        raise ValueError(
            f"model output shape {tuple(model_output.shape)} != target shape "
            f"{tuple(target.shape)}; check the network's out_channels"
        )
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma > 0:
        weight = min_snr_weight(schedule, t, min_snr_gamma)
        per_sample = per_sample * weight.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
