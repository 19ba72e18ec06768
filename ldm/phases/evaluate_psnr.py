"""evaluate_psnr: the first stage (restorer, and the oracle restorer + decoded HR latent: the
most a diffusion on this latent can reach) and classical baselines on whole test volumes or
external pairs.

Every method runs on the normalised volumes; its output is mapped back to original intensity
units (``VolumeCase.to_original``) and scored against the HR volume there: PSNR and SSIM with
data range = HR max - min, intensity bias and contrast scale (docs/design.md, "Metrics"). The
classical baselines (Gaussian, heat diffusion, TV, non-local means, optional BM4D) get their one
parameter tuned for PSNR on train patches, never on test data. External pairs (``--input LR
--target HR`` or ``--folder`` with globs) are read and normalised by ldm/data/external.py.
With ``--folder``, or under torchrun, the cases are sharded over the ranks, each kept in
``<out>/<case>/`` as it finishes (a rerun skips them), and rank 0 writes the same summary
files as a single-process run (ldm/core/cohort.py; docs/design.md, "Cohort inference").
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.core.checkpoint import file_digest
from ldm.core.cohort import open_cohort
from ldm.core.config import save_config
from ldm.core.device import pick_device
from ldm.core.distributed import init_distributed
from ldm.core.errors import ConfigError, UserError
from ldm.core.files import atomic_path, save_json, staged_dir
from ldm.core.outdir import check_out_dir, config_inputs
from ldm.core.registry import PhaseResult
from ldm.data.dataset import VolumeCase, checked_test_cases, iter_test_cases, load_manifest
from ldm.data.external import ExternalInputs, external_cases
from ldm.data.io import RawSpec
from ldm.evaluate.baselines import (
    LABELS,
    TABLE_NOTE,
    TuneConfig,
    format_table,
    mean_scores,
    method_details,
    method_outputs,
    save_metrics_csv,
    score_outputs,
    tuned_baselines,
    tuned_text,
)
from ldm.evaluate.classical import bm4d_available
from ldm.evaluate.cohort import LazyTuned, case_scores, cohort_cases, is_cohort_run
from ldm.evaluate.scores_json import finite_json
from ldm.evaluate.viz import save_comparison_png
from ldm.nets.loading import load_vae

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate_psnr settings (configs/evaluate_psnr.yaml)."""

    data_dir: Path = Path("dataset/vessel_phantom")
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    out_dir: Path = Path("results/evaluate_psnr")
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    # sliding window (shrunk to smaller volumes); null = the dataset's patch size. As predict_ldm:
    # 64^3 without overlap beat patch-size windows with overlap (README, Benchmark)
    window: tuple[int, ...] | None = (64, 64, 64)
    overlap: float = 0.0
    batch_size: int = 4  # windows per VAE forward pass
    cases: list[str] | None = None  # test cases to evaluate; null = all
    image_case: str | None = None  # case drawn in comparison.png; null = the first one
    tune: TuneConfig = field(default_factory=TuneConfig)
    raw: RawSpec = field(default_factory=RawSpec)  # how to read a headerless --input .raw

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
    names = checked_test_cases(cfg.data_dir, manifest, cfg.cases)
    if cfg.image_case:
        checked_test_cases(cfg.data_dir, manifest, [cfg.image_case])
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
# report


def _save_png(
    path: Path, name: str, originals: dict[str, np.ndarray], scores: dict, params: dict
) -> Path:
    """Rows LR, HR, restorer, oracle, the classical baselines; PSNR in each label."""
    detail = method_details(params)
    rows = {f"LR (input)\n{scores['baseline']['psnr']:.2f} dB": originals["baseline"]}
    rows["HR (target)"] = originals["hr"]
    for m in ("restorer", "oracle", "gaussian", "heat", "tv", "nlm", "bm4d"):
        if m in originals:
            extra = f", {detail[m]}" if detail.get(m) else ""
            rows[f"{LABELS[m]}{extra}\n{scores[m]['psnr']:.2f} dB"] = originals[m]
    title = f"evaluate_psnr: {name} (mid slices + MIP, original units, PSNR vs HR)"
    return save_comparison_png(path, rows, title)


def _summary(cfg: EvaluateConfig, step: int, window: tuple, metrics: dict[str, Any]) -> str:
    """The printed report: header, warnings, table, notes, tuned parameters, Result line."""
    mean = metrics["mean"]
    n = len(metrics["cases"])
    ext = metrics.get("external")
    what = (
        f"external pair{'s' if n > 1 else ''} ({', '.join(metrics['cases'])})"
        if ext
        else f"test case{'s' if n > 1 else ''} of {cfg.data_dir}"
    )
    lines = [
        f"evaluate_psnr: {n} {what}, VAE {cfg.vae_checkpoint} (step {step}), window "
        f"{list(window)}, original units",
        *(ext["warnings"] if ext else []),
        format_table(metrics["cases"], mean),
        TABLE_NOTE,
        metrics["tuned_text"],
        f"Result PSNR: {mean['restorer']['psnr']:.2f} dB (restorer) | "
        f"Baseline PSNR: {mean['baseline']['psnr']:.2f} dB",
        f"wrote {cfg.out_dir}/metrics.json, metrics.csv, comparison.png, config.yaml",
    ]
    return "\n".join(lines)


def _evaluate_cases(
    cfg: EvaluateConfig,
    cases: Iterator[VolumeCase],
    n: int,
    image_case: str,
    vae: torch.nn.Module,
    params: dict[str, Any],
    window: tuple[int, ...],
    device: torch.device,
    png: Path,
) -> dict[str, dict[str, dict[str, float]]]:
    """Scores per case and method; draws ``png`` for the image case on the way."""
    per_case = {}
    for case in tqdm(cases, total=n, desc="evaluate_psnr", unit="case"):
        png_of_case = png if case.name == image_case else None
        per_case[case.name] = _evaluate_case(cfg, case, vae, params, window, device, png_of_case)
    return per_case


def _evaluate_case(
    cfg: EvaluateConfig, case: VolumeCase, vae: torch.nn.Module, params: dict[str, Any],
    window: tuple[int, ...], device: torch.device, png: Path | None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """One case's scores per method; draws ``png`` (unless None)."""
    outputs = method_outputs(case, vae, params, window, overlap=cfg.overlap,
                             batch_size=cfg.batch_size, device=device)  # fmt: skip
    scores, originals = score_outputs(outputs, case.hr, case.to_original, png is not None,
                                      sharpness=True)  # fmt: skip
    log.info("%s: restorer %.2f dB, baseline %.2f dB", case.name, scores["restorer"]["psnr"],
             scores["baseline"]["psnr"])  # fmt: skip
    if png is not None:
        _save_png(png, case.name, originals, scores, params)
    return scores


def _cases(
    cfg: EvaluateConfig, manifest: dict[str, Any], external: ExternalInputs | None
) -> tuple[Iterator[VolumeCase], list[str], str, dict[str, Any] | None]:
    """(case iterator, names, image case, external info for metrics.json or None)."""
    if external is None or not external.given:
        names = _case_names(cfg, manifest)
        return iter_test_cases(cfg.data_dir, names), names, cfg.image_case or names[0], None
    cases, names, info = external_cases(external, manifest, cfg.raw, True, "evaluate_psnr")
    return cases, names, names[0], info


def evaluate_psnr(
    cfg: EvaluateConfig, *, overwrite: bool = False, external: ExternalInputs | None = None
) -> PhaseResult:
    """Score the first stage and the classical baselines on the test volumes (see module doc)."""
    if is_cohort_run(external):  # sharded, resumable per case
        return _evaluate_cohort(cfg, overwrite, external)
    inputs = config_inputs(cfg, external)
    check_out_dir(cfg.out_dir, "evaluate_psnr", overwrite, inputs)
    manifest = load_manifest(cfg.data_dir)
    device = pick_device(cfg.device)
    cases, names, image_case, ext_info = _cases(cfg, manifest, external)
    vae, step, window = _load_vae(cfg, manifest, device)
    with staged_dir(cfg.out_dir, overwrite, phase="evaluate_psnr", inputs=inputs) as tmp:
        params = tuned_baselines(cfg.data_dir, cfg.tune, device)
        per_case = _evaluate_cases(
            cfg, cases, len(names), image_case, vae, params, window, device,
            tmp / "comparison.png",
        )  # fmt: skip
        metrics = _write_results(tmp, cfg, per_case, params, step, window, ext_info)
    return _result(cfg, step, window, metrics)


def _load_vae(
    cfg: EvaluateConfig, manifest: dict[str, Any], device: torch.device
) -> tuple[torch.nn.Module, int, tuple[int, ...]]:
    """(the first stage, its training step, the sliding window)."""
    vae, state = load_vae(cfg.vae_checkpoint, device)
    dims = int(manifest.get("spatial_dims", 3))
    if vae.config.spatial_dims != dims:
        raise UserError(
            f"{cfg.vae_checkpoint}: a {vae.config.spatial_dims}D VAE cannot denoise the {dims}D "
            f"dataset {cfg.data_dir}; train_vae_pair on this dataset first"
        )
    return vae, int(state["step"]), _window(cfg, manifest, vae.config.window_multiple, dims)


def _write_results(
    folder: Path, cfg: EvaluateConfig, per_case: dict[str, Any], params: dict[str, Any],
    step: int, window: tuple[int, ...], ext_info: dict[str, Any] | None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """metrics.json, metrics.csv and config.yaml into ``folder``; returns the metrics."""
    mean = mean_scores(per_case)
    metrics = {
        "units": "original intensity units; data range = HR max - min per case",
        "methods": {m: LABELS[m] for m in mean},
        "mean": mean,
        "cases": per_case,
        "tuned": params,
        "tuned_text": tuned_text(params),
        "checkpoint": {"path": str(cfg.vae_checkpoint), "step": step},
        "data_dir": str(cfg.data_dir),
        "window": list(window),
        "overlap": cfg.overlap,
        **extra,
    }
    if ext_info is not None:
        metrics["external"] = ext_info
    save_json(finite_json(metrics), folder / "metrics.json")  # inf PSNR: null + note
    save_metrics_csv(per_case, folder / "metrics.csv")  # the table, for spreadsheets
    save_config(cfg, folder / "config.yaml")
    return metrics


def _result(
    cfg: EvaluateConfig, step: int, window: tuple[int, ...], metrics: dict[str, Any], note: str = ""
) -> PhaseResult:
    mean = metrics["mean"]
    result, baseline = mean["restorer"]["psnr"], mean["baseline"]["psnr"]
    oracle = mean["oracle"]["psnr"]
    return PhaseResult(
        _summary(cfg, step, window, metrics) + note,
        f"restorer {result:.2f} dB, oracle {oracle:.2f} dB vs baseline {baseline:.2f} dB",
        {"result_psnr": result, "oracle_psnr": oracle, "baseline_psnr": baseline, "mean": mean},
        [cfg.out_dir / "metrics.json", cfg.out_dir / "metrics.csv", cfg.out_dir / "comparison.png"],
    )


# ---------------------------------------------------------------------------------------------
# cohort: --folder, or under torchrun (docs/design.md, "Cohort inference")

SUMMARY_FILES = ("metrics.json", "metrics.csv", "comparison.png", "config.yaml")
SETTINGS = "VAE checkpoint, dataset, window, overlap, tune, BM4D or --resample"


def _evaluate_cohort(
    cfg: EvaluateConfig, overwrite: bool, external: ExternalInputs | None
) -> PhaseResult:
    """Rank r of W scores the cases i with i % W == r, each into ``<out>/<case>/`` (its
    metrics.json and comparison.png, committed whole; kept on a rerun with the same settings);
    rank 0 then writes the single-process run's metrics.json, metrics.csv, comparison.png (of
    the image case) and config.yaml from them."""
    manifest = load_manifest(cfg.data_dir)
    names = _case_names(cfg, manifest) if external is None or not external.given else None
    info, device = init_distributed(cfg.device)
    sources, load, ext_info = cohort_cases(cfg.data_dir, names, manifest, external, cfg.raw,
                                           True, "evaluate_psnr")  # fmt: skip
    names = list(sources)
    image_case = cfg.image_case if ext_info is None and cfg.image_case else names[0]
    vae, step, window = _load_vae(cfg, manifest, device)
    params = LazyTuned(cfg.data_dir, cfg.tune, device)  # one rank tunes, the others wait

    def work(name: str, folder: Path) -> None:
        scores = _evaluate_case(cfg, load(name), vae, params(), window, device,
                                folder / "comparison.png")  # fmt: skip
        save_json(finite_json(scores), folder / "metrics.json")

    signature = {
        "vae": file_digest(Path(cfg.vae_checkpoint)),
        "manifest": file_digest(Path(cfg.data_dir) / "manifest.json"),
        "window": list(window), "overlap": cfg.overlap, "tune": dataclasses.asdict(cfg.tune),
        "bm4d": cfg.tune.bm4d and bm4d_available(),
        "resample": bool(external is not None and external.resample),
    }  # fmt: skip
    out = Path(cfg.out_dir)
    with open_cohort(out, "evaluate_psnr", info, signature, sources, overwrite=overwrite,
                     inputs=config_inputs(cfg, external), summary_files=SUMMARY_FILES,
                     settings=SETTINGS) as cohort:  # fmt: skip
        per_case = case_scores(cohort, names, work)
        if per_case is None:  # not rank 0
            return PhaseResult(f"evaluate_psnr rank {info.rank}: done", "", {}, [out])
        metrics = _write_results(out, cfg, per_case, params(), step, window, ext_info,
                                 world_size=info.world_size)  # fmt: skip
        with atomic_path(out / "comparison.png") as tmp:
            shutil.copyfile(out / image_case / "comparison.png", tmp)
    return _result(cfg, step, window, metrics, cohort.kept_text())
