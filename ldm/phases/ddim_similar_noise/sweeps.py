"""The library side of ddim_similar_noise: noise paths from n0 to n1, batched DDIM over a sweep,
the determinism check and the forward/backward (noise, then denoise) run.

Every noise tensor is (B, C, *latent) and is treated as one vector; outputs are decoded images
in normalised intensity. See :mod:`ldm.phases.ddim_similar_noise` for the phase that uses them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ldm.core.errors import ConfigError, UserError
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig
from ldm.diffusion.schedule import add_noise
from ldm.evaluate.metrics import psnr

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# the three ways from n0 to n1 (every tensor (B, C, *spatial), treated as one vector)


def mix_noise(n0: Tensor, n1: Tensor, s: float) -> Tensor:
    """Variance-preserving mix n(s) = sqrt(1 - s^2) n0 + s n1: N(0, I) again for independent
    N(0, I) inputs; s = 0 gives n0 and s = 1 gives n1 exactly."""
    if not 0.0 <= s <= 1.0:
        raise UserError(f"mix_noise: s must be in [0, 1], got {s}")
    return math.sqrt(1.0 - s * s) * n0 + s * n1


def slerp_noise(n0: Tensor, n1: Tensor, a: float) -> Tensor:
    """Spherical interpolation (Shoemake 1985; DDIM paper sec. 5.3):
    n(a) = sin((1 - a) theta) / sin(theta) n0 + sin(a theta) / sin(theta) n1,
    theta = arccos(<n0, n1> / (|n0| |n1|)); linear where n0 and n1 are (anti)parallel."""
    if not 0.0 <= a <= 1.0:
        raise UserError(f"slerp_noise: a must be in [0, 1], got {a}")
    a0, a1 = (n.detach().cpu().double().flatten() for n in (n0, n1))  # float64: not on mps
    cos = float(a0 @ a1 / (a0.norm() * a1.norm()).clamp(min=1e-30))
    theta = math.acos(min(1.0, max(-1.0, cos)))
    if math.sin(theta) < 1e-6:
        return (1.0 - a) * n0 + a * n1
    return (math.sin((1 - a) * theta) / math.sin(theta)) * n0 + (
        math.sin(a * theta) / math.sin(theta)
    ) * n1


def replace_block(n0: Tensor, n1: Tensor, edge: float) -> Tensor:
    """n0 with a centred cube of ``edge`` latent voxels per axis (clipped to the axis) from n1."""
    e = int(edge)
    if e != edge or e < 0:
        raise ConfigError(f"block_edges: an edge must be a whole number >= 0, got {edge}")
    out = n0.clone()
    sizes = [(n, min(e, n)) for n in n0.shape[2:]]  # (axis length, cube edge on that axis)
    region = (Ellipsis, *(slice((n - k) // 2, (n - k) // 2 + k) for n, k in sizes))
    out[region] = n1[region]
    return out


# name -> (parameter symbol, n(n0, n1, value))
SWEEPS: dict[str, tuple[str, Callable[[Tensor, Tensor, float], Tensor]]] = {
    "block": ("edge", replace_block),
    "mixing": ("s", mix_noise),
    "slerp": ("a", slerp_noise),
}


@dataclass
class SweepResult:
    """One sweep: its noises, decoded DDIM outputs and L2 distances to the n0 point."""

    name: str
    symbol: str
    values: list[float]
    noises: Tensor  # (N, C, *latent) on CPU
    outputs: np.ndarray  # (N, *spatial) decoded, normalised intensity
    noise_l2: list[float]  # |n - n0|_2
    latent_l2: list[float]  # |z - z0|_2 of the sampled (scaled) latents
    output_l2: list[float]  # |x - x0|_2 of the decoded outputs


def _l2(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    return float(torch.as_tensor(a).double().sub(torch.as_tensor(b).double()).norm())


@torch.no_grad()
def decode_batched(model: LatentDiffusion, z: Tensor, batch_size: int) -> np.ndarray:
    """Scaled latents (N, C, *latent) -> decoded images (N, *spatial) float32, in chunks."""
    return np.concatenate([
        model.decode(z[i : i + batch_size].to(model.device))[:, 0].float().cpu().numpy()
        for i in range(0, z.shape[0], batch_size)
    ])  # fmt: skip


@torch.no_grad()
def sample_and_decode(
    model: LatentDiffusion, cond: Tensor, noises: Tensor, sampler: SamplerConfig, batch_size: int
) -> tuple[Tensor, np.ndarray]:
    """DDIM/DDPM from every noise (N, C, *latent) under one condition (1, C, *latent), in chunks;
    returns (latents (N, C, *latent) on CPU, decoded images (N, *spatial) float32)."""
    latents = []
    for i in range(0, noises.shape[0], batch_size):
        chunk = noises[i : i + batch_size].to(model.device)  # (b, C, *latent)
        c = cond.to(model.device).expand(chunk.shape[0], *cond.shape[1:])
        latents.append(model.sample(c, chunk, sampler).float().cpu())
    z = torch.cat(latents)
    return z, decode_batched(model, z, batch_size)


def run_sweeps(
    model: LatentDiffusion,
    cond: Tensor,
    n0: Tensor,
    n1: Tensor,
    sweeps: Mapping[str, Sequence[float]],
    sampler: SamplerConfig,
    batch_size: int = 8,
) -> tuple[list[SweepResult], np.ndarray]:
    """Sample every sweep point (sweeps: name in SWEEPS -> values); returns (results, base output).

    Equal noises (n0 itself, the shared end n1) are sampled once, so the n0 point's output
    distance is exactly 0.
    """
    unique: list[Tensor] = [n0.cpu()]
    index: dict[str, list[int]] = {}
    for name, values in sweeps.items():
        if name not in SWEEPS:
            raise ConfigError(f"unknown sweep {name!r}; expected one of {', '.join(SWEEPS)}")
        fn = SWEEPS[name][1]
        index[name] = []
        for v in values:
            n = fn(n0, n1, v).cpu()
            j = next((k for k, u in enumerate(unique) if torch.equal(u, n)), None)
            if j is None:
                unique.append(n)
                j = len(unique) - 1
            index[name].append(j)
    log.info("sampling %d distinct noises (%d DDIM steps)", len(unique), sampler.steps)
    noises = torch.cat(unique)  # (U, C, *latent)
    latents, images = sample_and_decode(model, cond, noises, sampler, batch_size)
    results = []
    for name, values in sweeps.items():
        idx = index[name]
        results.append(SweepResult(
            name, SWEEPS[name][0], list(values), noises[idx], images[idx],
            [_l2(noises[j], noises[0]) for j in idx], [_l2(latents[j], latents[0]) for j in idx],
            [_l2(images[j], images[0]) for j in idx],
        ))  # fmt: skip
    return results, images[0]


@dataclass(frozen=True)
class Determinism:
    """Max |difference| between decoded outputs of DDIM runs from the same start noise."""

    eta0_other_seed: float  # eta = 0, two runs (sampler generators with other seeds: unused)
    eta1_other_noise: float  # eta = 1, two copies in one batch: other noise added at every step
    eta1_same_seed: float  # eta = 1, that batch run again with the same seed (reproducible)


@torch.no_grad()
def check_determinism(
    model: LatentDiffusion,
    cond: Tensor,
    noise: Tensor,
    steps: int,
    spacing: str = "trailing",
    seed: int = 0,
) -> Determinism:
    """DDIM eq. 12 adds sigma_t z only for eta > 0 (sigma_t of eq. 16 is 0 at eta = 0): sample
    the same x_T (1, C, *latent) twice with eta = 0, and as two copies with eta = 1."""

    def decoded(eta: float, copies: int, gen_seed: int) -> Tensor:
        g = torch.Generator().manual_seed(gen_seed)  # CPU generator: same draws on every device
        x = noise.expand(copies, *noise.shape[1:]).contiguous()  # (copies, C, *latent)
        c = cond.expand(copies, *cond.shape[1:])
        z = model.sample(c, x, SamplerConfig("ddim", steps, eta, spacing), generator=g)
        return model.decode(z).float().cpu()  # (copies, 1, *spatial)

    def max_diff(a: Tensor, b: Tensor) -> float:
        return float((a - b).abs().max())

    stochastic = decoded(1.0, 2, seed + 1)
    return Determinism(
        max_diff(decoded(0.0, 1, seed + 1), decoded(0.0, 1, seed + 2)),
        max_diff(stochastic[0], stochastic[1]),
        max_diff(stochastic, decoded(1.0, 2, seed + 1)),
    )


def forward_steps(steps: int, t: int, num_train_timesteps: int) -> int:
    """DDIM steps from t_start = t at the step size of a ``steps``-step run from T - 1:
    ceil(steps (t + 1) / T), at least 1."""
    return max(1, math.ceil(steps * (t + 1) / num_train_timesteps))


@dataclass
class ForwardBackward:
    """x_t = noised HR latent at each t, and DDIM back from it, both decoded (N, *spatial)."""

    t: list[int]
    steps: list[int]  # DDIM steps from each t (:func:`forward_steps`)
    noised: np.ndarray
    denoised: np.ndarray
    psnr_noised: list[float]  # dB against HR
    psnr_denoised: list[float]
    # RMS distance to the HR latent z_HR (scaled latent units): where the diffusion works
    latent_noised: list[float]
    latent_denoised: list[float]
    latent_restorer: float  # the same for z = 0, the restorer's output


@torch.no_grad()
def forward_backward(
    model: LatentDiffusion,
    cond: Tensor,
    z_hr: Tensor,
    hr: np.ndarray,
    ts: Sequence[int],
    sampler: SamplerConfig,
    eps: Tensor,
    batch_size: int = 8,
) -> ForwardBackward:
    """Noise the scaled HR latent z_hr (1, C, *latent) to each t with the fixed noise ``eps``,
    DDIM back to t = 0 under ``cond`` (SDEdit, Meng et al. 2022) and decode; PSNR against hr."""
    T = model.schedule.num_train_timesteps
    noised, denoised, steps = [], [], []
    for t in ts:
        # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (DDPM eq. 4), x_0 = z_hr
        x_t = add_noise(model.schedule, z_hr, eps.to(z_hr.device), torch.tensor([t]))
        n = forward_steps(sampler.steps, t, T)
        denoised.append(model.sample(cond, x_t, replace(sampler, steps=n), t_start=t).cpu())
        noised.append(x_t.cpu())
        steps.append(n)
    noised_img = decode_batched(model, torch.cat(noised), batch_size)  # (N, *spatial)
    denoised_img = decode_batched(model, torch.cat(denoised), batch_size)
    z = z_hr.cpu().float()

    def rms(latents: list[Tensor]) -> list[float]:
        return [float((x.float() - z).square().mean().sqrt()) for x in latents]

    return ForwardBackward(
        [int(t) for t in ts], steps, noised_img, denoised_img,
        [psnr(x, hr) for x in noised_img], [psnr(x, hr) for x in denoised_img],
        rms(noised), rms(denoised), rms([torch.zeros_like(z)])[0],
    )  # fmt: skip
