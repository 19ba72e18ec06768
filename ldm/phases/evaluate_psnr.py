"""evaluate_psnr: PSNR and SSIM of the VAE denoiser and classical baselines on whole test volumes.

Every method runs on the normalised volumes; its output is mapped back to original intensity
units (``TestCase.to_original``) and scored against the HR volume there, with data range =
HR max - min (docs/design.md, "Metrics"). The classical baselines (Gaussian filter, heat diffusion,
optional BM4D) get their one parameter tuned for PSNR on train patches, never on test data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.classical import (
    bm4d_available,
    bm4d_denoise,
    gaussian_denoise,
    heat_diffusion,
    tune_bm4d_sigma,
    tune_gaussian,
    tune_heat,
)
from ldm.config import save_config
from ldm.data.dataset import PatchPairs, TestCase, iter_test_cases, load_manifest
from ldm.distributed import pick_device
from ldm.errors import ConfigError, DataError, UserError
from ldm.inference import autoencode_volume
from ldm.io import save_json, staged_dir
from ldm.metrics import psnr, ssim
from ldm.nets.loading import load_vae
from ldm.pipeline import PhaseResult
from ldm.viz import save_comparison_png

log = logging.getLogger(__name__)

# method id (metrics.json key) -> label (table row)
LABELS = {
    "baseline": "Baseline (LR)",
    "vae_result": "VAE result",
    "vae_ceiling": "VAE ceiling (HR->HR)",
    "gaussian": "Gaussian filter",
    "heat": "Heat diffusion",
    "bm4d": "BM4D",
}
BM4D_SKIPPED = "BM4D: skipped (pip install bm4d to include it)"
MAX_CASE_COLUMNS = 3  # per-case columns in the printed table up to this many cases


@dataclass(frozen=True)
class TuneConfig:
    """Parameter grids of the classical baselines, tuned for PSNR on train patches."""

    max_patches: int = 64  # evenly spaced train patches used for tuning
    gaussian_sigmas: tuple[float, ...] = (0.0, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)  # 0 = identity
    heat_steps: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24)  # 0 = identity
    heat_dt: float = 0.1  # explicit Euler time step; stable for dt <= 1 / (2 ndim)
    bm4d_sigmas: tuple[float, ...] = (0.02, 0.05, 0.08, 0.12, 0.16)  # normalised units
    bm4d_max_patches: int = 8  # BM4D is slow: tune it on fewer patches

    def __post_init__(self) -> None:
        for name in ("max_patches", "bm4d_max_patches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gaussian_sigmas", "heat_steps", "bm4d_sigmas"):
            values = getattr(self, name)
            if not values or any(not v >= 0 for v in values):
                raise ConfigError(
                    f"tune.{name} must be a non-empty list of values >= 0, got {values}"
                )
        if not self.heat_dt > 0:
            raise ConfigError(f"tune.heat_dt must be > 0, got {self.heat_dt}")
        if any(s <= 0 for s in self.bm4d_sigmas):
            raise ConfigError(f"tune.bm4d_sigmas must be > 0, got {self.bm4d_sigmas}")


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate_psnr settings (configs/evaluate_psnr.yaml)."""

    data_dir: Path = Path("dataset/vessel_phantom")
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    out_dir: Path = Path("results/evaluate_psnr")
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    window: tuple[int, ...] | None = None  # sliding window; null = the dataset's patch size
    overlap: float = 0.5
    batch_size: int = 4  # windows per VAE forward pass
    cases: list[str] | None = None  # test cases to evaluate; null = all
    image_case: str | None = None  # case drawn in comparison.png; null = the first one
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be a fraction in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.cases is not None and not self.cases:
            raise ConfigError("cases must list at least one test case, or be null for all")


# ---------------------------------------------------------------------------------------------
# checks before any work


def _case_names(cfg: EvaluateConfig, manifest: dict[str, Any]) -> list[str]:
    """The test cases to evaluate, in order; unknown names are an error listing the valid ones."""
    test = [n for n, c in manifest["cases"].items() if c["split"] == "test"]
    names = list(cfg.cases) if cfg.cases is not None else test
    for n in names + ([cfg.image_case] if cfg.image_case else []):
        if n not in test:
            raise DataError(f"{cfg.data_dir}: no test case {n!r}; test cases: {', '.join(test)}")
    if cfg.image_case and cfg.image_case not in names:
        raise ConfigError(
            f"image_case {cfg.image_case!r} is not among the evaluated cases {names}; add it to "
            f"cases or set image_case: null"
        )
    return names


def _window(cfg: EvaluateConfig, manifest: dict[str, Any], f: int, dims: int) -> tuple[int, ...]:
    """The sliding window: the config's, else the dataset's patch size; divisible by ``f``."""
    window = tuple(cfg.window) if cfg.window is not None else tuple(manifest["patch_size"])
    if len(window) != dims or any(w < 1 or w % f for w in window):
        raise ConfigError(
            f"window must be {dims} sizes divisible by the VAE downsampling factor {f}, "
            f"got {window}; set window: [..] or null for the patch size"
        )
    return window


# ---------------------------------------------------------------------------------------------
# classical baselines


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


def tune_classical(
    tune: TuneConfig, pairs: list[tuple[torch.Tensor, torch.Tensor]], with_bm4d: bool
) -> dict[str, Any]:
    """Best Gaussian sigma, heat steps (and BM4D sigma) by mean PSNR on ``pairs``."""
    sigma, g_psnr = tune_gaussian(pairs, tune.gaussian_sigmas)
    steps, h_psnr = tune_heat(pairs, tune.heat_steps, tune.heat_dt)
    params: dict[str, Any] = {
        "num_patches": len(pairs),
        "gaussian_sigma": sigma,
        "heat_steps": steps,
        "heat_dt": tune.heat_dt,
        "bm4d_sigma": None,
        "train_psnr": {"gaussian": g_psnr, "heat": h_psnr},  # normalised units, patch ranges
    }
    if with_bm4d:
        sub = pairs[: tune.bm4d_max_patches]
        params["bm4d_sigma"], params["train_psnr"]["bm4d"] = tune_bm4d_sigma(sub, tune.bm4d_sigmas)
    return params


# ---------------------------------------------------------------------------------------------
# one case


def _run_methods(
    case: TestCase,
    vae: torch.nn.Module,
    params: dict[str, Any],
    cfg: EvaluateConfig,
    window: tuple[int, ...],
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Every method's output on one case, in normalised units, (D, H, W) float32 each."""

    def ae(volume: np.ndarray) -> np.ndarray:  # an LR-aware VAE decodes with the LR (ceiling too)
        return autoencode_volume(
            vae, volume, window, overlap=cfg.overlap, batch_size=cfg.batch_size,
            device=device, progress=False, lr=case.lr,
        )  # fmt: skip

    lr = torch.from_numpy(np.ascontiguousarray(case.lr, dtype=np.float32)).to(device)
    out = {
        "baseline": case.lr,
        "vae_result": ae(case.lr),  # decode(encode(LR))
        "vae_ceiling": ae(case.hr),  # decode(encode(HR))
        "gaussian": gaussian_denoise(lr, params["gaussian_sigma"]).cpu().numpy(),
        "heat": heat_diffusion(lr, params["heat_steps"], params["heat_dt"]).cpu().numpy(),
    }
    if params["bm4d_sigma"] is not None:
        out["bm4d"] = bm4d_denoise(lr, params["bm4d_sigma"]).cpu().numpy()
    return out


def score_case(
    outputs: dict[str, np.ndarray], case: TestCase, keep: bool = False
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """PSNR and SSIM of each output against HR, in original units, data range = HR max - min.

    Returns the scores and, when ``keep``, the volumes in original units as float32 (with HR
    as 'hr') for the comparison picture; only one float64 volume is alive at a time.
    """
    hr = torch.from_numpy(case.to_original(np.asarray(case.hr, dtype=np.float64)))
    data_range = float(hr.max() - hr.min())
    scores, originals = {}, {"hr": hr.float().numpy()} if keep else {}
    for method, vol in outputs.items():
        x = torch.from_numpy(case.to_original(np.asarray(vol, dtype=np.float64)))
        scores[method] = {"psnr": psnr(x, hr, data_range), "ssim": ssim(x, hr, data_range)}
        if keep:
            originals[method] = x.float().numpy()
    return scores, originals


# ---------------------------------------------------------------------------------------------
# report


def mean_scores(per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean over cases of each method's PSNR (dB) and SSIM."""
    methods = next(iter(per_case.values()))
    return {
        m: {k: float(np.mean([c[m][k] for c in per_case.values()])) for k in ("psnr", "ssim")}
        for m in methods
    }


def format_table(
    per_case: dict[str, dict[str, dict[str, float]]], mean: dict[str, dict[str, float]]
) -> str:
    """Aligned table: methods as rows; mean PSNR/SSIM, then per case when there are few cases."""
    header = ["method", "PSNR (dB)", "SSIM"]
    cols: list[dict[str, dict[str, float]]] = [mean]
    if len(per_case) > 1 and len(per_case) <= MAX_CASE_COLUMNS:
        for name, scores in per_case.items():
            header += [f"{name} PSNR", f"{name} SSIM"]
            cols.append(scores)
    rows = [header]
    for m in mean:
        row = [LABELS[m]]
        for scores in cols:
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


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def _save_png(
    path: Path, name: str, originals: dict[str, np.ndarray], scores: dict, params: dict
) -> Path:
    """Rows LR, HR, VAE result, VAE ceiling, the classical baselines; PSNR in each label."""
    detail = {
        "gaussian": f"sigma {params['gaussian_sigma']:g}",
        "heat": _steps(params["heat_steps"]),
        "bm4d": f"sigma {params['bm4d_sigma']:g}" if params["bm4d_sigma"] is not None else "",
    }
    rows = {f"LR (input)\n{scores['baseline']['psnr']:.2f} dB": originals["baseline"]}
    rows["HR (target)"] = originals["hr"]
    for m in ("vae_result", "vae_ceiling", "gaussian", "heat", "bm4d"):
        if m in originals:
            extra = f", {detail[m]}" if detail.get(m) else ""
            rows[f"{LABELS[m]}{extra}\n{scores[m]['psnr']:.2f} dB"] = originals[m]
    title = f"evaluate_psnr: {name} (mid slices + MIP, original units, PSNR vs HR)"
    return save_comparison_png(path, rows, title)


def _summary(cfg: EvaluateConfig, step: int, window: tuple, metrics: dict[str, Any]) -> str:
    """The printed report: header, table, BM4D note, tuned parameters, Result/Baseline line."""
    mean, params = metrics["mean"], metrics["tuned"]
    n = len(metrics["cases"])
    lines = [
        f"evaluate_psnr: {n} test case{'s' if n > 1 else ''} of {cfg.data_dir}, "
        f"VAE {cfg.vae_checkpoint} (step {step}), window {list(window)}, original units",
        format_table(metrics["cases"], mean),
    ]
    if params["bm4d_sigma"] is None:
        lines.append(BM4D_SKIPPED)
    tuned = (
        f"tuned on {params['num_patches']} train patches: Gaussian sigma "
        f"{params['gaussian_sigma']:g}, heat diffusion {_steps(params['heat_steps'])} of dt "
        f"{params['heat_dt']:g}"
    )
    if params["bm4d_sigma"] is not None:
        tuned += f", BM4D sigma {params['bm4d_sigma']:g}"
    lines.append(tuned)
    lines.append(
        f"Result PSNR: {mean['vae_result']['psnr']:.2f} dB | "
        f"Baseline PSNR: {mean['baseline']['psnr']:.2f} dB"
    )
    lines.append(f"wrote {cfg.out_dir}/metrics.json, comparison.png, config.yaml")
    return "\n".join(lines)


def _evaluate_cases(
    cfg: EvaluateConfig,
    names: list[str],
    vae: torch.nn.Module,
    params: dict[str, Any],
    window: tuple[int, ...],
    device: torch.device,
    png: Path,
) -> dict[str, dict[str, dict[str, float]]]:
    """Scores per case and method; draws ``png`` for the image case on the way."""
    image_case = cfg.image_case or names[0]
    per_case = {}
    cases = iter_test_cases(cfg.data_dir, names)
    for case in tqdm(cases, total=len(names), desc="evaluate_psnr", unit="case"):
        outputs = _run_methods(case, vae, params, cfg, window, device)
        keep = case.name == image_case
        per_case[case.name], originals = score_case(outputs, case, keep)
        log.info(
            "%s: VAE %.2f dB, baseline %.2f dB", case.name,
            per_case[case.name]["vae_result"]["psnr"], per_case[case.name]["baseline"]["psnr"],
        )  # fmt: skip
        if keep:
            _save_png(png, case.name, originals, per_case[case.name], params)
    return per_case


def evaluate_psnr(cfg: EvaluateConfig, *, overwrite: bool = False) -> PhaseResult:
    """Score the VAE denoiser and the classical baselines on the test volumes (see module doc)."""
    manifest = load_manifest(cfg.data_dir)
    names = _case_names(cfg, manifest)
    device = pick_device(cfg.device)
    vae, state = load_vae(cfg.vae_checkpoint, device)
    dims = int(manifest.get("spatial_dims", 3))
    if vae.config.spatial_dims != dims:
        raise UserError(
            f"{cfg.vae_checkpoint}: a {vae.config.spatial_dims}D VAE cannot denoise the {dims}D "
            f"dataset {cfg.data_dir}; train_vae_pair on this dataset first"
        )
    window = _window(cfg, manifest, vae.config.downsample_factor, dims)
    with staged_dir(cfg.out_dir, overwrite) as tmp:
        with_bm4d = bm4d_available()
        pairs = tuning_pairs(cfg.data_dir, cfg.tune.max_patches, device)
        params = tune_classical(cfg.tune, pairs, with_bm4d)
        log.info("tuned classical baselines: %s", params)
        per_case = _evaluate_cases(cfg, names, vae, params, window, device, tmp / "comparison.png")
        mean = mean_scores(per_case)
        metrics = {
            "units": "original intensity units; data range = HR max - min per case",
            "methods": {m: LABELS[m] for m in mean},
            "mean": mean,
            "cases": per_case,
            "tuned": params,
            "checkpoint": {"path": str(cfg.vae_checkpoint), "step": int(state["step"])},
            "data_dir": str(cfg.data_dir),
            "window": list(window),
            "overlap": cfg.overlap,
        }
        save_json(metrics, tmp / "metrics.json")
        save_config(cfg, tmp / "config.yaml")
    result, baseline = mean["vae_result"]["psnr"], mean["baseline"]["psnr"]
    return PhaseResult(
        _summary(cfg, int(state["step"]), window, metrics),
        f"VAE {result:.2f} dB vs baseline {baseline:.2f} dB",
        {"result_psnr": result, "baseline_psnr": baseline, "mean": mean},
        [cfg.out_dir / "metrics.json", cfg.out_dir / "comparison.png"],
    )
