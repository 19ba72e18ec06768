"""ddim_similar_noise: how DDIM sampling of the trained LDM reacts to its start noise.

Two experiments on one window of one test case (docs/design.md, "Visual experiments"):

1. Similar noise -> similar output. From a base noise n0 (and one fresh noise n1) three sweeps
   move gradually from n0 to n1; every point is sampled with deterministic DDIM (eta = 0) under
   the same LR condition and decoded:
     block   replace a centred cube of n0 by n1, the cube edge growing;
     mixing  variance-preserving mix n(s) = sqrt(1 - s^2) n0 + s n1;
     slerp   spherical interpolation from n0 to n1 (DDIM paper, Song et al. 2021, sec. 5.3).
   All three end at n1. Also: eta = 0 is deterministic, eta = 1 is not (same start noise).
2. Forward/backward (SDEdit, Meng et al. 2022): noise the HR latent to x_t ~ q(x_t | x_0) for a
   sweep of t, run DDIM back from each t and compare the decoded result with HR.

The sampling code lives in :mod:`ldm.phases.ddim_similar_noise.sweeps`, the pictures in
:mod:`ldm.phases.ddim_similar_noise.viz`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.core.config import save_config
from ldm.core.device import pick_device
from ldm.core.errors import ConfigError, DataError
from ldm.core.files import save_json, staged_dir
from ldm.core.outdir import check_out_dir, config_inputs
from ldm.core.registry import PhaseResult
from ldm.data.dataset import VolumeCase, iter_test_cases, load_manifest
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig, load_ldm
from ldm.diffusion.samplers import SPACINGS
from ldm.evaluate.metrics import psnr
from ldm.evaluate.viz import shared_window
from ldm.phases.ddim_similar_noise import viz as nviz
from ldm.phases.ddim_similar_noise.sweeps import (
    ForwardBackward,
    SweepResult,
    check_determinism,
    forward_backward,
    run_sweeps,
)

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)


def _check_fractions(key: str, values: Sequence[float]) -> None:
    if len(values) < 2:
        raise ConfigError(f"{key}: a sweep needs >= 2 points, got {len(values)}: {list(values)}")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ConfigError(f"{key}: every value must be in [0, 1], got {bad}")


@dataclass(frozen=True)
class DDIMSimilarNoiseConfig:
    """configs/ddim_similar_noise.yaml; sweep values whose range needs the model (block edges up
    to the latent size, t up to T - 1) are checked once the checkpoints are loaded."""

    data_dir: Path = Path("dataset/vessel_phantom")
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    diffusion_checkpoint: Path = Path("checkpoint/diffusion/best.pt")
    out_dir: Path = Path("results/ddim_similar_noise")
    case: str | None = None  # a test case name; null = the first test case
    window: tuple[int, ...] | None = None  # image window centred in the case; null = patch size
    steps: int = 50  # DDIM steps from pure noise (from t: the same step size)
    spacing: str = "trailing"
    mix_s: tuple[float, ...] = DEFAULT_FRACTIONS  # mixing sweep, s in [0, 1]
    slerp_a: tuple[float, ...] = DEFAULT_FRACTIONS  # slerp sweep, a in [0, 1]
    block_edges: tuple[int, ...] | None = None  # cube edges in latent voxels; null = 0..size
    forward_t: tuple[int, ...] = (0, 25, 50, 100, 150, 200, 300, 400, 500, 600, 800, 999)
    seed: int = 0  # n0, n1 and the forward noise; the eta = 1 runs use seed + 1, seed + 2
    batch_size: int = 16  # noises sampled (and outputs decoded) together
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.spacing not in SPACINGS:
            raise ConfigError(f"spacing must be one of {', '.join(SPACINGS)}, got {self.spacing!r}")
        _check_fractions("mix_s", self.mix_s)
        _check_fractions("slerp_a", self.slerp_a)
        if self.block_edges is not None:
            if len(self.block_edges) < 2:
                raise ConfigError(
                    f"block_edges: a sweep needs >= 2 points, got {list(self.block_edges)}"
                )
            if min(self.block_edges) < 0:
                raise ConfigError(
                    f"block_edges: every edge must be >= 0, got {list(self.block_edges)}"
                )
        if len(self.forward_t) < 2:
            raise ConfigError(f"forward_t: a sweep needs >= 2 points, got {list(self.forward_t)}")
        if min(self.forward_t) < 0:
            raise ConfigError(f"forward_t: every t must be >= 0, got {list(self.forward_t)}")
        if self.window is not None and any(w < 1 for w in self.window):
            raise ConfigError(f"window: sizes must be >= 1, got {list(self.window)}")


# ---------------------------------------------------------------------------------------------
# the case window and the sweep ranges that depend on the model


def load_case(data_dir: Path, name: str | None) -> VolumeCase:
    """The named test case, or the first one; an unknown name lists the valid ones."""
    case = next(iter_test_cases(data_dir, [name] if name is not None else None), None)
    if case is None:
        raise DataError(f"{data_dir}: the dataset has no test cases; rerun prepare_data")
    return case


def window_slices(shape: Sequence[int], window: Sequence[int], multiple: int) -> tuple[slice, ...]:
    """The window centred in a volume of ``shape``; sizes must be multiples of ``multiple``."""
    if len(window) != len(shape):
        raise ConfigError(
            f"window: expected {len(shape)} sizes for the volume of shape {tuple(shape)}, "
            f"got {list(window)}"
        )
    if any(w > n or w % multiple for w, n in zip(window, shape)):
        raise ConfigError(
            f"window: sizes must be multiples of {multiple} (VAE factor x UNet factor) and at "
            f"most the volume shape {tuple(shape)}, got {list(window)}"
        )
    return tuple(slice((n - w) // 2, (n - w) // 2 + w) for w, n in zip(window, shape))


def check_model_ranges(
    cfg: DDIMSimilarNoiseConfig, latent_spatial: Sequence[int], num_train_timesteps: int
) -> tuple[int, ...]:
    """Check block_edges and forward_t against the latent size and T; returns the edges."""
    size = max(latent_spatial)
    edges = tuple(range(size + 1)) if cfg.block_edges is None else cfg.block_edges
    bad = [e for e in edges if e > size]
    if bad:
        raise ConfigError(f"block_edges: every edge must be in [0, {size}] (the latent size), "
                          f"got {bad}")  # fmt: skip
    top = num_train_timesteps - 1
    bad = [t for t in cfg.forward_t if t > top]
    if bad:
        raise ConfigError(f"forward_t: every t must be in [0, {top}] (T - 1 of the diffusion "
                          f"checkpoint), got {bad}")  # fmt: skip
    return edges


# ---------------------------------------------------------------------------------------------
# the experiment on one window


def _caption(name: str, symbol: str, value: float) -> str:
    return f"{name} {symbol}={int(value)}" if name == "block" else f"{name} {symbol}={value:.2f}"


def _as_batch(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]  # (1, 1, *spatial)


def write_pictures(
    out_dir: Path,
    sweeps: list[SweepResult],
    n0: np.ndarray,
    base: np.ndarray,
    fb: ForwardBackward,
    lr: np.ndarray,
    hr: np.ndarray,
    refs: dict[str, float],
    steps: int,
) -> list[Path]:
    """Every GIF and PNG of the experiment (see :mod:`ldm.phases.ddim_similar_noise.viz`)."""
    out_dir = Path(out_dir)
    window = shared_window([hr, *(s.outputs for s in sweeps)])
    files = []
    for s in sweeps:
        caps = [_caption(s.name, s.symbol, v) for v in s.values]
        title = f"{s.name} sweep: |output - output at n0| (DDIM eta=0, {steps} steps)"
        files += nviz.write_sweep_files(
            out_dir, s.name, caps, s.noises.numpy(), n0, s.outputs, base, window, title
        )
    curves = {s.name: (s.noise_l2, s.output_l2) for s in sweeps}
    title = f"similar noise -> similar output (DDIM eta=0, {steps} steps)"
    files.append(nviz.save_distance_plot(out_dir / "distance_plot.png", curves, title))
    files.append(nviz.save_forward_backward_grid(
        out_dir / "forward_backward.png", fb.t, fb.noised, fb.denoised, lr, hr, fb.psnr_denoised
    ))  # fmt: skip
    files.append(nviz.save_psnr_plot(
        out_dir / "forward_backward_psnr.png", fb.t, fb.psnr_noised, fb.psnr_denoised, refs,
        fb.latent_noised, fb.latent_denoised, fb.latent_restorer,
    ))  # fmt: skip
    return files


@torch.no_grad()
def run_experiment(
    model: LatentDiffusion,
    lr: np.ndarray,
    hr: np.ndarray,
    cfg: DDIMSimilarNoiseConfig,
    out_dir: Path,
) -> dict[str, Any]:
    """Both experiments on one normalised LR/HR window (*spatial); pictures go to ``out_dir``.

    Returns the metrics (JSON-ready): sweeps, determinism, forward/backward, reference PSNRs.
    """
    with model.lr_context(_as_batch(lr)):  # every latent decodes to mu(LR) + D(z)
        return _run_experiment(model, lr, hr, cfg, out_dir)


def _run_experiment(
    model: LatentDiffusion, lr: np.ndarray, hr: np.ndarray, cfg: DDIMSimilarNoiseConfig,
    out_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    mu = model.default_mu  # the restorer's output of this window (lr_context)
    cond = model.condition(_as_batch(lr), mu)  # (1, 2 f^3, *latent): (mu, LR) space-to-depth
    z_hr = model.encode_target(_as_batch(hr), mu)  # scaled latent of HR - mu: the oracle's
    edges = check_model_ranges(cfg, z_hr.shape[2:], model.schedule.num_train_timesteps)
    g = torch.Generator().manual_seed(cfg.seed)  # CPU draws: the same noises on every device
    n0, n1, eps = (torch.randn(z_hr.shape, generator=g).to(model.device) for _ in range(3))
    sampler = SamplerConfig("ddim", cfg.steps, 0.0, cfg.spacing)
    paths = {"block": edges, "mixing": cfg.mix_s, "slerp": cfg.slerp_a}
    sweeps, base = run_sweeps(model, cond, n0, n1, paths, sampler, cfg.batch_size)
    det = check_determinism(model, cond, n0, cfg.steps, cfg.spacing, cfg.seed)
    fb = forward_backward(model, cond, z_hr, hr, cfg.forward_t, sampler, eps, cfg.batch_size)
    refs = {
        "LR input": psnr(lr, hr),
        "oracle mu + D(z_HR)": psnr(model.decode(z_hr)[0, 0].float().cpu().numpy(), hr),
        "restorer (z = 0)": psnr(mu[0, 0].float().cpu().numpy(), hr),
        "sample from pure noise": psnr(base, hr),
    }
    files = write_pictures(out_dir, sweeps, n0.cpu().numpy(), base, fb, lr, hr, refs, cfg.steps)
    keys = ("symbol", "values", "noise_l2", "latent_l2", "output_l2")
    return {
        "latent_shape": list(z_hr.shape[1:]),
        "steps": cfg.steps,
        "determinism_max_abs_diff": dataclasses.asdict(det),
        "sweeps": {s.name: {k: getattr(s, k) for k in keys} for s in sweeps},
        "forward_backward": {
            k: getattr(fb, k) for k in ("t", "steps", "psnr_noised", "psnr_denoised",
                                        "latent_noised", "latent_denoised", "latent_restorer")
        },  # fmt: skip
        "reference_psnr": refs,
        "files": sorted(p.name for p in files),
    }


# ---------------------------------------------------------------------------------------------
# the phase


def _same(diff: float) -> str:
    return "identical" if diff == 0.0 else "different"


def summary(metrics: dict[str, Any], out_dir: Path) -> str:
    """The multi-line report the script prints."""
    d, fb = metrics["determinism_max_abs_diff"], metrics["forward_backward"]
    refs = metrics["reference_psnr"]
    shape = "x".join(str(n) for n in metrics["window"]["size"])
    latent = "x".join(str(n) for n in metrics["latent_shape"])
    lines = [
        f"ddim_similar_noise -> {out_dir} (case {metrics['case']}, window {shape}, latent "
        f"{latent}, DDIM {metrics['steps']} steps, {metrics['seconds']:.1f} s)",
        "determinism (max |diff| of decoded outputs, normalised intensity):",
        f"  eta=0: same noise twice -> max |diff| = {d['eta0_other_seed']:.3g} "
        f"({_same(d['eta0_other_seed'])})",
        f"  eta=1: same start noise, different sampler noise -> max |diff| = "
        f"{d['eta1_other_noise']:.3g} ({_same(d['eta1_other_noise'])})",
        f"  eta=1: same start noise, same sampler seed -> max |diff| = "
        f"{d['eta1_same_seed']:.3g} ({_same(d['eta1_same_seed'])}"
        f"{': reproducible with a fixed seed' if d['eta1_same_seed'] == 0.0 else ''})",
        "similar noise -> similar output (L2 of noise -> L2 of decoded output, vs n0):",
    ]
    for name, s in metrics["sweeps"].items():
        pts = [f"{s['symbol']}={v:g}: {n:.1f} -> {o:.2f}"
               for v, n, o in zip(s["values"], s["noise_l2"], s["output_l2"])]  # fmt: skip
        lines.append(f"  {name:6s} " + ", ".join(pts))
    largest = max(max(s["output_l2"]) for s in metrics["sweeps"].values())
    n_vox = math.prod(metrics["window"]["size"])
    lines.append(f"  largest output change: RMS {largest / math.sqrt(n_vox):.3g} per voxel "
                 "(normalised intensity)")  # fmt: skip
    pts = [f"t={t}: {p:.1f}" for t, p in zip(fb["t"], fb["psnr_denoised"])]
    lines.append("forward/backward PSNR vs HR (dB): " + ", ".join(pts))
    pts = [f"t={t}: {d:.3f}" for t, d in zip(fb["t"], fb["latent_denoised"])]
    lines.append("  in latent space, RMS distance to the HR latent: " + ", ".join(pts)
                 + f" (z = 0, the restorer: {fb['latent_restorer']:.3f})")  # fmt: skip
    lines.append("  references: " + ", ".join(f"{k} {v:.1f} dB" for k, v in refs.items()))
    return "\n".join(lines)


def ddim_similar_noise(cfg: DDIMSimilarNoiseConfig, *, overwrite: bool = False) -> PhaseResult:
    """Run both experiments on one test case window and write results to ``cfg.out_dir``."""
    t0 = time.perf_counter()
    inputs = config_inputs(cfg)
    check_out_dir(cfg.out_dir, "ddim_similar_noise", overwrite, inputs)
    manifest = load_manifest(cfg.data_dir)
    case = load_case(cfg.data_dir, cfg.case)
    model = load_ldm(cfg.vae_checkpoint, cfg.diffusion_checkpoint, pick_device(cfg.device))
    if case.lr.ndim != model.vae.config.spatial_dims:
        raise DataError(f"case {case.name} is {case.lr.ndim}D but the VAE is "
                        f"{model.vae.config.spatial_dims}D; use a matching dataset")  # fmt: skip
    window = tuple(cfg.window) if cfg.window is not None else tuple(manifest["patch_size"])
    log.info("case %s, window %s of %s", case.name, window, case.lr.shape)
    region = window_slices(case.lr.shape, window, model.window_multiple)
    with staged_dir(cfg.out_dir, overwrite, phase="ddim_similar_noise", inputs=inputs) as tmp:
        metrics = run_experiment(model, case.lr[region], case.hr[region], cfg, tmp)
        metrics = {"case": case.name,
                   "window": {"size": list(window), "start": [r.start for r in region]},
                   **metrics, "seconds": time.perf_counter() - t0}  # fmt: skip
        save_json(metrics, tmp / "metrics.json")
        save_config(cfg, tmp / "config.yaml")
    d, fb = metrics["determinism_max_abs_diff"], metrics["forward_backward"]
    key = (
        f"eta=0 {_same(d['eta0_other_seed'])}, eta=1 diff {d['eta1_other_noise']:.2g}; "
        f"PSNR {fb['psnr_denoised'][0]:.1f} -> {fb['psnr_denoised'][-1]:.1f} dB over t"
    )
    return PhaseResult(summary(metrics, cfg.out_dir), key, metrics, [cfg.out_dir])
