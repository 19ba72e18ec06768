"""Tests for ldm.diffusion.samplers: timestep spacing, DDIM (eq. 12, 16), DDPM ancestral."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.core.errors import UserError
from ldm.diffusion.samplers import (
    SPACINGS,
    ddim_sample,
    ddim_sigma,
    ddpm_sample,
    make_timesteps,
    sampler_timesteps,
)
from ldm.diffusion.schedule import NoiseSchedule, add_noise
from tests.helpers.diffusion import alpha_bar, noise_schedule, oracle_model


def ddim(model, x, schedule, steps=50, spacing="trailing", t_start=None, **kw):
    """ddim_sample over make_timesteps(steps, spacing, t_start): the LDM wrapper's call."""
    ts = make_timesteps(schedule.num_train_timesteps, steps, spacing, t_start)
    return ddim_sample(model, x, schedule, ts, **kw)


def ddpm(model, x, schedule, **kw):
    return ddpm_sample(model, x, schedule, sampler_timesteps("ddpm", schedule.num_train_timesteps,
                                                             0, "trailing"), **kw)


def _gaussian_data_model(schedule: NoiseSchedule, mu: float, sd: float):
    """The exact E[eps | x_t] (or E[v | x_t]) when every x0 entry is N(mu, sd^2) i.i.d."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alpha_bar(schedule, t, x_t.ndim).to(x_t.dtype)
        var_t = a * sd**2 + 1 - a  # Var(x_t)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / var_t
        if schedule.prediction_type == "epsilon":
            return eps
        x0 = mu + a.sqrt() * sd**2 * (x_t - a.sqrt() * mu) / var_t
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return model


def _smooth_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed non-trivial stand-in network (no randomness)."""
    return torch.tanh(x) * 0.5 + 1e-3 * t.reshape(-1, *([1] * (x.ndim - 1)))


# ---- make_timesteps ----------------------------------------------------------------------------


def test_make_timesteps_known_values():
    assert make_timesteps(1000, 10) == list(range(999, 0, -100))  # trailing default
    assert make_timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make_timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert make_timesteps(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert make_timesteps(1000, 3, "trailing") == [999, 666, 332]  # round(1000 - i 1000/3) - 1
    assert make_timesteps(1000, 1, "trailing") == [999]
    for spacing in SPACINGS:
        assert make_timesteps(1000, 1000, spacing) == list(range(999, -1, -1))


def test_make_timesteps_with_t_start():
    assert make_timesteps(1000, 10, "trailing", t_start=499) == list(range(499, 0, -50))
    assert make_timesteps(1000, 5, "linspace", t_start=400) == [400, 300, 200, 100, 0]
    with pytest.raises(UserError, match="'leading' cannot start at t_start"):
        make_timesteps(1000, 5, "leading", t_start=499)  # would tell the model t=400 at 499
    assert make_timesteps(1000, 1, "trailing", t_start=0) == [0]
    assert make_timesteps(1000, 20, "trailing", t_start=19) == list(range(19, -1, -1))
    assert make_timesteps(np.int64(100), np.int64(2), t_start=np.int64(9)) == [9, 4]  # numpy ints


@pytest.mark.parametrize("spacing", SPACINGS)
def test_make_timesteps_are_strictly_descending_and_in_range(spacing):
    for T in (1, 7, 100, 1000):
        for steps in sorted({k for k in (1, 2, 3, T // 3, T - 1, T) if 1 <= k <= T}):
            ts = make_timesteps(T, steps, spacing)
            assert len(ts) == steps and all(a > b for a, b in zip(ts, ts[1:]))
            assert ts[-1] >= 0 and ts[0] <= T - 1


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1000, 10, "cosine"), {}, "trailing, leading, linspace"),
        ((1000, 1001), {}, "steps"),
        ((1000, 0), {}, "steps"),
        ((1000, -3), {}, "steps"),
        ((1000, 2.5), {}, "steps"),
        ((1000, 11), {"t_start": 9}, "t_start \\+ 1 = 10"),
        ((1000, 10), {"t_start": 1000}, "t_start"),
        ((1000, 10), {"t_start": -1}, "t_start"),
        ((1000, 10), {"t_start": 2.5}, "t_start"),
        ((0, 1), {}, "num_train_timesteps"),
    ],
)
def test_make_timesteps_user_errors(args, kwargs, match):
    with pytest.raises(UserError, match=match):
        make_timesteps(*args, **kwargs)


# ---- DDIM: exactness with an oracle ------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddim_with_oracle_recovers_x0_float64(prediction_type, schedule_name):
    s = noise_schedule(schedule_name, prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    oracle = oracle_model(s, x0)
    for spacing in SPACINGS:
        for steps in (1, 10, 50) if spacing != "trailing" else (1, 10, 50, 1000):
            out = ddim(oracle, x_T, s, steps=steps, spacing=spacing, disable=True)
            assert out.dtype == torch.float64
            assert (out - x0).abs().max() < 1e-9, (spacing, steps)


@pytest.mark.parametrize(("prediction_type", "atol"), [("epsilon", 2e-4), ("v", 2e-6)])
def test_ddim_with_oracle_recovers_x0_float32(prediction_type, atol):
    # epsilon: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) loses ~1/sqrt(abar_T) ~ 160 ulps at T
    s = noise_schedule("linear", prediction_type)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 1, 4, 4, 4, generator=g)
    x_T = torch.randn(x0.shape, generator=g)
    for spacing in SPACINGS:
        for steps in (1, 10, 50):
            out = ddim(oracle_model(s, x0), x_T, s, steps=steps, spacing=spacing, disable=True)
            assert out.dtype == torch.float32
            assert (out - x0).abs().max() < atol, (spacing, steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_ddim_from_t_start_with_oracle_recovers_x0(prediction_type):
    s = noise_schedule("linear", prediction_type)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for t_start in (0, 300, 999):
        x_t = add_noise(s, x0, noise, torch.full((2,), t_start))
        for spacing in ("trailing", "linspace"):
            calls = []
            out = ddim(
                oracle_model(s, x0),
                x_t,
                s,
                steps=min(10, t_start + 1),
                spacing=spacing,
                t_start=t_start,
                callback=calls.append,
                disable=True,
            )
            assert calls[0]["t"] == t_start
            assert (out - x0).abs().max() < 1e-9


def test_ddpm_with_oracle_recovers_x0():
    s = noise_schedule("cosine", "v", T=50)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 1, 3, 3, 3, generator=g, dtype=torch.float64)
    x_T = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = ddpm(oracle_model(s, x0), x_T, s, generator=g, disable=True)
    assert (out - x0).abs().max() < 1e-9  # last step: mean = x0, no noise at t = 0


# ---- DDIM: stochasticity, eta and its relation to DDPM -----------------------------------------


def test_ddim_eta0_is_deterministic_eta1_is_not():
    s = noise_schedule()
    x_T = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(4))

    def run(eta: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return ddim(_smooth_model, x_T, s, steps=20, eta=eta, generator=g, disable=True)

    assert torch.equal(run(0.0, 0), run(0.0, 0))
    assert torch.equal(run(0.0, 0), run(0.0, 1))  # eta = 0 draws no noise at all
    assert torch.equal(run(1.0, 5), run(1.0, 5))  # same generator seed -> same sample
    assert not torch.allclose(run(1.0, 5), run(1.0, 6))


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddim_sigma_eta1_equals_ddpm_posterior_variance(schedule_name):
    s = noise_schedule(schedule_name)
    abar, betas = s.alphas_cumprod, s.betas
    for t in range(s.num_train_timesteps):
        abar_prev = abar[t - 1].item() if t > 0 else 1.0
        beta_tilde = (1 - abar_prev) / (1 - abar[t].item()) * betas[t].item()  # DDPM eq. 7
        sigma = ddim_sigma(s, t, t - 1, 1.0).item()
        assert sigma**2 == pytest.approx(beta_tilde, rel=1e-9, abs=1e-15), t


def test_ddim_sigma_known_values():
    s = noise_schedule()
    a_t, a_p = s.alphas_cumprod[999].item(), s.alphas_cumprod[899].item()
    expected = math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)  # DDIM eq. 16
    assert ddim_sigma(s, 999, 899, 1.0).item() == pytest.approx(expected, rel=1e-12)
    assert ddim_sigma(s, 999, 899, 0.5).item() == pytest.approx(0.5 * expected, rel=1e-12)
    assert ddim_sigma(s, 999, 899, 0.0).item() == 0.0
    assert ddim_sigma(s, 99, -1, 1.0).item() == 0.0  # last step: abar_prev = 1


def test_ddim_eta1_all_steps_equals_ddpm():
    s = noise_schedule("linear", T=50)
    x_T = torch.randn(2, 1, 3, 3, 3, generator=torch.Generator().manual_seed(7))
    out_ddim = ddim(
        _smooth_model,
        x_T,
        s,
        steps=50,
        eta=1.0,
        generator=torch.Generator().manual_seed(8),
        disable=True,
    )
    out_ddpm = ddpm(
        _smooth_model, x_T, s, generator=torch.Generator().manual_seed(8), disable=True
    )
    assert (out_ddim - out_ddpm).abs().max() < 1e-4


def test_ddpm_samples_gaussian_data_with_right_mean_and_std():
    # x0 ~ N(mu, sd^2): with the exact denoiser, ancestral sampling must reproduce the data law
    s = noise_schedule("cosine")
    mu, sd, n = 0.7, 0.5, 10_000
    g = torch.Generator().manual_seed(9)
    x_T = torch.randn(1, n, generator=g)
    out = ddpm(_gaussian_data_model(s, mu, sd), x_T, s, generator=g, disable=True).double()
    assert abs(out.mean().item() - mu) < 5 * sd / math.sqrt(n)
    assert abs(out.std().item() / sd - 1) < 5 / math.sqrt(2 * n)


# ---- plumbing: callback, extra_args, dtypes, errors --------------------------------------------


def test_callback_and_extra_args():
    s = noise_schedule()
    x_T = torch.randn(2, 1, 4, 4)
    cond = torch.ones(2, 1, 4, 4)
    calls = []

    def model(x, t, cond):
        assert t.dtype == torch.long and t.shape == (2,)
        return x * 0.1 + cond * 0.01

    out = ddim(
        model,
        x_T,
        s,
        steps=5,
        extra_args={"cond": cond},
        callback=calls.append,
        disable=True,
    )
    assert [c["i"] for c in calls] == [0, 1, 2, 3, 4]
    assert [c["t"] for c in calls] == [999, 799, 599, 399, 199]
    assert set(calls[0]) == {"i", "t", "x", "pred_original_sample"}
    assert torch.equal(calls[0]["x"], x_T)
    assert torch.equal(calls[-1]["pred_original_sample"], out)  # eta = 0: last step returns x0
    seen = []
    ddpm(model, x_T, noise_schedule(T=4), extra_args={"cond": cond}, callback=seen.append)
    assert [c["t"] for c in seen] == [3, 2, 1, 0]


def test_half_precision_input_is_computed_in_float32():
    s = noise_schedule()
    dtypes = []

    def model(x, t):
        dtypes.append(x.dtype)
        return torch.zeros_like(x)

    out = ddim(model, torch.randn(1, 1, 4, 4).half(), s, steps=3, disable=True)
    assert out.dtype == torch.float16 and set(dtypes) == {torch.float32}


def test_sampler_user_errors():
    s = noise_schedule()
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(UserError, match="eta"):
        ddim(_smooth_model, x, s, eta=1.5, disable=True)
    with pytest.raises(UserError, match="eta"):
        ddim(_smooth_model, x, s, eta=-0.1, disable=True)
    with pytest.raises(UserError, match="trailing, leading, linspace"):
        ddim(_smooth_model, x, s, spacing="karras", disable=True)
    with pytest.raises(UserError, match="steps"):
        ddim(_smooth_model, x, s, steps=2000, disable=True)
    with pytest.raises(UserError, match="t_start"):
        ddim(_smooth_model, x, s, t_start=1000, disable=True)
    with pytest.raises(UserError, match="floating-point"):
        ddpm(_smooth_model, torch.zeros(2, 3, dtype=torch.long), s, disable=True)
    with pytest.raises(ValueError, match="out_channels"):
        ddim(lambda x, t: x[:, :0], x, s, steps=2, disable=True)
    with pytest.raises(UserError, match="t_prev"):
        ddim_sigma(s, 10, 10, 1.0)
    with pytest.raises(UserError, match="t_prev"):
        ddim_sigma(s, 1000, 10, 1.0)
