"""The score table evaluate_psnr and predict_ldm share: classical baselines and their scores.

Baselines (ldm/evaluate/classical.py) get their one parameter tuned for PSNR on train patches (never
on test data), then run on a normalised volume. Every output is scored in original units against HR:
PSNR and SSIM with data range = HR max - min, the mean intensity bias (also as % of that range) and
the contrast scale (1 / least-squares slope of HR on the output); docs/design.md, "Metrics".
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.core.errors import ConfigError, DataError
from ldm.core.files import atomic_path, cached_json
from ldm.core.outdir import mark_folder
from ldm.data.dataset import PatchPairs
from ldm.evaluate.classical import (
    bm4d_available,
    bm4d_denoise,
    gaussian_denoise,
    heat_diffusion,
    nlm_denoise,
    tune_bm4d_sigma,
    tune_gaussian,
    tune_heat,
    tune_nlm,
    tune_tv,
    tv_denoise,
)
from ldm.evaluate.inference import check_output_finite, first_stage_volume
from ldm.evaluate.metrics import intensity_fit, psnr, ssim
from ldm.evaluate.quality_metrics import (
    edge_sharpness_ratio,
    high_band_fsc,
    high_frequency_energy_ratio,
    sparsification,
    variance_to_error_ratio,
)

log = logging.getLogger(__name__)

# method id (metrics.json key) -> label (table row), in table order
LABELS = {
    "baseline": "Baseline (LR)",
    "gaussian": "Gaussian filter",
    "heat": "Heat diffusion",
    "tv": "TV (Chambolle)",
    "nlm": "Non-local means",
    "bm4d": "BM4D",
    "restorer": "Restorer",
    "ldm_zero": "LDM z = 0",
    "ldm_sample": "LDM one sample",
    "ldm": "LDM mean",
    "oracle": "Oracle (HR latent)",
}
BM4D_SKIPPED = "BM4D: skipped (pip install bm4d to include it, and tune.bm4d: true)"
MAX_CASE_COLUMNS = 3  # per-case columns in the printed table up to this many cases
SCORES = ("psnr", "ssim", "bias", "bias_pct", "contrast")
SHARPNESS = ("esr", "hfer", "fsc")
# radial frequency (cycles / voxel) above which HFER and the high-band FSC are taken: the LR's
# Nyquist frequency for a 2x downsampling, half the HR's (docs/design.md, "Metrics")
SHARPNESS_CUTOFF = 0.25


@dataclass(frozen=True)
class TuneConfig:
    """Parameter grids of the classical baselines, tuned for PSNR on train patches."""

    max_patches: int = 64  # evenly spaced train patches used for tuning
    gaussian_sigmas: tuple[float, ...] = (0.0, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)  # 0 = identity
    heat_steps: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24)  # 0 = identity
    heat_dt: float = 0.1  # explicit Euler time step; stable for dt <= 1 / (2 ndim)
    tv_weights: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # normalised units
    nlm_hs: tuple[float, ...] = (0.01, 0.02, 0.03, 0.06, 0.1, 0.15)  # normalised units
    nlm_patch_size: int = 3
    nlm_patch_distance: int = 3  # search window (2 d + 1)^3
    filter_max_patches: int = 6  # TV and NLM are slower: tune them on the first few patches
    bm4d: bool = True  # include BM4D when the optional package is installed (slow on CPU)
    bm4d_sigmas: tuple[float, ...] = (0.02, 0.05, 0.08, 0.12, 0.16)  # normalised units
    bm4d_max_patches: int = 8  # BM4D is slow: tune it on fewer patches

    def __post_init__(self) -> None:
        for name in ("max_patches", "bm4d_max_patches", "filter_max_patches", "nlm_patch_size",
                     "nlm_patch_distance"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gaussian_sigmas", "heat_steps", "bm4d_sigmas", "tv_weights", "nlm_hs"):
            values = getattr(self, name)
            if not values or any(not v >= 0 for v in values):
                raise ConfigError(
                    f"tune.{name} must be a non-empty list of values >= 0, got {values}"
                )
        if not self.heat_dt > 0:
            raise ConfigError(f"tune.heat_dt must be > 0, got {self.heat_dt}")
        if any(s <= 0 for s in self.bm4d_sigmas):
            raise ConfigError(f"tune.bm4d_sigmas must be > 0, got {self.bm4d_sigmas}")


def tuning_pairs(
    data_dir: Path, max_patches: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_patches`` evenly spaced train (lr, hr) patches, each ``(*patch)`` on device."""
    train = PatchPairs(data_dir, "train")
    if len(train) == 0:
        raise DataError(f"{data_dir}: the train split has no patches to tune the baselines on")
    n = min(len(train), max_patches)
    idx = np.unique(np.linspace(0, len(train) - 1, n).round().astype(int))
    return [tuple(t[0].to(device) for t in train[int(i)]) for i in idx]


def _spread(pairs: list, n: int) -> list:
    """``n`` evenly spaced items of ``pairs`` (all when n >= len)."""
    idx = np.unique(np.linspace(0, len(pairs) - 1, min(n, len(pairs))).round().astype(int))
    return [pairs[int(i)] for i in idx]


def tune_classical(
    tune: TuneConfig, pairs: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    """Every baseline's parameter by mean PSNR on ``pairs`` (BM4D only when installed)."""
    sigma, g_psnr = tune_gaussian(pairs, tune.gaussian_sigmas)
    steps, h_psnr = tune_heat(pairs, tune.heat_steps, tune.heat_dt)
    few = _spread(pairs, tune.filter_max_patches)
    tv, tv_psnr = tune_tv(few, tune.tv_weights)
    h, nlm_psnr = tune_nlm(few, tune.nlm_hs, tune.nlm_patch_size, tune.nlm_patch_distance)
    params: dict[str, Any] = {
        "num_patches": len(pairs),
        "filter_patches": len(few),
        "gaussian_sigma": sigma,
        "heat_steps": steps,
        "heat_dt": tune.heat_dt,
        "tv_weight": tv,
        "nlm_h": h,
        "nlm_patch_size": tune.nlm_patch_size,
        "nlm_patch_distance": tune.nlm_patch_distance,
        "bm4d_sigma": None,
        # normalised units, patch ranges
        "train_psnr": {"gaussian": g_psnr, "heat": h_psnr, "tv": tv_psnr, "nlm": nlm_psnr},
    }
    if tune.bm4d and bm4d_available():
        sub = _spread(pairs, tune.bm4d_max_patches)
        params["bm4d_sigma"], params["train_psnr"]["bm4d"] = tune_bm4d_sigma(sub, tune.bm4d_sigmas)
    log.info("tuned classical baselines: %s", params)
    return params


CACHE_DIR = "tuned_baselines"  # inside the dataset folder; prepare_data --overwrite clears it


def tuned_baselines(data_dir: Path, tune: TuneConfig, device: torch.device) -> dict[str, Any]:
    """:func:`tune_classical` on :func:`tuning_pairs`, cached in ``<data_dir>/tuned_baselines/``.

    The tuning is deterministic given the dataset, the grids and the device type, so
    evaluate_psnr and predict_ldm (and reruns) share one result: the second one skips minutes of
    BM4D/NLM tuning. The key hashes manifest.json, the tune settings, the device type and
    whether BM4D is installed; an unwritable dataset folder only means no cache. Runs that miss
    at once (the ranks of a torchrun cohort) tune once: the others wait for the cache file.
    """
    manifest = (Path(data_dir) / "manifest.json").read_bytes()
    key_src = json.dumps([dataclasses.asdict(tune), device.type, bm4d_available()], default=str)
    key = hashlib.sha256(manifest + key_src.encode()).hexdigest()[:16]
    path = Path(data_dir) / CACHE_DIR / f"{key}.json"
    mark_folder(path.parent, "tuned_baselines cache")  # ldm3d's own: prepare_data may replace it
    params, cached = cached_json(path, key, lambda: tune_classical(
        tune, tuning_pairs(Path(data_dir), tune.max_patches, device)))  # fmt: skip
    if cached:
        log.info("tuned classical baselines from %s: %s", path, params)
    return params


def classical_outputs(
    lr: np.ndarray, params: dict[str, Any], device: torch.device
) -> dict[str, np.ndarray]:
    """Each tuned baseline on a normalised (D, H, W) volume, float32 numpy each."""
    x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32)).to(device)
    out = {
        "gaussian": gaussian_denoise(x, params["gaussian_sigma"]),
        "heat": heat_diffusion(x, params["heat_steps"], params["heat_dt"]),
        "tv": tv_denoise(x, params["tv_weight"]),
        "nlm": nlm_denoise(x, params["nlm_h"], params["nlm_patch_size"],
                           params["nlm_patch_distance"]),  # fmt: skip
    }
    if params.get("bm4d_sigma") is not None:
        out["bm4d"] = bm4d_denoise(x, params["bm4d_sigma"])
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def method_outputs(
    case: Any, vae: torch.nn.Module, params: dict[str, Any], window: tuple[int, ...], *,
    overlap: float, batch_size: int, device: torch.device,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Baseline, the tuned filters, the restorer and the oracle (restorer + decoded HR latent)
    of one case (a VolumeCase or an ExternalCase), normalised, on the case's grid. Every method
    runs on ``case.to_model(lr)`` (the training spacing with --resample)."""
    lr = case.model_lr

    def first_stage(hr: np.ndarray | None) -> np.ndarray:
        out = first_stage_volume(vae, lr, window, hr=hr, overlap=overlap, batch_size=batch_size,
                                 device=device, progress=False)  # fmt: skip
        check_output_finite(out, case, "restorer output" if hr is None else "oracle output")
        return case.from_model(out)

    classical = classical_outputs(lr, params, device)
    outputs = {"baseline": case.lr, **{k: case.from_model(v) for k, v in classical.items()},
               "restorer": first_stage(None)}  # fmt: skip
    if case.hr is not None:
        outputs["oracle"] = first_stage(case.to_model(case.hr))
    return outputs


def score_volume(
    x: np.ndarray | torch.Tensor, hr: torch.Tensor, data_range: float, sharpness: bool = False
) -> dict:
    """PSNR, SSIM, bias, bias % of range and contrast of ``x`` against ``hr`` (original units);
    with ``sharpness`` also ESR, HFER and the high-band FSC above SHARPNESS_CUTOFF."""
    scores = {"psnr": psnr(x, hr, data_range), "ssim": ssim(x, hr, data_range),
              **intensity_fit(x, hr, data_range)}  # fmt: skip
    if sharpness:
        scores |= {"esr": edge_sharpness_ratio(x, hr),
                   "hfer": high_frequency_energy_ratio(x, hr, SHARPNESS_CUTOFF),
                   "fsc": high_band_fsc(x, hr, SHARPNESS_CUTOFF)}  # fmt: skip
    return scores


def uncertainty_scores(std: np.ndarray, mean: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    """Calibration of the per-voxel std of N samples against the error of their mean (all
    normalised): variance-to-error ratio (N / (N + 1) when calibrated, for the sample std with
    Bessel's correction that predict_ldm writes; docs/design.md,
    "Metrics") and AUSE, with the AUSE of a random order for scale."""
    sp = sparsification(std, mean, hr)
    return {"var_err_ratio": variance_to_error_ratio(std, mean, hr), "ause": float(sp["ause"]),
            "ause_random": float(sp["ause_random"])}  # fmt: skip


def score_outputs(
    outputs: dict[str, np.ndarray],
    hr: np.ndarray,
    to_original: Callable[[np.ndarray], np.ndarray],
    keep: bool = False,
    sharpness: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Scores of each normalised output against normalised ``hr``, both in original units.

    Data range = HR max - min. Returns the scores and, when ``keep``, the volumes in original
    units as float32 (with HR as 'hr'); only one float64 volume is alive at a time.
    """
    ref = torch.from_numpy(to_original(np.asarray(hr, dtype=np.float64)))
    data_range = float(ref.max() - ref.min())
    scores, originals = {}, {"hr": ref.float().numpy()} if keep else {}
    for method, vol in outputs.items():
        x = torch.from_numpy(to_original(np.asarray(vol, dtype=np.float64)))
        scores[method] = score_volume(x, ref, data_range, sharpness)
        if keep:
            originals[method] = x.float().numpy()
    return scores, originals


def ordered(methods: dict[str, Any]) -> list[str]:
    """Method ids in table order (LABELS order, unknown ids last)."""
    known = [m for m in LABELS if m in methods]
    return known + [m for m in methods if m not in LABELS]


def mean_scores(per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean over cases of each method's scores (those every case has)."""
    cases = list(per_case.values())
    return {
        m: {k: float(np.mean([c[m][k] for c in cases])) for k in cases[0][m]
            if all(k in c[m] for c in cases)}
        for m in ordered(cases[0])
    }  # fmt: skip


def format_table(
    per_case: dict[str, dict[str, dict[str, float]]], mean: dict[str, dict[str, float]]
) -> str:
    """Aligned table, methods as rows: mean PSNR, SSIM, bias, bias %, contrast; then PSNR and
    SSIM per case when there are 2 to MAX_CASE_COLUMNS cases."""
    extra = "bias" in next(iter(mean.values()))
    sharp = any("esr" in v for v in mean.values())
    header = ["method", "PSNR (dB)", "SSIM"] + (["bias", "bias %", "contrast"] if extra else [])
    header += ["ESR", "HFER", "FSC hi"] if sharp else []
    cols = list(per_case.items()) if 1 < len(per_case) <= MAX_CASE_COLUMNS else []
    for name, _ in cols:
        header += [f"{name} PSNR", f"{name} SSIM"]
    rows = [header]
    for m in ordered(mean):
        s = mean[m]
        row = [LABELS.get(m, m), f"{s['psnr']:.2f}", f"{s['ssim']:.4f}"]
        if extra:
            row += [f"{s['bias']:.4g}", f"{s['bias_pct']:+.2f}", f"{s['contrast']:.3f}"]
        if sharp:
            row += [f"{s[k]:.3f}" if k in s else "" for k in SHARPNESS]
        for _, scores in cols:
            row += [f"{scores[m]['psnr']:.2f}", f"{scores[m]['ssim']:.4f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def save_metrics_csv(per_case: dict[str, dict[str, dict[str, float]]], path: Path) -> Path:
    """The score table as CSV, written atomically: one row per case and method (case -> method
    -> scores, as in metrics.json), then the mean over cases of each method (case "mean").

    Columns: method (metrics.json id), case, the SCORES (empty where a method lacks one), any
    other score keys, label (the table's row name). Floats are written in full precision.
    """
    rows = [(case, m, methods[m]) for case, methods in per_case.items() for m in ordered(methods)]
    if per_case:
        rows += [("mean", m, s) for m, s in mean_scores(per_case).items()]
    extra = [k for _, _, s in rows for k in s if k not in SCORES]
    fields = ["method", "case", *SCORES, *dict.fromkeys(extra), "label"]
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, restval="")
        writer.writeheader()
        for case, m, scores in rows:
            values = {k: float(v) if isinstance(v, (int, float, np.number)) else v
                      for k, v in scores.items()}  # fmt: skip
            writer.writerow({**values, "method": m, "case": case, "label": LABELS.get(m, m)})
    return Path(path)


def steps_text(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def tuned_text(params: dict[str, Any]) -> str:
    """One line: where the baselines were tuned and the chosen parameters (+ BM4D note)."""
    text = (
        f"tuned on {params['num_patches']} train patches: Gaussian sigma "
        f"{params['gaussian_sigma']:g}, heat diffusion {steps_text(params['heat_steps'])} of dt "
        f"{params['heat_dt']:g}; on {params['filter_patches']}: TV weight "
        f"{params['tv_weight']:g}, NLM h {params['nlm_h']:g} (patch {params['nlm_patch_size']}, "
        f"distance {params['nlm_patch_distance']})"
    )
    if params["bm4d_sigma"] is not None:
        return text + f", BM4D sigma {params['bm4d_sigma']:g}"
    return text + "\n" + BM4D_SKIPPED


def method_details(params: dict[str, Any]) -> dict[str, str]:
    """Short parameter notes per baseline, for picture labels."""
    return {
        "gaussian": f"sigma {params['gaussian_sigma']:g}",
        "heat": steps_text(params["heat_steps"]),
        "tv": f"weight {params['tv_weight']:g}",
        "nlm": f"h {params['nlm_h']:g}",
        "bm4d": f"sigma {params['bm4d_sigma']:g}" if params["bm4d_sigma"] is not None else "",
    }


TABLE_NOTE = (
    "bias = mean(output - HR) in original units (and in % of the HR range); contrast = 1 / slope "
    "of a least-squares fit of HR to the output (1 = HR contrast, < 1 flattened); ESR = edge "
    "gradient / HR's on HR's top 5 % edges, HFER = spectral energy / HR's above 0.25 cycles/voxel "
    "(both ideal 1, < 1 blurred), FSC hi = Fourier shell correlation with HR there (real detail)"
)
