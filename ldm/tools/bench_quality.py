"""Benchmark cases ``sampler_quality`` and ``window_quality``: PSNR/SSIM and time of
predict_volume with the trained checkpoints a predict_ldm config names (by default the demo
ones: ``python scripts/run_all.py`` writes them), per sampler and step count, and per
sliding-window layout. Registered in ``ldm/tools/benchmark.py`` (``CASES``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from ldm.core.config import REPO_ROOT, load_config
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig
from ldm.phases.predict_ldm import PredictConfig, predict_volume


def _trained_ldm(config: str, device: torch.device) -> tuple[PredictConfig, LatentDiffusion]:
    """A predict_ldm config and the trained LDM its checkpoints name."""
    from ldm.diffusion.latent_diffusion import load_ldm

    cfg = load_config(PredictConfig, REPO_ROOT / config)
    return cfg, load_ldm(cfg.vae_checkpoint, cfg.diffusion_checkpoint, device)


def _scored_prediction(
    ldm: LatentDiffusion, case: Any, cfg: PredictConfig, window: tuple[int, ...]
) -> tuple[float, float, float]:
    """(PSNR, SSIM, seconds) of predict_volume on one test case, scored in original units."""
    from ldm.evaluate.metrics import psnr, ssim

    t0 = time.perf_counter()
    out = predict_volume(ldm, case.model_lr, cfg, window)[0]  # the mean (one sample: itself)
    seconds = time.perf_counter() - t0
    out = case.from_model(out)
    hr, vol = case.to_original(case.hr), case.to_original(out)
    return psnr(vol, hr), ssim(vol, hr), seconds


def sampler_quality(
    device: torch.device,
    config: str = "configs/demo/predict_ldm.yaml",
    ddim_steps: tuple[int, ...] = (2, 5, 10, 20, 50),
    ddpm: bool = False,
) -> dict[str, Any]:
    """PSNR/SSIM and time of DDIM at several step counts (and DDPM, all T steps, if asked) on
    the first test case, with the trained checkpoints named by a predict_ldm config."""
    from ldm.data.dataset import iter_test_cases, load_manifest
    from ldm.evaluate.metrics import psnr
    from ldm.tools.benchmark import default_steps

    cfg, ldm = _trained_ldm(config, device)
    window = tuple(cfg.window or load_manifest(cfg.data_dir)["patch_size"])
    case = next(iter_test_cases(cfg.data_dir))
    hr = case.to_original(case.hr)
    default = default_steps()
    runs = [SamplerConfig("ddim", s) for s in sorted({*ddim_steps, default, 50})]
    runs += [SamplerConfig("ddpm")] if ddpm else []
    rows = []
    for sampler in runs:
        c = dataclasses.replace(cfg, sampler=sampler, num_samples=1)
        p, q, seconds = _scored_prediction(ldm, case, c, window)
        steps = sampler.steps if sampler.kind == "ddim" else ldm.schedule.num_train_timesteps
        rows.append({"sampler": sampler.kind, "steps": steps, "psnr": p, "ssim": q,
                     "seconds": seconds})  # fmt: skip
    return {"test_case": case.name, "shape": list(case.hr.shape), "config": config,
            "default_steps": default, "baseline_psnr": psnr(case.to_original(case.lr), hr),
            "runs": rows}  # fmt: skip


def window_quality(
    device: torch.device,
    config: str = "configs/demo/predict_ldm.yaml",
    layouts: tuple[tuple[int | None, float], ...] = ((None, 0.5), (None, 0.25), (None, 0.0),
                                                     (64, 0.25), (64, 0.0)),
    max_cases: int = 4,
) -> dict[str, Any]:  # fmt: skip
    """PSNR/SSIM and time of predict_volume per sliding-window layout (window, overlap; None =
    the patch size) with the default sampler, on the first ``max_cases`` test cases of the
    checkpoints named by a predict_ldm config: the knee of quality against windows run."""
    from ldm.data.dataset import iter_test_cases, load_manifest

    cfg, ldm = _trained_ldm(config, device)
    patch = tuple(load_manifest(cfg.data_dir)["patch_size"])
    cases = [c for _, c in zip(range(max_cases), iter_test_cases(cfg.data_dir))]
    rows = []
    for size, overlap in layouts:
        window = patch if size is None else (size,) * len(patch)
        c = dataclasses.replace(cfg, overlap=overlap, num_samples=1)
        scores = [_scored_prediction(ldm, case, c, window) for case in cases]
        rows.append({"window": list(window), "overlap": overlap,
                     "seconds": sum(t for _, _, t in scores),
                     "psnr": float(np.mean([p for p, _, _ in scores])),
                     "ssim": float(np.mean([q for _, q, _ in scores]))})  # fmt: skip
    return {"config": config, "cases": [c.name for c in cases], "steps": cfg.sampler.steps,
            "runs": rows}  # fmt: skip


CASES = {"sampler_quality": sampler_quality, "window_quality": window_quality}
