"""Scoring of the quality bench: every output of a trained model pair next to the tuned classical
filters on a dataset's test volumes, and the MRI generalisation cases (other voxel sizes, other
intensities). Metrics: PSNR, SSIM (original units), bias and contrast (``ldm.metrics``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm import baselines
from ldm.baselines import TuneConfig, tuned_baselines
from ldm.data.dataset import iter_test_cases, load_manifest
from ldm.data.degrade import DegradeConfig, degrade
from ldm.data.normalize import NormalizeConfig, normalisation
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig, load_ldm
from ldm.errors import UserError
from ldm.external import resize
from ldm.inference import autoencode_volume, fit_window, sliding_window_infer
from ldm.metrics import intensity_fit, psnr, ssim
from ldm.phases.predict_ldm import PredictConfig, predict_volume

SAMPLERS = {
    "LDM (noise, 10 steps)": SamplerConfig(steps=10),  # predict_ldm's default
    "LDM (z_LR t=300, 6 steps)": SamplerConfig(steps=6, init="cond", t_start=300),
}
OVERLAP = PredictConfig.overlap  # windows as predict_ldm: its default window, fitted to the volume
MRI_DEGRADE = DegradeConfig(blur_sigma=(1.0, 1.0, 1.0), downsample=(1, 1, 1),
                            noise="rician", noise_sigma=0.04)  # fmt: skip


def bias_slope(out: np.ndarray, hr: np.ndarray) -> tuple[float, float]:
    """(mean(out - hr), contrast - 1), both in % of the HR range (ldm.metrics.intensity_fit)."""
    fit = intensity_fit(out, hr)
    return fit["bias_pct"], 100 * (fit["contrast"] - 1.0)


def score(out: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    bias, contrast = bias_slope(out, hr)
    return {"psnr": psnr(out, hr), "ssim": ssim(out, hr), "bias_pct": bias,
            "contrast_pct": contrast}  # fmt: skip


def ldm_volume(ldm: LatentDiffusion, lr: np.ndarray, sampler: SamplerConfig, window) -> np.ndarray:
    """predict_ldm's own predict_volume (seed 0, one sample) with ``sampler``."""
    return predict_volume(ldm, lr, replace(PredictConfig(), sampler=sampler), window)[0]


def zero_latent_volume(vae, lr: np.ndarray, window) -> np.ndarray:
    f = vae.config.downsample_factor

    def fn(b: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(b.shape[0], vae.config.latent_channels, *(s // f for s in b.shape[2:]))
        return vae.decode(z, b)

    x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))[None]
    out = sliding_window_infer(x, fn, window, overlap=OVERLAP, batch_size=8, progress=False)
    return out[0].numpy()


def classical_params(data: Path, with_bm4d: bool) -> dict[str, Any]:
    """The tuned baselines of evaluate_psnr/predict_ldm (ldm.baselines), BM4D on 4 patches."""
    tune = TuneConfig(bm4d=with_bm4d, bm4d_max_patches=4)  # 64 tuning patches, as the phases
    return tuned_baselines(data, tune, torch.device("cpu"))


_CLASSICAL = {"gaussian": "Gaussian (tuned)", "heat": "heat (tuned)", "tv": "TV (tuned)",
              "nlm": "NLM (tuned)", "bm4d": "BM4D (tuned)"}  # fmt: skip


def classical_outputs(lr: np.ndarray, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tuned baselines on a normalised volume, keyed by the bench's row labels."""
    out = baselines.classical_outputs(lr, params, torch.device("cpu"))
    return {_CLASSICAL[k]: v for k, v in out.items()}


def generalisation_cases(
    data: Path, max_cases: int = 2, deg: DegradeConfig = MRI_DEGRADE,
    data_range: float | None = None,
) -> list[tuple[str, str, np.ndarray, np.ndarray, tuple[int, ...] | None]]:  # fmt: skip
    """(setting, case, LR, HR, model grid) in original units: the first ``max_cases`` MRI test
    blocks at 0.7 / 1.4 mm voxels (HR resampled, then degraded as in training), run as given and
    as with ``--resample`` (model grid = the 1 mm training spacing, outputs resampled back), and
    with intensities a x + b (LR and HR)."""
    try:
        from scipy.ndimage import zoom  # scipy comes with the dev extra (scikit-image)
    except ImportError as e:
        raise UserError(f"the generalisation cases need scipy ({e}): pip install scipy") from None

    cases = []
    for i, case in enumerate(iter_test_cases(data)):
        if i >= max_cases:
            break
        hr = case.to_original(case.hr)
        lr = case.to_original(case.lr)
        for voxel in (0.7, 1.4):
            hr_v = zoom(hr, 1.0 / voxel, order=3).astype(np.float32)
            hr_v = hr_v[tuple(slice(0, s - s % 8) for s in hr_v.shape)]  # divisible by 8
            lr_v = degrade(hr_v, deg, seed=100 + i, data_range=data_range)
            cases.append((f"voxel {voxel} mm", case.name, lr_v, hr_v, None))
            grid = tuple(int(round(s * voxel)) for s in hr_v.shape)
            cases.append((f"voxel {voxel} mm --resample", case.name, lr_v, hr_v, grid))
        shift = 0.1 * float(hr.max())
        for a in (0.5, 2.0):
            setting = f"intensity x{a} + 10% max"
            cases.append((setting, case.name, a * lr + shift, a * hr + shift, None))
    return cases


def evaluate(data: Path, vae_ck: Path, diff_ck: Path, params: dict, general: bool | list) -> dict:
    """Mean scores over the test volumes and the generalisation settings (True: those of
    :func:`generalisation_cases`, or a list of such cases) of every method."""
    ldm = load_ldm(vae_ck, diff_ck, torch.device("cpu"))
    norm = NormalizeConfig(**{k: v for k, v in load_manifest(data)["normalization"].items()
                              if k.endswith("percentile")})  # fmt: skip
    items = [("test", c.name, c.to_original(c.lr), c.to_original(c.hr), None)
             for c in iter_test_cases(data)]  # fmt: skip
    if general:
        items += generalisation_cases(data) if general is True else general
    table: dict[str, dict[str, list[dict]]] = {}
    seconds: dict[str, float] = {}
    for setting, name, lr, hr, grid in items:
        low, high = normalisation(lr, norm, name)
        x_in = (lr - low) / (high - low)
        # --resample: every method runs on the training grid, outputs are resampled back
        x = x_in if grid is None else resize(x_in, grid)
        xh = (hr - low) / (high - low) if grid is None else resize((hr - low) / (high - low), grid)
        outs = {**classical_outputs(x, params)}
        window = fit_window(PredictConfig.window, x.shape, ldm.window_multiple)
        outs["VAE result"] = autoencode_volume(ldm.vae, x, window, overlap=OVERLAP, progress=False)
        outs["VAE ceiling"] = autoencode_volume(ldm.vae, xh, window, overlap=OVERLAP,
                                                progress=False, lr=x)  # fmt: skip
        if ldm.vae.config.uses_lr:
            outs["decode(0, LR)"] = zero_latent_volume(ldm.vae, x, window)
        for label, sampler in SAMPLERS.items():
            t0 = time.perf_counter()
            outs[label] = ldm_volume(ldm, x, sampler, window)
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t0
        outs = {"Baseline": x_in, **{k: v if grid is None else resize(v, x_in.shape)
                                     for k, v in outs.items()}}  # fmt: skip
        for label, o in outs.items():
            row = score(o * (high - low) + low, hr)
            table.setdefault(setting, {}).setdefault(label, []).append(row)
    means = {s: {m: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                 for m, rows in methods.items()} for s, methods in table.items()}  # fmt: skip
    n_test = sum(1 for it in items if it[0] == "test")
    return {"scores": means, "predict_seconds": seconds, "num_test": n_test}
