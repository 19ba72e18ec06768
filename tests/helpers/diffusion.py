"""Noise schedules and an oracle network for the diffusion and sampler tests."""

from __future__ import annotations

import torch

from ldm.diffusion.schedule import DiffusionConfig, NoiseSchedule, make_schedule


def noise_schedule(schedule: str = "linear", prediction_type: str = "epsilon", T: int = 1000):
    """make_schedule of a DiffusionConfig with only these three settings changed."""
    cfg = DiffusionConfig(
        num_train_timesteps=T, beta_schedule=schedule, prediction_type=prediction_type
    )
    return make_schedule(cfg)


def alpha_bar(schedule: NoiseSchedule, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """alpha-bar_t (float64) shaped to broadcast over a batch of ``ndim``-dimensional tensors."""
    return schedule.alphas_cumprod[t.cpu()].reshape(-1, *([1] * (ndim - 1)))


def true_eps(schedule: NoiseSchedule, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
    """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), computed independently in float64."""
    a = alpha_bar(schedule, t, x0.ndim)
    return (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()


def oracle_model(schedule: NoiseSchedule, x0: torch.Tensor):
    """A network that knows x0 and returns the true epsilon (or v) for any x_t."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = true_eps(schedule, x_t, x0, t)
        if schedule.prediction_type == "epsilon":
            return eps.to(x_t.dtype)
        a = alpha_bar(schedule, t, x0.ndim)
        return (a.sqrt() * eps - (1 - a).sqrt() * x0.double()).to(x_t.dtype)

    return model
