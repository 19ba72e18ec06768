"""Scoring of the quality bench: every output of a trained model pair next to the tuned classical
filters on a dataset's test volumes, and the MRI generalisation cases (other voxel sizes, other
intensities).

Rows of each scored volume (:func:`method_outputs`; every model row runs on the normalised
volume, on the training grid with ``--resample``, with predict_ldm's windows):

* ``Baseline`` (the LR) and the tuned classical filters (``ldm.evaluate.baselines``, as
  evaluate_psnr);
* ``Restorer``: mu(LR), ``first_stage_volume`` (as evaluate_psnr and predict_ldm);
* ``Oracle``: ``first_stage_volume`` with ``hr``, mu + D(E(HR - mu)): the most any diffusion on
  this latent can reach;
* ``z = 0``: mu + D(0), the residual decoder on the prior's mean;
* ``shuffled z``: mu + D(z) with z the oracle latent of the same window, its spatial positions
  permuted (one seeded permutation per window, the same for every channel): the oracle's
  values in the wrong places. Near the oracle, the decoder does not use where the latent puts
  detail; near ``z = 0`` or below, it does;
* ``LDM one sample``, ``LDM mean of 2 / 4 / 8``: ``predict_volume`` with num_samples 1, 2, 4 and
  8, one call per N, each with the same seed: each row is what predict_ldm writes for that N
  (the draws are not nested: every N has its own samples). :func:`sample_means`;
* ``w = 0``, ``w = 0.5``, ``w = 1``: predict_ldm's output (the mean of 8) with detail_weight w,
  mu + w (mean - mu) with mu the restorer in predict_volume's window layout. Exact: refine's
  output is mu + w mean_k D(z_k), and the seed gives the same z_k for every w; ``w = 1`` is the
  mean of 8, ``w = 0`` the restorer (in that layout).

Figures per row (:func:`score`, original units): PSNR, SSIM, bias, contrast, and ESR, HFER and the
high-band FSC (``ldm.evaluate.baselines.score_volume(..., sharpness=True)``); ``seconds``: wall
seconds of the row's call where it is a prediction (Restorer, the LDM rows; the w rows cost what the
mean of 8 costs). The mean of 8 also has the uncertainty figures of its per-voxel std
(``ldm.evaluate.baselines.uncertainty_scores``: var_err_ratio, ause, ause_random; predict_ldm's std
is the sample std (ddof 1), so calibrated samples give var_err_ratio N / (N + 1) = 0.89 for N = 8),
and ``LDM one sample`` the latent sensitivity S = ||D(z_HR) - D(z_sample)||^2 / ||HR - mu||^2
(``ldm.evaluate.quality_metrics.latent_sensitivity``, normalised units). A first stage without a
diffusion model (the bench's ``regression`` variant) gets the Baseline, filter and Restorer rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.core.errors import UserError
from ldm.data.dataset import iter_test_cases, load_manifest
from ldm.data.degrade import DegradeConfig, degrade
from ldm.data.external import resize
from ldm.data.normalize import NormalizeConfig, normalisation
from ldm.diffusion.latent_diffusion import LatentDiffusion, load_ldm
from ldm.evaluate import baselines
from ldm.evaluate.baselines import TuneConfig, tuned_baselines, uncertainty_scores
from ldm.evaluate.inference import first_stage_volume, fit_window, sliding_window_infer
from ldm.evaluate.metrics import intensity_fit
from ldm.evaluate.quality_metrics import latent_sensitivity
from ldm.nets.loading import load_vae
from ldm.nets.restorer import RestorerAE
from ldm.phases.predict_ldm import PredictConfig, predict_volume

SAMPLE_COUNTS = (1, 2, 4, 8)  # LDM rows: one sample, the means of 2, 4 and 8
DETAIL_WEIGHTS = (0.0, 0.5, 1.0)  # w rows, on the mean of the largest count
RESTORER, ORACLE, ZERO, SHUFFLED = "Restorer", "Oracle", "z = 0", "shuffled z"
MRI_DEGRADE = DegradeConfig(blur_sigma=(1.0, 1.0, 1.0), downsample=(1, 1, 1),
                            noise="rician", noise_sigma=0.04)  # fmt: skip


def ldm_label(n: int) -> str:
    """Row label of the LDM with ``n`` samples per window."""
    return "LDM one sample" if n == 1 else f"LDM mean of {n}"


def weight_label(w: float) -> str:
    return f"w = {w:g}"


def bias_slope(out: np.ndarray, hr: np.ndarray) -> tuple[float, float]:
    """(mean(out - hr), contrast - 1), both in % of the HR range
    (ldm.evaluate.metrics.intensity_fit)."""
    fit = intensity_fit(out, hr)
    return fit["bias_pct"], 100 * (fit["contrast"] - 1.0)


def score(out: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM, bias, bias_pct, contrast, contrast_pct (contrast - 1 in %) and the sharpness
    figures esr, hfer, fsc of ``out`` against ``hr`` (both in original units; data range = HR
    max - min). A sharpness figure that is undefined for this HR (no edges, no energy above the
    cutoff) is NaN."""
    ref = torch.from_numpy(np.asarray(hr, dtype=np.float64))
    x = torch.from_numpy(np.asarray(out, dtype=np.float64))
    data_range = float(ref.max() - ref.min())
    try:
        s = baselines.score_volume(x, ref, data_range, sharpness=True)
    except UserError:
        s = baselines.score_volume(x, ref, data_range)
        s |= dict.fromkeys(baselines.SHARPNESS, float("nan"))
    return {**s, "contrast_pct": 100 * (s["contrast"] - 1.0)}


def classical_params(data: Path, with_bm4d: bool) -> dict[str, Any]:
    """The tuned baselines of evaluate_psnr/predict_ldm (ldm.evaluate.baselines), BM4D on 4
    patches."""
    tune = TuneConfig(bm4d=with_bm4d, bm4d_max_patches=4)  # 64 tuning patches, as the phases
    return tuned_baselines(data, tune, torch.device("cpu"))


_CLASSICAL = {"gaussian": "Gaussian (tuned)", "heat": "heat (tuned)", "tv": "TV (tuned)",
              "nlm": "NLM (tuned)", "bm4d": "BM4D (tuned)"}  # fmt: skip


def classical_outputs(lr: np.ndarray, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tuned baselines on a normalised volume, keyed by the bench's row labels."""
    out = baselines.classical_outputs(lr, params, torch.device("cpu"))
    return {_CLASSICAL[k]: v for k, v in out.items()}


# --------------------------------------------------------------------------- model rows


def shuffle_positions(z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``z`` (B, C, *sp) with the spatial positions of each item permuted (one permutation per
    item, the same for all its channels): the same latent vectors in other places."""
    b, c = z.shape[:2]
    flat = z.reshape(b, c, -1)
    perms = [torch.randperm(flat.shape[-1], generator=generator) for _ in range(b)]
    return torch.stack([f[:, p.to(z.device)] for f, p in zip(flat, perms)]).reshape(z.shape)


def latent_probe_volumes(
    vae: RestorerAE, lr: np.ndarray, hr: np.ndarray, window: tuple[int, ...], *,
    overlap: float = 0.0, batch_size: int = 4, seed: int = 0,
) -> dict[str, np.ndarray]:  # fmt: skip
    """``z = 0`` (mu + D(0)) and ``shuffled z`` (mu + D(z_HR shuffled), :func:`shuffle_positions`
    with a generator seeded ``seed``) on a normalised volume, in first_stage_volume's window
    layout (so they differ from its Restorer and Oracle only in the latent)."""
    g = torch.Generator().manual_seed(seed)

    def fn(batch: torch.Tensor) -> torch.Tensor:  # (B, 2, *w): LR, HR
        mu = vae.restore(batch[:, :1])
        z = vae.encode(batch[:, 1:] - mu)[0]
        shuffled = shuffle_positions(z.cpu(), g).to(z.device)
        return torch.cat([mu + vae.decode(torch.zeros_like(z)), mu + vae.decode(shuffled)], 1)

    x = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in (lr, hr)]))
    out = sliding_window_infer(x, fn, fit_window(window, lr.shape, vae.config.window_multiple),
                               overlap=overlap, batch_size=batch_size, out_channels=2,
                               progress=False)  # fmt: skip
    return {ZERO: out[0].numpy(), SHUFFLED: out[1].numpy()}


def predict_layout_restorer(
    ldm: LatentDiffusion, lr: np.ndarray, cfg: PredictConfig, window: tuple[int, ...]
) -> np.ndarray:
    """The restorer mu(LR) blended in predict_volume's window layout: the mu of its outputs."""
    x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))[None]
    out = sliding_window_infer(x, ldm.restore, fit_window(window, lr.shape, ldm.window_multiple),
                               overlap=cfg.overlap, batch_size=cfg.batch_size, device=ldm.device,
                               out_channels=1, progress=False)  # fmt: skip
    return out[0].numpy()


def sample_means(
    ldm: LatentDiffusion, lr: np.ndarray, cfg: PredictConfig, window: tuple[int, ...],
    counts: tuple[int, ...] = SAMPLE_COUNTS,
) -> dict[int, dict[str, Any]]:  # fmt: skip
    """The LDM with N samples per window for each N in ``counts``: one ``predict_volume`` call
    per N with ``cfg``'s sampler and seed and detail_weight 1, so each is predict_ldm's output
    for that N (independent draws per N, not the first N of one set of samples). Returns
    {N: {"mean", "std" (None for N = 1), "sample" (the first), "seconds" (wall)}}."""
    out = {}
    for n in counts:
        c = replace(cfg, num_samples=n, detail_weight=1.0)
        t0 = time.perf_counter()
        mean, std, sample = predict_volume(ldm, lr, c, window)
        out[n] = {"mean": mean, "std": std, "sample": sample,
                  "seconds": time.perf_counter() - t0}  # fmt: skip
    return out


def method_outputs(
    model: LatentDiffusion | RestorerAE, x: np.ndarray, xh: np.ndarray, params: dict[str, Any],
    cfg: PredictConfig, window: tuple[int, ...], counts: tuple[int, ...] = SAMPLE_COUNTS,
    weights: tuple[float, ...] = DETAIL_WEIGHTS,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, np.ndarray]]:  # fmt: skip
    """Every row's output on one normalised volume ``x`` (HR ``xh``, for the oracle and the
    latent probes), on its grid: (outputs by row label, wall seconds by row label, extra
    volumes: "std" of the largest count when > 1, "mu" (the restorer in predict_volume's
    layout)). ``model`` is the LDM, or a first stage alone (filters and Restorer only)."""
    vae = model.vae if isinstance(model, LatentDiffusion) else model
    outs = classical_outputs(x, params)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    outs[RESTORER] = first_stage_volume(vae, x, window, overlap=cfg.overlap, progress=False)
    seconds[RESTORER] = time.perf_counter() - t0
    extra: dict[str, np.ndarray] = {}
    if not isinstance(model, LatentDiffusion):
        return outs, seconds, extra
    outs[ORACLE] = first_stage_volume(vae, x, window, hr=xh, overlap=cfg.overlap, progress=False)
    outs.update(latent_probe_volumes(vae, x, xh, window, overlap=cfg.overlap, seed=cfg.seed))
    runs = sample_means(model, x, cfg, window, counts)
    for n, r in runs.items():
        outs[ldm_label(n)], seconds[ldm_label(n)] = r["mean"], r["seconds"]
    mu = predict_layout_restorer(model, x, cfg, window)
    extra["mu"] = mu
    top = max(runs)
    if runs[top]["std"] is not None:
        extra["std"] = runs[top]["std"]
    for w in weights:  # predict_ldm's detail_weight on the mean of the largest count
        outs[weight_label(w)] = mu + w * (runs[top]["mean"] - mu)
        seconds[weight_label(w)] = runs[top]["seconds"]
    return outs, seconds, extra


def volume_scores(
    outs: dict[str, np.ndarray], seconds: dict[str, float], extra: dict[str, np.ndarray],
    hr_norm: np.ndarray, to_original: Callable[[np.ndarray], np.ndarray],
    top: int | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """The score rows of one volume (every volume on the HR's grid, normalised): :func:`score`
    in original units, ``seconds``, the uncertainty figures on ``ldm_label(top)`` (from
    extra["std"]) and the latent sensitivity on the one-sample row (from extra["mu"])."""
    hr = to_original(hr_norm)
    rows = {label: score(to_original(o), hr) for label, o in outs.items()}
    for label, s in seconds.items():
        if label in rows:
            rows[label]["seconds"] = s
    if "std" in extra and top is not None and ldm_label(top) in outs:
        with suppress(UserError):  # the mean equals HR: no error to calibrate against
            rows[ldm_label(top)].update(uncertainty_scores(extra["std"], outs[ldm_label(top)],
                                                           hr_norm))  # fmt: skip
    one = ldm_label(1)
    if one in outs and ORACLE in outs and "mu" in extra:
        # D(z_HR) = Oracle - Restorer (first-stage layout), D(z_sample) = sample - mu (predict
        # layout): S compares the decoded latents whatever the two layouts' mu
        restorer = outs[RESTORER]
        decoded_sample = restorer + (outs[one] - extra["mu"])
        with suppress(UserError):  # the restorer equals HR: S is undefined
            rows[one]["latent_sensitivity"] = latent_sensitivity(
                outs[ORACLE], decoded_sample, hr_norm, restorer
            )
    return rows


def generalisation_cases(
    data: Path, max_cases: int = 2, deg: DegradeConfig = MRI_DEGRADE,
    data_range: float | None = None,
) -> list[tuple[str, str, np.ndarray, np.ndarray, tuple[int, ...] | None]]:  # fmt: skip
    """(setting, case, LR, HR, model grid) in original units: the first ``max_cases`` MRI test
    blocks at 0.7 / 1.4 mm voxels (HR resampled, then degraded as in training), run as given and
    as with ``--resample`` (model grid = the 1 mm training spacing, outputs resampled back), with
    the anatomy 1.5x larger and smoother on the training grid (a brain unlike the training one,
    that no resampling undoes), and with intensities a x + b (LR and HR)."""
    try:
        from scipy.ndimage import gaussian_filter, zoom  # scipy comes with scikit-image
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
        # larger and smoother anatomy (another species' brain, a child's): structures 1.5x
        # larger in voxels and blurred (sigma 1 voxel) before the same degradation; the grid
        # and the voxel size stay the training ones, so --resample cannot undo it
        big = gaussian_filter(zoom(hr, 1.5, order=3), 1.0).astype(np.float32)
        c = [(s - s0) // 2 for s, s0 in zip(big.shape, hr.shape)]
        big = np.ascontiguousarray(big[tuple(slice(a, a + s0) for a, s0 in zip(c, hr.shape))])
        lr_big = degrade(big, deg, seed=200 + i, data_range=data_range)
        cases.append(("anatomy x1.5, smoother", case.name, lr_big, big, None))
        shift = 0.1 * float(hr.max())
        for a in (0.5, 2.0):
            setting = f"intensity x{a} + 10% max"
            cases.append((setting, case.name, a * lr + shift, a * hr + shift, None))
    return cases


def _original(low: float, high: float, x: np.ndarray) -> np.ndarray:
    return x * (high - low) + low


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean over volumes of every figure (those some volume lacks: over the volumes that have
    it; NaN figures are left out)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def evaluate(
    data: Path, vae_ck: Path, diff_ck: Path | None, params: dict, general: bool | list,
    predict: PredictConfig | None = None, counts: tuple[int, ...] = SAMPLE_COUNTS,
) -> dict:  # fmt: skip
    """Mean scores over the test volumes and the generalisation settings (True: those of
    :func:`generalisation_cases`, or a list of such cases) of every row (module docstring).

    ``diff_ck`` None scores the first stage alone (filters and Restorer). ``predict``: window,
    overlap, sampler and seed of the model rows (default: PredictConfig's). Returns
    {"scores": {setting: {row: figures}}, "num_test", "num_samples": counts}."""
    cfg = PredictConfig() if predict is None else predict
    device = torch.device("cpu")
    manifest = load_manifest(data)
    model: LatentDiffusion | RestorerAE = (
        load_vae(vae_ck, device)[0] if diff_ck is None else load_ldm(vae_ck, diff_ck, device)
    )
    window = tuple(cfg.window or manifest["patch_size"])
    norm = NormalizeConfig(**{k: v for k, v in manifest["normalization"].items()
                              if k.endswith("percentile")})  # fmt: skip
    items = [("test", c.name, c.to_original(c.lr), c.to_original(c.hr), None)
             for c in iter_test_cases(data)]  # fmt: skip
    if general:
        items += generalisation_cases(data) if general is True else general
    top = max(n for n in counts if n > 1) if any(n > 1 for n in counts) else None
    table: dict[str, dict[str, list[dict]]] = {}
    for setting, name, lr, hr, grid in items:
        low, high = normalisation(lr, norm, name)
        x_in, xh_in = (lr - low) / (high - low), (hr - low) / (high - low)
        # --resample: every method runs on the training grid, outputs are resampled back
        x = x_in if grid is None else resize(x_in, grid)
        xh = xh_in if grid is None else resize(xh_in, grid)
        outs, seconds, extra = method_outputs(model, x, xh, params, cfg, window, counts)
        if grid is not None:
            outs = {k: resize(v, x_in.shape) for k, v in outs.items()}
            extra = {k: resize(v, x_in.shape) for k, v in extra.items()}
        if "std" in extra:
            extra["std"] = np.maximum(extra["std"], 0.0)  # cubic resampling can undershoot 0
        outs = {"Baseline": x_in, **outs}
        rows = volume_scores(outs, seconds, extra, xh_in, partial(_original, low, high), top)
        for label, row in rows.items():
            table.setdefault(setting, {}).setdefault(label, []).append(row)
    means = {s: {m: _mean_rows(rows) for m, rows in methods.items()}
             for s, methods in table.items()}  # fmt: skip
    n_test = sum(1 for it in items if it[0] == "test")
    return {"scores": means, "num_test": n_test,
            "num_samples": list(counts) if diff_ck is not None else []}  # fmt: skip
