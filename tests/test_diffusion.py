"""Tests for ldm.diffusion.schedule: schedules, q(x_t | x_0), parametrisations, training loss."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.core.errors import UserError
from ldm.diffusion.schedule import (
    DiffusionConfig,
    NoiseSchedule,
    add_noise,
    get_velocity,
    min_snr_weight,
    model_output_to_x0_eps,
    noise_like,
    posterior_variance,
    training_loss,
)
from tests.helpers.diffusion import noise_schedule, oracle_model, true_eps

# ---- schedules ---------------------------------------------------------------------------------


def test_linear_schedule_known_values():
    s = noise_schedule("linear")
    assert s.num_train_timesteps == 1000
    assert s.betas.dtype == torch.float64 and s.betas.device.type == "cpu"
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert s.betas[1].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, rel=1e-12)
    assert torch.equal(s.alphas, 1 - s.betas)
    assert torch.equal(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    # DDPM linear schedule: alpha-bar_T ~ 4.04e-5 (SNR at T ~ 4e-5, not zero)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_schedule_is_monotone_in_unit_interval_and_follows_formula():
    s = noise_schedule("cosine")
    abar = s.alphas_cumprod
    assert torch.all(abar > 0) and torch.all(abar <= 1)
    assert torch.all(abar[1:] < abar[:-1])
    assert s.betas.max().item() <= 0.999 + 1e-12
    # Nichol & Dhariwal eq. 17 at t + 1 (0-based index t), away from the clipped last step
    f = lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert abar[t].item() == pytest.approx(f((t + 1) / 1000) / f(0.0), rel=1e-9)


def test_posterior_variance_known_values():
    s = noise_schedule("linear", T=10)
    beta_tilde = posterior_variance(s)
    assert beta_tilde[0].item() == 0.0  # alpha-bar_{-1} = 1
    abar = s.alphas_cumprod
    for t in range(1, 10):
        expected = (1 - abar[t - 1]) / (1 - abar[t]) * s.betas[t]
        assert beta_tilde[t].item() == pytest.approx(expected.item(), rel=1e-12)
        assert beta_tilde[t] <= s.betas[t]  # beta-tilde_t <= beta_t (DDPM sec. 3.2)


# ---- forward process and parametrisations ------------------------------------------------------


def test_add_noise_matches_q_xt_given_x0_in_mean_and_variance():
    s = noise_schedule("linear")
    g = torch.Generator().manual_seed(0)
    n = 100_000
    ts = (0, 250, 999)
    t = torch.tensor(ts).repeat_interleave(n)  # (3n,)
    x0 = torch.full((3 * n, 1), 1.5)
    x_t = add_noise(s, x0, noise_like(x0, g), t)
    for k, tk in enumerate(ts):
        xs = x_t[k * n : (k + 1) * n, 0].double()
        abar = s.alphas_cumprod[tk].item()
        mean, var = math.sqrt(abar) * 1.5, 1 - abar
        assert abs(xs.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(xs.var().item() / var - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_model_output_to_x0_eps_inverts_the_forward_process(prediction_type):
    s = noise_schedule("cosine", prediction_type)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, 600, 998])
    x_t = add_noise(s, x0, eps, t)
    target = eps if prediction_type == "epsilon" else get_velocity(s, x0, eps, t)
    x0_hat, eps_hat = model_output_to_x0_eps(s, target, x_t, t)
    assert (x0_hat - x0).abs().max() < 1e-9
    assert (eps_hat - eps).abs().max() < 1e-9


def test_get_velocity_known_value():
    s = noise_schedule("linear", "v")
    t = torch.tensor([400])
    a = s.alphas_cumprod[400].item()
    v = get_velocity(s, torch.full((1, 1), 2.0, dtype=torch.float64), torch.ones(1, 1).double(), t)
    assert v.item() == pytest.approx(math.sqrt(a) * 1.0 - math.sqrt(1 - a) * 2.0, rel=1e-12)


def test_helpers_follow_dtype_and_accept_scalar_t():
    s = noise_schedule()
    x0 = torch.zeros(2, 3, dtype=torch.float16)
    out = add_noise(s, x0, torch.ones_like(x0), torch.tensor(5))
    assert out.dtype == torch.float16 and out.shape == (2, 3)


@pytest.mark.parametrize(
    "t", [torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2]), torch.tensor([0, 1000])]
)
def test_bad_timesteps_are_a_programming_error_with_a_traceback(t):
    s = noise_schedule()  # ValueError, not UserError: the CLI shows it with its traceback
    with pytest.raises(ValueError, match="timesteps") as e:
        add_noise(s, torch.zeros(2, 3), torch.zeros(2, 3), t)
    assert not isinstance(e.value, UserError)


def test_model_output_shape_mismatch_is_a_programming_error():
    s = noise_schedule()
    with pytest.raises(ValueError, match="out_channels"):
        model_output_to_x0_eps(s, torch.zeros(2, 1, 4), torch.zeros(2, 3, 4), torch.tensor([1, 2]))


# ---- training loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_training_loss_zero_for_oracle_positive_for_zero_model(prediction_type):
    s = noise_schedule("linear", prediction_type)
    x0 = torch.randn(8, 2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    assert training_loss(oracle_model(s, x0), s, x0, generator=g).item() < 1e-8
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert training_loss(zero, s, x0, generator=g).item() > 0.3


def test_training_loss_is_reproducible_and_passes_extra_args():
    s = noise_schedule()
    x0 = torch.randn(4, 1, 4, 4)
    seen = {}

    def model(x, t, cond):
        seen["cond"] = cond
        return x * 0.5 + cond

    cond = torch.ones(4, 1, 4, 4)
    a = training_loss(
        model, s, x0, extra_args={"cond": cond}, generator=torch.Generator().manual_seed(4)
    )
    b = training_loss(
        model, s, x0, extra_args={"cond": cond}, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(a, b) and a.ndim == 0 and a.dtype == torch.float32
    assert seen["cond"] is cond


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_min_snr_weighting_matches_formula(prediction_type):
    s = noise_schedule("linear", prediction_type)
    gamma = 1.0  # SNR = 1 near t = 300: some samples are clipped, some are not
    x0 = torch.randn(32, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    record = {}

    def zero_model(x_t, t):
        record["x_t"], record["t"] = x_t, t
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(6)
    loss = training_loss(zero_model, s, x0, generator=g, min_snr_gamma=gamma)
    t = record["t"]
    eps = true_eps(s, record["x_t"], x0, t)
    abar = s.alphas_cumprod[t]
    if prediction_type == "epsilon":
        target = eps
    else:
        b = abar.reshape(-1, 1, 1, 1)
        target = b.sqrt() * eps - (1 - b).sqrt() * x0
    snr = abar / (1 - abar)
    denom = snr if prediction_type == "epsilon" else snr + 1
    weight = torch.minimum(snr, torch.full_like(snr, gamma)) / denom
    expected = (weight * target.pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (snr > gamma).any() and (snr < gamma).any()  # both regimes of the weight occur
    plain = training_loss(zero_model, s, x0, generator=torch.Generator().manual_seed(6))
    assert plain.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


def test_min_snr_weight_known_values():
    s = noise_schedule("linear", "epsilon")
    snr = (s.alphas_cumprod / (1 - s.alphas_cumprod))[[0, 999]]
    w = min_snr_weight(s, torch.tensor([0, 999]), 5.0)
    assert w[0].item() == pytest.approx(5.0 / snr[0].item())  # high SNR: clipped to gamma
    assert w[1].item() == pytest.approx(1.0)  # low SNR: plain epsilon MSE


# ---- user errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta_schedule": "sigmoid"}, "linear, cosine"),
        ({"prediction_type": "x0"}, "epsilon, v"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": 10.5}, "num_train_timesteps"),
        ({"num_train_timesteps": True}, "num_train_timesteps"),
        ({"beta_start": 0.03, "beta_end": 0.02}, "beta_start"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_end": 1.0}, "beta_end"),
        ({"min_snr_gamma": -1.0}, "min_snr_gamma"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        DiffusionConfig(**kwargs)


def test_noise_schedule_rejects_unknown_prediction_type():
    b = torch.full((3,), 0.1, dtype=torch.float64)
    with pytest.raises(UserError, match="epsilon, v"):
        NoiseSchedule(b, 1 - b, torch.cumprod(1 - b, 0), "sample")


def test_training_loss_user_errors():
    s = noise_schedule()
    x0 = torch.zeros(2, 3, 4)
    with pytest.raises(UserError, match="min_snr_gamma"):
        training_loss(lambda x, t: x, s, x0, min_snr_gamma=-1.0)
    with pytest.raises(ValueError, match="out_channels"):
        training_loss(lambda x, t: x[:, :1], s, x0)
    with pytest.raises(UserError, match="min_snr_gamma"):
        min_snr_weight(s, torch.tensor([1]), 0.0)
